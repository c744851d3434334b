"""Uniform against 10:1 ragged head budgets at the same average (SnapKV selection), on the default model.

    python scripts/ragged_spread.py [budget] [prompt tokens] [decoded tokens]

Every layer's first KV head keeps 10/11 of twice the budget and its second head 1/11 (the default model has
two KV heads per layer), so the total is the uniform one's. Prints, per layout: KV MiB at rest (llama.cpp's own
memory breakdown), prefill and decode tok/s, compression seconds, and attention calls per layer.
"""
import sys
import time

from localkv import capi
from localkv.bench.speed import filler_tokens
from localkv.engine import Engine
from localkv.llama import Sampler
from localkv.policies.snapkv import SnapKV


class SpreadSnapKV(SnapKV):
    """SnapKV with budgets split `spread`:1 between the two KV heads of every layer (same average)."""
    name = "snapkv-spread"
    spread = 10

    def head_capacities(self, budget, heads):
        out = []
        for h in heads:
            big = 2 * budget * self.spread // (self.spread + 1)
            out += [big, 2 * budget - big] + [budget] * (h - 2)
        return out


def run(policy, budget, n_prompt, n_decode):
    with Engine(policy=policy, budget=budget, progress=False, threads=2) as eng:
        tokens = filler_tokens(eng.model, n_prompt)
        t0 = time.perf_counter()
        eng.feed(tokens)
        prefill = n_prompt / (time.perf_counter() - t0)
        s = Sampler(0.0, 0)
        t0 = time.perf_counter()
        for _ in range(n_decode):
            eng.step(s.sample(eng.ctx))
        decode = n_decode / (time.perf_counter() - t0)
        s.close()
        cap, alloc, used = capi.cache_state(eng.ctx)
        calls = 1 if len(set(cap.tolist())) == 1 else 2
        return dict(kv_mib=capi.memory_bytes(eng.ctx) / 2**20, prefill=prefill, decode=decode,
                    compress_s=eng.compress_seconds, compressions=eng.compressions, calls=calls,
                    caps=sorted(set(cap.tolist())), held=int(used.sum()))


def main():
    budget = int(sys.argv[1]) if len(sys.argv) > 1 else 256
    n_prompt = int(sys.argv[2]) if len(sys.argv) > 2 else 2048
    n_decode = int(sys.argv[3]) if len(sys.argv) > 3 else 128
    print(f"budget {budget} (average per KV head), {n_prompt}-token prompt, {n_decode} decoded tokens")
    print("| layout | head budgets | KV MiB at rest | tokens held | prefill tok/s | decode tok/s | compress s "
          "| attention calls per layer |")
    print("|---|---|---|---|---|---|---|---|")
    for name, policy in (("uniform", "snapkv"), ("10:1 ragged", SpreadSnapKV())):
        r = run(policy, budget, n_prompt, n_decode)
        print(f"| {name} | {'/'.join(map(str, r['caps'][::-1]))} | {r['kv_mib']:.2f} | {r['held']} | "
              f"{r['prefill']:.0f} | {r['decode']:.1f} | {r['compress_s']:.2f} ({r['compressions']}) | {r['calls']} |",
              flush=True)


if __name__ == "__main__":
    main()
