"""What the in-graph statistics cost while a long prompt goes in: SnapKV against the same eviction with its
statistics switched off (recency as the score), in the same engine, alternating, a fresh engine per run.

Whole runs in separate engines differed by up to 20% on the 2-core test machine with the same settings (an
engine stays in its fast or slow state for its whole life), more than the statistics cost; within one engine
the two prompts see the same buffers. Prints each run's prefill tok/s with and without statistics.

    python scripts/stats_overhead.py [PROMPT_TOKENS=8192] [RUNS=3] [BUDGET=384]
"""
import sys
import time
from pathlib import Path

import numpy as np

from localkv import models
from localkv.engine import Engine
from localkv.policies.snapkv import SnapKV


class SwitchableSnapKV(SnapKV):
    """SnapKV; with `statistics` off, its compressions, chunks and working set with no statistic computed or
    read (recency is the score)."""

    statistics = True

    def needs(self, phase):
        return super().needs(phase) if self.statistics else set()

    def score(self, view):
        return super().score(view) if self.statistics else view.positions.astype(np.float64)


def main(n_tokens: int = 8192, runs: int = 3, budget: int = 384) -> None:
    path = str(models.resolve(None, progress=False))
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text() * 8
    ratios = []
    for run in range(runs):
        policy = SwitchableSnapKV()
        with Engine(path, policy=policy, budget=budget, chunk=256, threads=2) as eng:
            tokens = eng.model.tokenize(text)[:n_tokens]
            tps = {}
            for statistics in ((True, False) if run % 2 == 0 else (False, True)):
                policy.statistics = statistics
                eng.reset()
                t = time.perf_counter()
                eng.feed(tokens)
                tps[statistics] = len(tokens) / (time.perf_counter() - t)
        ratios.append(tps[False] / tps[True])
        print(f"run {run + 1}: with statistics {tps[True]:6.1f} tok/s, without {tps[False]:6.1f} tok/s: "
              f"statistics cost {100 * (ratios[-1] - 1):+.1f}%", flush=True)
    print(f"statistics cost over {runs} runs: mean {100 * (np.mean(ratios) - 1):+.1f}%, "
          f"median {100 * (np.median(ratios) - 1):+.1f}%")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
