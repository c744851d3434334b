"""Bytes one decode-time compression moves between host and backend, at budget 384 on the default model.

    python scripts/compress_bytes.py snapkv ahakv h2o pyramidkv streamingllm
"""
import sys
from localkv.engine import Engine
from localkv.llama import Sampler
from localkv.bench.speed import filler_tokens
for policy in sys.argv[1:]:
    with Engine(policy=policy, budget=384, progress=False, threads=2) as eng:
        eng.feed(filler_tokens(eng.model, 1024))
        s = Sampler(0.0, 0)
        n0, b0 = eng.compressions, eng.compress_bytes()
        while eng.compressions == n0:
            eng.step(s.sample(eng.ctx))
        eng.step(s.sample(eng.ctx))  # the moves run with the next decode
        print(policy, eng.compress_bytes() - b0, "bytes in one decode-time compression", flush=True)
        s.close()
