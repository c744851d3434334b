"""What the in-graph statistics cost while a long prompt goes in: SnapKV against the same eviction with its
statistics switched off (recency as the score), alternating runs, wall and CPU time of the prefill.

    python scripts/stats_overhead.py [PROMPT_TOKENS=8192] [RUNS=3] [BUDGET=384]
"""
import sys
import time
from pathlib import Path

import numpy as np

from localkv import models
from localkv.engine import Engine
from localkv.policies.snapkv import SnapKV


class SnapKVWithoutStatistics(SnapKV):
    """SnapKV's compressions, chunks and working set, but no statistic computed or read."""

    name = "snapkv-nostats"

    def needs(self, phase):
        return set()

    def score(self, view):
        return view.positions.astype(np.float64)


def main(n_tokens: int = 8192, runs: int = 3, budget: int = 384) -> None:
    path = str(models.resolve(None, progress=False))
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text() * 8
    rows = {"snapkv": [], "snapkv-nostats": []}
    for _ in range(runs):
        for policy in (SnapKV(), SnapKVWithoutStatistics()):
            with Engine(path, policy=policy, budget=budget, chunk=256, threads=2) as eng:
                tokens = eng.model.tokenize(text)[:n_tokens]
                t, c = time.perf_counter(), time.process_time()
                eng.feed(tokens)
                wall, cpu = time.perf_counter() - t, time.process_time() - c
            rows[policy.name].append((len(tokens) / wall, cpu))
            print(f"{policy.name:15s} {len(tokens) / wall:6.1f} tok/s  cpu {cpu:6.1f} s", flush=True)
    for name, r in rows.items():
        tps, cpu = np.mean(r, axis=0)
        print(f"mean {name:15s} {tps:6.1f} tok/s  cpu {cpu:6.1f} s")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
