"""Synchronous host-device transfers per compression, counted outside localkv's own counter (so a build before
it can be measured the same way): a small preloaded library wraps libllama's calls of ggml_backend_tensor_get,
_set and _memset. A compression's transfers are those of the decode step that compressed and of the next (its
compaction runs there), less two plain steps' (the graph inputs every decode sets).

    python scripts/transfers_per_compression.py [MODEL]      # MODEL: a .gguf (default: the default model)
"""
from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _reexec_with_shim() -> None:
    lib = Path(tempfile.gettempdir()) / "localkv-transfer-count.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-o", str(lib), str(HERE / "transfer_count.c"), "-ldl"], check=True)
    env = dict(os.environ, LD_PRELOAD=str(lib), LOCALKV_TRANSFER_SHIM=str(lib))
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def main() -> None:
    if "LOCALKV_TRANSFER_SHIM" not in os.environ:
        _reexec_with_shim()
    shim = ctypes.CDLL(os.environ["LOCALKV_TRANSFER_SHIM"])
    for f in ("shim_gets", "shim_sets", "shim_memsets"):
        getattr(shim, f).restype = ctypes.c_long

    def counts():
        return shim.shim_gets(), shim.shim_sets(), shim.shim_memsets()

    from localkv.bench.speed import filler_tokens
    from localkv.engine import Engine
    from localkv.llama import Sampler
    model = sys.argv[1] if len(sys.argv) > 1 else None
    for policy, args in (("snapkv", None), ("snapkv", {"adaptive": "true"}), ("h2o", None)):
        eng = Engine(model, policy=policy, policy_args=args, budget=1024, chunk=256, threads=2)
        eng.feed(filler_tokens(eng.model, 4096))
        sampler = Sampler(0.0, 0)
        steps = []
        for _ in range(64):
            c0, k0 = counts(), eng.compressions
            eng.step(sampler.sample(eng.ctx))
            steps.append((eng.compressions - k0, [b - a for a, b in zip(c0, counts())]))
        plain = [c for k, c in steps[2:] if k == 0]
        base = [sorted(x[i] for x in plain)[len(plain) // 2] for i in range(3)]
        extra = [[c[i] + steps[j + 1][1][i] - 2 * base[i] for i in range(3)]
                 for j, (k, c) in enumerate(steps[:-1]) if k]
        print(json.dumps({"policy": policy, "args": args, "compressions": len(extra),
                          "reads_uploads_clears_per_compression": [sum(e[i] for e in extra) / max(len(extra), 1)
                                                                   for i in range(3)]}), flush=True)
        sampler.close()
        eng.close()


if __name__ == "__main__":
    main()
