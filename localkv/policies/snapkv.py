from dataclasses import dataclass

from .. import capi
from .base import KERNEL, PREFILL, HeadAdaptive, max_pool


@dataclass
class SnapKV(HeadAdaptive):
    """SnapKV (Li et al., 2024, arXiv 2404.14469): what the last prompt queries attend to.

    Score of a token: softmax attention from the last `window` queries (the
    observation window), summed over those queries and over the query heads of
    its KV group, then max-pooled along the sequence with `kernel` so that the
    neighbours of a hit survive with it; top-k per KV head plus the window.
    Paper defaults: window 32, kernel 7. While decoding (which the paper does
    not compress) the score is the same attention accumulated over the decoded
    queries since the last compression.
    """

    name = "snapkv"
    summary = "attention of the last 32 prompt queries, max-pooled (kernel 7), top-k per KV head"

    ranges = {"kernel": KERNEL}

    window: int = 32
    kernel: int = 7

    def needs(self, phase):
        return {capi.STAT_OBS} if phase == PREFILL else {capi.STAT_ACC}

    def score(self, view):
        raw = view.stat(capi.STAT_OBS if view.phase == PREFILL else capi.STAT_ACC)
        return max_pool(raw, self.kernel)

    def after_compress(self, ctx):
        capi.clear_stat(ctx, capi.STAT_ACC)
