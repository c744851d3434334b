from dataclasses import dataclass

import numpy as np

from .. import capi
from .base import KERNEL, MAX_TOKENS, PREFILL, HeadAdaptive, Range, avg_pool


@dataclass
class AhaKV(HeadAdaptive):
    """AhaKV (Gu et al., 2025, arXiv 2506.03762): unbiased attention-driven eviction.

    Score of a token j = value prior x recent accumulation:
    - Recent Accumulation: attention summed over the last `r` queries only
      (not all of them, which favours early tokens);
    - Step-Gain softmax: that attention uses the scale sqrt(2 ln(i/k) / d) per
      query row (i tokens visible, k the budget) instead of 1/sqrt(d); where
      i <= k the paper's formula is undefined and 1/sqrt(d) is used;
    - Value-Prior Enhancement: ||v_j||^2 average-pooled along the sequence with
      `vpe_kernel` and divided by its maximum, multiplied in.
    The query heads of a KV group are summed; top-k per KV head plus the
    `window` most recent tokens (paper: 32). While decoding, the recent
    accumulation is over the decoded queries since the last compression.
    The paper does not give the pooling kernel: 7 (SnapKV's) was chosen.
    """

    name = "ahakv"
    summary = "recent accumulation + step-gain softmax + value prior, keeps evicting while decoding"

    ranges = {"r": Range(1, MAX_TOKENS), "vpe_kernel": KERNEL}

    window: int = 32
    r: int = 32
    vpe_kernel: int = 7
    value_prior: bool = True

    def needs(self, phase):
        # the value prior's norms are recorded as tokens are written: asked for in both phases, so every kept
        # token has one
        vnorm = {capi.STAT_VNORM} if self.value_prior else set()
        return vnorm | ({capi.STAT_OBS_ADAPTIVE} if phase == PREFILL else {capi.STAT_ACC_ADAPTIVE})

    def obs_window(self, phase):
        return self.r

    def score(self, view):
        ra = view.stat(capi.STAT_OBS_ADAPTIVE if view.phase == PREFILL else capi.STAT_ACC_ADAPTIVE)
        if not self.value_prior:
            return ra
        gamma = avg_pool(view.stat(capi.STAT_VNORM), self.vpe_kernel)
        peak = gamma.max(axis=1, keepdims=True)
        gamma_bar = np.divide(gamma, peak, out=np.zeros_like(gamma), where=peak > 0)
        return gamma_bar * ra

    def after_compress(self, ctx):
        capi.clear_stat(ctx, capi.STAT_ACC_ADAPTIVE)
