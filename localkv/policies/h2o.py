from dataclasses import dataclass

import numpy as np

from .. import capi
from .base import HeadAdaptive, Range


@dataclass
class H2O(HeadAdaptive):
    """H2O, heavy-hitter oracle (Zhang et al., 2023, arXiv 2306.14048): accumulated attention of all queries.

    Score of a token: the attention it has received from every query since it
    arrived (prompt queries of each chunk and every decoded query), summed over
    the query heads of its KV group; the sum follows each token for its whole
    life (never restarted after a compression). The budget is split between heavy hitters
    and the most recent tokens by `recent_ratio` (the paper's 50/50). By default a word kept in
    half the (layer, KV head)s is kept in all (`consensus`; the paper's selection: consensus=0).
    """

    name = "h2o"
    summary = "accumulated attention of all queries plus a recent window, also while decoding"

    ranges = {"recent_ratio": Range(0.0, 1.0, hi_open=True)}

    window: int = 0           # the recent part comes from recent_ratio
    recent_ratio: float = 0.5
    # accumulated attention ranks a fact differently in every layer: kept in most, dropped in a few, it came back
    # broken (facts at 3K, budget 384: 5 of 12 right with one broken, 9 of 12 with consensus 0.5)
    consensus: float = 0.5

    def needs(self, phase):
        return {capi.STAT_ACC}

    def obs_window(self, phase):
        return 1 << 16  # every query of the ubatch (the C side caps it at the ubatch size)

    def score(self, view):
        return view.stat(capi.STAT_ACC)

    def protected(self, view):
        recent = np.maximum((self.recent_ratio * view.head_capacity).astype(int), self.window)[:, None]
        pos = view.positions
        return (pos < self.sinks) | (pos >= view.n_seen - recent)


