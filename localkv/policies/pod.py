from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import capi
from ..errors import LocalkvError
from ..profiles import DEFAULT_POD_DELTA, POD_KIND, PROFILE_KIND, kv_scores, pod_blocks, read_pod_profile
from .base import FRACTION, TOKENS, Policy, Range


@dataclass
class POD(Policy):
    """POD (Ma et al., 2024, arXiv 2412.02252): proximal tokens over distant ones, attention shared across layers.

    Offline (`localkv calibrate --policy pod`), the attention of consecutive layers is compared per KV head
    (Jensen-Shannon) and layers are merged into blocks while the similarity is at least `delta`; the first
    layer of a block leads, the others follow it. In the cache (patch 0009), a follower keeps V for every
    token but K only for its proximal tokens (the first `sinks` and the latest `budget - sinks`); for the
    distant ones it uses its leader's logits, in one softmax with its own (the paper's parameter-free gate).
    `--budget` is that proximal size n_s + n_r; nothing is evicted, the saving is the followers' distant K.

    `pod+<policy>` (pod+snapkv, pod+ahakv, ...) also evicts: `--budget` is then that policy's tokens per KV head,
    `proximal` the proximal size, and a group (a leader and its followers) keeps one set of tokens, chosen by
    the policy's scores summed over the group; proximal tokens are always kept. Training-free here: the
    paper adapted its model by continued training, so the loss is larger than its 2.8%.
    `profile`: a POD profile file instead of the model's own.
    """

    name = "pod"
    summary = "followers keep K only for sinks + recent tokens and reuse their leader layer's logits for the rest"
    not_arguments = ("window", "span", "pool", "whole_words", "consensus", "evict")

    ranges = {"delta": FRACTION, "proximal": TOKENS, "protect": Range(0, 1 << 16)}
    file_arguments = ("profile",)

    sinks: int = 16
    delta: float = DEFAULT_POD_DELTA  # chosen from the measured curve (localkv.profiles)
    proximal: int = 0   # pod+<policy>: the proximal size n_s + n_r (0: budget/4, at least sinks + 256)
    protect: int = 0    # this many retrieval heads (SurfaceLogicKV's profile, highest first) never follow
    profile: str = ""
    evict: Policy | None = field(default=None, repr=False)  # the composed eviction policy (pod+<policy>)

    def __post_init__(self):
        self.window = 0
        if self.evict is not None:
            self.name = f"pod+{self.evict.name}"

    @property
    def keeps_all(self) -> bool:
        """Plain POD evicts nothing: every head holds the whole context (the engine sizes its heads so; the
        budget is the proximal size)."""
        return self.evict is None

    @property
    def groups_layers(self) -> bool:
        return True  # a group's layers are compressed together

    def proximal_size(self, budget: int) -> int:
        if self.evict is None:
            return budget
        # by default a quarter of the budget, and at least 256 recent tokens when the budget allows: a prefill
        # ubatch is at most the recent ring, and ubatches much shorter than 256 run slowly on a CPU
        return self.proximal or min(budget, max(self.sinks + 256, budget // 4))

    def n_recent(self, budget: int) -> int:
        return self.proximal_size(budget) - self.sinks

    def min_budget(self) -> int:
        return self.sinks + 1 if self.evict is None else self.evict.min_budget()

    def validate(self, budget):
        self.check_arguments()
        if self.evict is None:
            if budget <= self.sinks:
                raise LocalkvError(f"pod's --budget is the proximal size (sinks + recent tokens): {budget} leaves no "
                                   f"recent tokens after {self.sinks} sinks")
            return
        if self.evict.reconstructs:
            raise LocalkvError(f"{self.name}: replay hides positions a POD follower needs; it does not compose with POD")
        if self.evict.shares_layer_budget or self.evict.shares_model_budget or self.evict.prunes_always:
            raise LocalkvError(f"{self.name}: a POD group holds one set of tokens, so its heads cannot share budgets "
                               "unevenly (adaptive heads, one threshold over all heads, a score threshold)")
        self.evict.validate(budget)
        prox = self.proximal_size(budget)
        if prox <= self.sinks or prox > budget:
            raise LocalkvError(f"{self.name}: proximal size {prox} must be more than the {self.sinks} sinks and at most "
                               f"the budget {budget}")

    def needs(self, phase):
        return self.evict.needs(phase) if self.evict else set()

    def obs_window(self, phase):
        return self.evict.obs_window(phase) if self.evict else 1

    @property
    def query_heads(self):
        return bool(self.evict and self.evict.query_heads)

    def capacities(self, budget, n_layers):
        return self.evict.capacities(budget, n_layers) if self.evict else super().capacities(budget, n_layers)

    def head_capacities(self, budget, heads):
        return self.evict.head_capacities(budget, heads) if self.evict else super().head_capacities(budget, heads)

    def prepare(self, engine):
        if self.profile:
            path = Path(self.profile).expanduser()
            prof = read_pod_profile(path, shape=(len(engine.kv_layers), engine.shape.n_head_kv))
        else:
            prof, path = engine.profile(POD_KIND)
        self.profile_path = str(path)
        self.leaders = pod_blocks(np.asarray(prof["similarity"], dtype=np.float64), self.delta)  # [layers, KV heads]: the layer each head follows
        if self.protect:
            self.leaders = protect_retrieval_heads(self.leaders, engine, self.protect)
        if self.evict is not None:
            self.evict.prepare(engine)

    def attach(self, ctx):
        if self.evict:
            self.evict.attach(ctx)

    def profile_kinds(self):
        own = set() if self.profile else {POD_KIND}
        return own | ({PROFILE_KIND} if self.protect else set()) | (self.evict.profile_kinds() if self.evict else set())

    def pod_leaders(self) -> list[int]:
        """Per (layer, KV head), layer after layer: -1 for a leader, else the cached layer it follows."""
        lead = np.asarray(self.leaders)
        own = np.arange(lead.shape[0])[:, None]
        return np.where(lead == own, -1, lead).reshape(-1).tolist()

    def score(self, view):
        return self.evict.score(view)

    def after_compress(self, ctx):
        if self.evict:
            self.evict.after_compress(ctx)

    def select_layers(self, views):
        """One keep per group: the evicting policy's scores summed over a leader and its followers, proximal slots
        protected; a follower keeps exactly its leader's slots."""
        if not views:
            return []
        if self.evict is None:
            raise LocalkvError("plain pod never evicts (a bug: the cache went over an unbounded capacity)")
        lead, _k_slots, n_sink, first = capi.pod_state(views[0].ctx)
        head0 = np.concatenate([[0], np.cumsum([v.n_head_kv for v in views])])
        if [v.index for v in views] != list(range(len(views))):
            raise LocalkvError("pod compresses every layer together (a bug: some layers were left out)")

        def scores_of(v):
            sc = self.evict.final_scores(v)
            idx = np.arange(v.n_used)[None, :]
            s, r = n_sink[head0[v.index]:head0[v.index + 1]], first[head0[v.index]:head0[v.index + 1]]
            prox = (idx < s[:, None]) | ((idx >= r[:, None]) & v.valid)
            return np.where(prox, np.inf, sc)

        scores = {v.index: scores_of(v) for v in views}
        kept: dict[int, list] = {}
        for v in views:
            i = v.index
            rows = scores[i].copy()
            for h in range(v.n_head_kv):
                members = [j for j in range(i + 1, len(views)) if lead[head0[j] + h] == i]
                if lead[head0[i] + h] >= 0 or not members:
                    continue
                # a leader's row: the group's scores, each member's over its largest finite one
                rows[h] = _unit(rows[h]) + sum(_unit(scores[j][h]) for j in members)
            sel = self.evict.select(v) if not (v.head_used > v.head_capacity).any() else self.evict.top_k(rows, v)
            sel = [np.asarray(s, dtype=np.int32) for s in sel]
            for h in range(v.n_head_kv):
                if lead[head0[i] + h] >= 0:
                    sel[h] = kept[int(lead[head0[i] + h])][h]
            kept[i] = sel
        return [kept[v.index] for v in views]


def _unit(row: np.ndarray) -> np.ndarray:
    """A score row over its largest finite value (protected +inf and empty -inf stay)."""
    fin = np.isfinite(row)
    top = np.abs(row[fin]).max() if fin.any() else 1.0
    return np.where(fin, row / max(top, 1e-30), row)


def protect_retrieval_heads(leaders: np.ndarray, engine, n: int) -> np.ndarray:
    """The blocks with the n (layer, KV head)s that retrieve most (SurfaceLogicKV's needle-probe INFsc, its own
    calibrated profile) out of them: a head that copies a distant fact must see it with its own keys, and a
    leader's logits put another layer's attention there (measured in docs/results.md). A protected follower leads
    itself; the rest of its block still follows the block's leader."""
    prof, _path = engine.profile(PROFILE_KIND)
    scores = kv_scores(prof)
    out = np.array(leaders, copy=True)
    for k in np.argsort(-scores.reshape(-1), kind="stable")[:n]:
        layer, h = divmod(int(k), scores.shape[1])
        out[layer, h] = layer
    return out
