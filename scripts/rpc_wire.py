"""What crosses the wire when the compressed cache lives on an RPC server: bytes and round trips per compression.

A `localkv rpc-server` on 127.0.0.1, a counting TCP proxy in front of it, and an engine whose layers are all on
that server (`--rpc` through the proxy). A compression's traffic is that of the decode step that compressed and of
the next (its compaction runs there), less two plain steps' (every decode's own graph and inputs).

    python scripts/rpc_wire.py [MODEL] [--policy snapkv] [--budget 1024] [--prompt 4096]
"""
from __future__ import annotations

import argparse
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time


class WireCounter(threading.Thread):
    """A TCP proxy on 127.0.0.1 to `target` that counts the bytes each way and the round trips (a reply from the
    server after the client sent something)."""

    def __init__(self, target: tuple[str, int]):
        super().__init__(daemon=True)
        self.target = target
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.port = self.listener.getsockname()[1]
        self.up = self.down = self.round_trips = 0
        self.lock = threading.Lock()

    def snapshot(self) -> tuple[int, int, int]:
        with self.lock:
            return self.up, self.down, self.round_trips

    def run(self) -> None:
        while True:
            client, _ = self.listener.accept()
            server = socket.create_connection(self.target)
            threading.Thread(target=self._pump, args=(client, server), daemon=True).start()

    def _pump(self, client: socket.socket, server: socket.socket) -> None:
        last_up = False
        while True:
            ready, _, _ = select.select([client, server], [], [])
            for s in ready:
                data = s.recv(1 << 20)
                if not data:
                    client.close()
                    server.close()
                    return
                (server if s is client else client).sendall(data)
                with self.lock:
                    if s is client:
                        self.up += len(data)
                        last_up = True
                    else:
                        self.down += len(data)
                        if last_up:
                            self.round_trips += 1
                        last_up = False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, threads: int = 2) -> subprocess.Popen:
    """`localkv rpc-server` on 127.0.0.1:port, once it accepts connections."""
    proc = subprocess.Popen([sys.executable, "-m", "localkv.cli", "rpc-server", "--port", str(port), "--threads", str(threads)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError("localkv rpc-server exited")
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("localkv rpc-server did not start")


def per_compression(eng, wire: WireCounter, steps: int = 64) -> dict:
    """Bytes up and down and round trips per compression while decoding `steps` tokens."""
    from localkv.llama import Sampler
    sampler = Sampler(0.0, 0)
    rows = []
    for _ in range(steps):
        c0, k0 = wire.snapshot(), eng.compressions
        eng.step(sampler.sample(eng.ctx))
        rows.append((eng.compressions - k0, [b - a for a, b in zip(c0, wire.snapshot())]))
    sampler.close()
    plain = [c for k, c in rows[2:] if k == 0]
    base = [sorted(x[i] for x in plain)[len(plain) // 2] for i in range(3)]
    extra = [[c[i] + rows[j + 1][1][i] - 2 * base[i] for i in range(3)] for j, (k, c) in enumerate(rows[:-1]) if k]
    n = max(len(extra), 1)
    return {"compressions": len(extra), "bytes_up": sum(e[0] for e in extra) / n, "bytes_down": sum(e[1] for e in extra) / n,
            "round_trips": sum(e[2] for e in extra) / n, "plain_step": {"bytes_up": base[0], "bytes_down": base[1],
                                                                     "round_trips": base[2]}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", nargs="?")
    ap.add_argument("--policy", default="snapkv")
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--prompt", type=int, default=4096)
    args = ap.parse_args()
    from localkv.bench.speed import filler_tokens
    from localkv.engine import Engine
    port = free_port()
    server = start_server(port)
    try:
        wire = WireCounter(("127.0.0.1", port))
        wire.start()
        policy, _, adaptive = args.policy.partition(":")
        eng = Engine(args.model, policy=policy, policy_args={"adaptive": "true"} if adaptive else None, budget=args.budget,
                     threads=2, rpc=[f"127.0.0.1:{wire.port}"])
        eng.feed(filler_tokens(eng.model, args.prompt))
        res = per_compression(eng, wire)
        res.update(policy=args.policy, budget=args.budget, kv_bytes=eng.kv_bytes_allocated())
        eng.close()
        print(json.dumps(res))
    finally:
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
