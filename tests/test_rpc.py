"""The compressed cache on llama.cpp's RPC backend: every layer on a `localkv rpc-server` on 127.0.0.1 keeps the
tokens the CPU keeps and replies the same, and only indices, statistics and masks cross the wire for a compression
(counted by a proxy in front of the server: scripts/rpc_wire.py)."""
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import make_engine
from localkv import capi, rpc
from localkv.errors import LocalkvError

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from rpc_wire import WireCounter, free_port, per_compression, start_server  # noqa: E402

pytestmark = pytest.mark.model

PROMPT = ("The lighthouse keeper wrote in her log every night. " * 30 +
          "The code for the storeroom is amber-4471. What is the code for the storeroom?")


@pytest.fixture(scope="module")
def wire():
    port = free_port()
    server = start_server(port)
    counter = WireCounter(("127.0.0.1", port))
    counter.start()
    yield counter
    server.terminate()
    server.wait(10)


@pytest.mark.parametrize("policy,args", [("snapkv", None), ("snapkv", {"adaptive": "true"}), ("kvzip", None)],
                         ids=["snapkv", "ragged", "kvzip-replay"])
def test_layers_on_an_rpc_server_keep_what_the_cpu_keeps(model_path, wire, policy, args, monkeypatch):
    # the CPU run keeps its weights as stored (no repacking for faster kernels), as the server does, so both
    # compute the same floats
    monkeypatch.setenv("LOCALKV_NO_REPACK", "1")
    # layers off the host get slots in multiples of 256; the CPU run is padded alike, so both hold the same slots
    monkeypatch.setenv("LLAMA_LOCALKV_SLOT_PAD", "256")
    runs = {}
    for where in ("cpu", "rpc"):
        endpoints = [f"127.0.0.1:{wire.port}"] if where == "rpc" else None
        up0 = wire.snapshot()[0]
        with make_engine(model_path, policy=policy, policy_args=args, budget=96, chunk=128, flash_attn=True,
                         rpc=endpoints, gpu_layers=-1 if where == "rpc" else 0) as eng:
            res = eng.generate(PROMPT, max_tokens=24, temperature=0, ignore_eos=True)
            kept = [capi.positions(eng.ctx, i, eng.shape.n_head_kv) for i in range(len(eng.kv_layers))]
            runs[where] = (res, kept, wire.snapshot()[0] - up0)
    (cpu, kept_cpu, _), (remote, kept_remote, sent) = runs["cpu"], runs["rpc"]
    assert sent > 1 << 20  # the weights and the graphs went to the server: the layers ran there
    assert remote.compressions == cpu.compressions > 0
    for a, b in zip(kept_cpu, kept_remote):
        np.testing.assert_array_equal(a, b)
    assert remote.text == cpu.text
    assert remote.kv_bytes_allocated == cpu.kv_bytes_allocated
    assert rpc.gpu_devices() == []  # the servers were never registered: later models in this process stay local


def test_a_compression_sends_no_kv_rows(model_path, wire):
    """Per decode-time compression, what crosses the wire (indices, statistics, live masks, the graphs) is a
    fraction of the K and V a host-side compaction would move."""
    from localkv.bench.speed import filler_tokens
    with make_engine(model_path, policy="snapkv", budget=256, chunk=128, rpc=[f"127.0.0.1:{wire.port}"]) as eng:
        eng.feed(filler_tokens(eng.model, 600))
        got = per_compression(eng, wire, steps=40)
        kv = eng.kv_bytes_allocated()
    assert got["compressions"] >= 1
    assert got["bytes_down"] < kv / 4  # the statistics read back, not the rows
    assert got["bytes_up"] < 2 * kv    # indices, masks and the rebuilt graphs, not the rows twice


def test_bad_rpc_endpoints_are_one_line_errors():
    for bad in ("localhost", "host:0", "host:99999", "a b:1", ""):
        with pytest.raises(LocalkvError, match="--rpc"):
            rpc.parse_endpoints(bad)
    assert rpc.parse_endpoints("10.0.0.2:50052,[::1]:7000") == ["10.0.0.2:50052", "[::1]:7000"]
    with pytest.raises(LocalkvError, match="cannot reach"):
        rpc.devices([f"127.0.0.1:{free_port()}"])


def test_cli_rpc_errors_are_one_line(wire):
    import subprocess
    for args, msg in ((["generate", "hi", "--rpc", "nonsense"], "--rpc: 'nonsense' is not HOST:PORT"),
                      (["generate", "hi", "--rpc", f"127.0.0.1:{free_port()}"], "cannot reach the RPC server"),
                      (["rpc-server", "--port", str(wire.port)], "cannot listen on")):  # the proxy holds that port
        p = subprocess.run([sys.executable, "-m", "localkv.cli", *args], capture_output=True, text=True, timeout=120)
        assert p.returncode == 1 and msg in p.stderr and "Traceback" not in p.stderr, p.stderr
