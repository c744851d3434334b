import math
from dataclasses import dataclass, replace

import numpy as np

from .. import capi
from ..profiles import KVZAP_KIND
from .base import FRACTION, Policy, Range, select_one_threshold


@dataclass
class KVzap(Policy):
    """KVzap (Jegou and Jeblick, 2026, arXiv 2601.07891): KVzip's scores predicted from each token's hidden state.

    A surrogate per layer (`localkv calibrate --policy kvzap` fits it on local text: a linear map from the hidden
    state at the attention's input to the log of each KV head's KVzip+ score) runs inside the forward pass when a
    token is written (STAT_SCORE), so scoring needs no replay and no question: a prompt is compressed chunk by
    chunk in a working set of the budget plus one chunk, and decoding prunes as it goes.

    Budget mode (the default): one threshold over every layer and KV head at the budget's bytes, each head keeping
    at least `head_floor` x its capacity (as kvzip). Threshold mode (`threshold=T`, a log score on the model's
    own scale; kvpress's example uses -4 on 8B models): every compression drops the tokens scored under T, so
    memory follows the content, and the budget still bounds each head. The first `sinks` and the last `window`
    positions are always kept, and whole words as every policy does.
    """

    name = "kvzap"
    summary = "query-agnostic: a learned per-layer scorer on each token's hidden state (no replay), one threshold"
    query_agnostic = True

    ranges = {"head_floor": FRACTION, "threshold": Range(-math.inf, 1e6)}

    sinks: int = 4
    window: int = 32
    head_floor: float = 0.1
    threshold: float = -math.inf  # finite: threshold mode (drop what scores under it at every compression)

    def __post_init__(self):
        self._weights: tuple | None = None

    def needs(self, phase):
        return {capi.STAT_SCORE}

    def obs_window(self, phase):
        return 1

    def profile_kinds(self):
        return {KVZAP_KIND}

    def prepare(self, engine):
        profile, _path = engine.profile(KVZAP_KIND)
        self._weights = (profile["weights"], profile["bias"])

    def attach(self, ctx):
        weights, bias = self._weights
        for i, (w, b) in enumerate(zip(weights, bias)):
            capi.set_scorer(ctx, i, w, b)

    @property
    def prunes_always(self):
        return math.isfinite(self.threshold)

    @property
    def shares_model_budget(self):
        return not self.prunes_always

    def score(self, view):
        return view.stat(capi.STAT_SCORE)

    def select(self, view):
        if not self.prunes_always:
            return super().select(view)
        # threshold mode: what scores at least T (protected slots are +inf), the budget's best when more do
        scores = self.final_scores(view)
        limit = view.head_used if view.limit is None else np.minimum(view.limit, view.head_used)
        counts = np.minimum((scores >= self.threshold).sum(axis=1), np.minimum(view.head_capacity, limit))
        return self.top_k(scores, replace(view, capacity=counts))

    def select_layers(self, views):
        if self.prunes_always or not views:
            return [self.select(v) for v in views]
        return select_one_threshold(self, views, self.head_floor)
