"""The shared selection and budget layer every policy builds on.

A policy is a dataclass whose fields are its hyper-parameters. It says which
statistics the engine must compute (`needs`), how a total budget is shared out
over layers (`capacities`), and how much each kept token is worth (`score`,
per KV head and slot). Everything else is shared here: the tokens that are
always kept (the first `sinks` and the last `window` positions), what keeps
multi-token facts whole (max-pooling the final score over `pool` slots, giving
every token of a word the best score of its word with `whole_words`, or
fixed spans of `span` positions), and the top-k itself.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import ClassVar

import numpy as np

from .. import capi
from ..errors import LocalkvError

PREFILL = "prefill"
DECODE = "decode"

MAX_TOKENS = 1 << 24  # the most tokens an argument may count (far past any context a model is trained for)


class PolicyArgError(LocalkvError):
    """A policy argument of the wrong type or out of its range; `arg` names it (the server's 400 says which)."""

    def __init__(self, arg: str, message: str):
        super().__init__(message)
        self.arg = arg


@dataclass(frozen=True)
class Range:
    """The values a numeric policy argument may take: lo <= x <= hi (x < hi with hi_open). NaN is never in."""

    lo: float
    hi: float
    hi_open: bool = False

    def __contains__(self, x) -> bool:
        return self.lo <= x and (x < self.hi if self.hi_open else x <= self.hi)

    def __str__(self) -> str:
        def num(x):
            return str(int(x)) if float(x).is_integer() else str(x)
        return f"[{num(self.lo)}, {num(self.hi)}{')' if self.hi_open else ']'}"


TOKENS = Range(0, MAX_TOKENS)       # a count of positions
KERNEL = Range(1, 4096)             # a pooling width in slots
FRACTION = Range(0.0, 1.0)


class StatReader:
    """The statistics of one compression, read for every layer at once: one call (one transfer per device) per
    statistic, however many layers the policy reads, instead of one per layer."""

    def __init__(self, ctx, n_head: int, kv_heads: list[int], used: np.ndarray):
        self.ctx, self.n_head, self.kv_heads, self.used = ctx, n_head, list(kv_heads), np.asarray(used)
        self._read: dict[tuple[int, bool], list[np.ndarray]] = {}

    def layer(self, i: int, kind: int, per_kv_head: bool) -> np.ndarray:
        key = (kind, per_kv_head)
        if key not in self._read:
            heads = [kv if (per_kv_head or kind in capi.WRITTEN_WITH_TOKEN) else self.n_head for kv in self.kv_heads]
            self._read[key] = capi.get_stats(self.ctx, kind, heads, self.used, per_kv_head)
        return self._read[key][i]


@dataclass
class LayerView:
    """What a policy sees of one cached layer when the engine compresses it."""

    ctx: object = field(repr=False)
    index: int          # cached-layer index (0..n_layers-1)
    layer: int          # model layer
    n_layers: int
    n_head: int         # query heads
    n_head_kv: int
    capacity: int | np.ndarray  # tokens to keep: one count for every KV head, or [n_head_kv]
    positions: np.ndarray  # [n_head_kv, n_used] token positions in the slots (-1 past a head's own count)
    n_seen: int         # tokens of the sequence so far (the next position)
    phase: str          # PREFILL or DECODE
    words: np.ndarray | None = None  # [n_head_kv, n_used] word id of each slot's token (localkv.words)
    used: np.ndarray | None = None   # [n_head_kv] slots each head holds (None: all n_used)
    limit: np.ndarray | None = None  # [n_head_kv] the most a head may keep (its slots less the room asked for)
    reader: StatReader | None = field(default=None, repr=False)  # every layer's statistics of this compression
    _stats: dict = field(default_factory=dict, repr=False)

    @property
    def n_used(self) -> int:
        """Slots of the fullest head (the width of positions and of every statistic)."""
        return self.positions.shape[1]

    @property
    def head_used(self) -> np.ndarray:
        return np.full(self.n_head_kv, self.n_used) if self.used is None else np.asarray(self.used)

    @property
    def head_capacity(self) -> np.ndarray:
        return np.broadcast_to(np.asarray(self.capacity), (self.n_head_kv,))

    @property
    def valid(self) -> np.ndarray:
        """[n_head_kv, n_used] True where a head holds a token (heads may hold different numbers)."""
        return np.arange(self.n_used)[None, :] < self.head_used[:, None]

    @property
    def ragged(self) -> bool:
        """Whether the heads hold or keep different numbers of tokens."""
        return len(set(self.head_used.tolist())) > 1 or len(set(self.head_capacity.tolist())) > 1

    def stat(self, kind: int, per_kv_head: bool = True) -> np.ndarray:
        """A statistic of this layer: [n_head_kv or n_head, n_used] float32 (read once, then cached)."""
        key = (kind, per_kv_head)
        if key not in self._stats and self.reader is not None:
            self._stats[key] = self.reader.layer(self.index, kind, per_kv_head)
        elif key not in self._stats:
            heads = self.n_head_kv if (per_kv_head or kind in capi.WRITTEN_WITH_TOKEN) else self.n_head
            self._stats[key] = capi.get_stat(self.ctx, self.index, kind, heads, per_kv_head, used=self.head_used)
        return self._stats[key]


def max_pool(x: np.ndarray, kernel: int) -> np.ndarray:
    """Max over a centred window of `kernel` slots along the last axis (SnapKV's pooling; same length out)."""
    if kernel <= 1:
        return x
    pad = kernel // 2
    padded = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(pad, kernel - 1 - pad)], mode="constant", constant_values=-np.inf)
    windows = np.lib.stride_tricks.sliding_window_view(padded, kernel, axis=-1)
    return windows.max(axis=-1)


def avg_pool(x: np.ndarray, kernel: int) -> np.ndarray:
    """Mean over a centred window of `kernel` slots along the last axis, zero-padded (AvgPool1d, same length)."""
    if kernel <= 1:
        return x
    pad = kernel // 2
    padded = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(pad, kernel - 1 - pad)], mode="constant")
    return np.lib.stride_tricks.sliding_window_view(padded, kernel, axis=-1).mean(axis=-1)


@dataclass
class Policy:
    """Base policy: keeps sinks and the recent window, then the best-scoring tokens up to the capacity."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    compresses: ClassVar[bool] = True
    query_heads: ClassVar[bool] = False  # statistics per query head instead of summed per KV head
    not_arguments: ClassVar[tuple[str, ...]] = ()  # inherited fields that do not apply to this policy
    # the range of every numeric argument, declared by the class that adds it (merged over the class's bases;
    # tests/test_policies.py checks that every numeric argument of every policy has one)
    ranges: ClassVar[dict[str, Range]] = {"sinks": TOKENS, "window": TOKENS, "span": KERNEL, "pool": KERNEL,
                                          "consensus": FRACTION}
    file_arguments: ClassVar[tuple[str, ...]] = ()  # arguments that name a file (never taken from a request)

    sinks: int = 0       # the first `sinks` positions of the sequence are always kept
    window: int = 32     # the last `window` positions are always kept
    span: int = 1        # >1: spans of this many consecutive positions are scored by their best token, kept whole
    pool: int = 1        # >1: max-pool the final score over this many slots (a hit keeps its neighbours)
    whole_words: bool = True  # every token of a word gets the word's best score (keeps "cobalt-7391" whole)
    consensus: float = 0.0    # >0: a word kept in this fraction of the (layer, KV head)s is kept in all

    # --- what a policy overrides -------------------------------------------------------------

    def needs(self, phase: str) -> set[int]:
        """Statistics (capi.STAT_*) the engine must compute during `phase`."""
        return set()

    def obs_window(self, phase: str) -> int:
        """How many of each ubatch's last queries the statistics observe."""
        return max(self.window, 1)

    def capacities(self, budget: int, n_layers: int) -> list[int]:
        """Per-layer capacity for an average of `budget` tokens per KV head (uniform by default)."""
        return [budget] * n_layers

    def head_capacities(self, budget: int, heads: list[int]) -> list[int]:
        """Capacity of every (layer, KV head), layer after layer (`heads`: KV heads per layer); by default each
        head gets its layer's share."""
        return [c for c, h in zip(self.capacities(budget, len(heads)), heads) for _ in range(h)]

    def score(self, view: LayerView) -> np.ndarray:
        """[n_head_kv, n_used] value of each kept token; higher is kept first."""
        raise NotImplementedError

    def after_compress(self, ctx) -> None:
        """Called once after every compression (e.g. to restart an accumulation)."""

    def prepare(self, engine) -> None:
        """Called once by the engine before it asks for capacities (a policy that needs the model's calibrated
        profile reads it here: engine.profile(kind))."""

    def attach(self, ctx) -> None:
        """Called once the compressed cache exists, before anything is fed (a policy whose scores the graph computes
        hands its weights over here)."""

    @property
    def prunes_always(self) -> bool:
        """Whether every compression point prunes (a score threshold: memory follows the content), not only when a
        head is over its budget."""
        return False

    query_agnostic: ClassVar[bool] = False  # scores need no question: a long prompt is compressed chunk by chunk
    replay_stat: ClassVar[int] = capi.STAT_MAX  # what a replay (reconstructs) computes

    def profile_kinds(self) -> set[str]:
        """The calibrated profiles (localkv.profiles kinds) `prepare` will ask the engine for."""
        return set()

    @property
    def shares_layer_budget(self) -> bool:
        """Whether a layer's heads share its total budget (compress when the layer's total is over, not a head)."""
        return False

    @property
    def reconstructs(self) -> bool:
        """Whether the engine replays every span of the prompt to score it by reconstruction (KVzip's STAT_MAX;
        Engine.reconstruct), in spans of `replay_chunk` tokens."""
        return False

    replay_chunk: ClassVar[int] = 2048  # tokens rebuilt by one replay (KVzip: about 2K)

    def ranked_score(self, view: LayerView) -> np.ndarray:
        """What the top-k ranks before keep_whole: the policy's score (see HeadAdaptive.replay)."""
        return self.score(view)

    @property
    def shares_model_budget(self) -> bool:
        """Whether every head of the model shares one total budget (compress every layer when it is over)."""
        return False

    @property
    def groups_layers(self) -> bool:
        """Whether layers are kept in groups (POD's blocks): every layer is compressed when one is over."""
        return False

    @property
    def keeps_all(self) -> bool:
        """Whether the policy compresses without evicting (plain POD): every head holds the whole context."""
        return False

    # --- shared -----------------------------------------------------------------------------

    def min_budget(self) -> int:
        return self.sinks + self.window

    def validate(self, budget: int) -> None:
        self.check_arguments()
        if budget < self.min_budget():
            raise LocalkvError(
                f"budget {budget} is smaller than what {self.name} always keeps "
                f"(sinks {self.sinks} + window {self.window} = {self.min_budget()})")

    @classmethod
    def argument_ranges(cls) -> dict[str, Range]:
        """Every numeric argument's range: the declarations of the class and its bases, nearest last."""
        out: dict[str, Range] = {}
        for klass in reversed(cls.__mro__):
            out.update(vars(klass).get("ranges", {}))
        return out

    def check_arguments(self) -> None:
        """Each argument has its declared type and lies in its range: PolicyArgError naming the first that does
        not. The one check the CLI, the Python API and the server share (policies.create and validate call it)."""
        ranges = self.argument_ranges()
        for name, kind, _default in self.arguments():
            value = getattr(self, name)
            if kind is bool or kind is str:
                if not isinstance(value, kind):
                    raise PolicyArgError(name, f"policy argument {name} must be a {kind.__name__}, got {value!r}")
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                    (kind is int and not float(value).is_integer()):
                raise PolicyArgError(name, f"policy argument {name} must be a {kind.__name__}, got {value!r}")
            if value not in ranges[name]:
                raise PolicyArgError(name, f"policy argument {name}={value!r} is out of range: "
                                           f"{self.name} takes {name} in {ranges[name]}")

    def protected(self, view: LayerView) -> np.ndarray:
        """[n_head_kv, n_used] True for the sinks and the recent window."""
        pos = view.positions
        return (pos < self.sinks) | (pos >= view.n_seen - self.window)

    def select(self, view: LayerView):
        """Sorted slots to keep in each KV head (all it holds if they fit): a [n_head_kv, capacity] array, or one
        array per head when the heads hold or keep different numbers."""
        if (view.head_used <= view.head_capacity).all():
            if not view.ragged:
                return np.tile(np.arange(view.n_used, dtype=np.int32), (view.n_head_kv, 1))
            return [np.arange(u, dtype=np.int32) for u in view.head_used]
        return self.top_k(self.final_scores(view), view)

    def top_k(self, scores: np.ndarray, view: LayerView):
        """The best slots of each head; words (or spans) are taken whole, so the cut never splits one."""
        groups = view.words if self.whole_words and view.words is not None else \
            view.positions // self.span if self.span > 1 else None

        def best(sc, k, g):
            return top_k_slots(sc, k) if g is None else top_k_groups(sc, k, g)

        if not view.ragged:
            return best(scores, min(int(view.head_capacity[0]), view.n_used), groups)
        out = []
        for h, (u, k) in enumerate(zip(view.head_used.tolist(), view.head_capacity.tolist())):
            out.append(best(scores[h:h + 1, :u], min(k, u), None if groups is None else groups[h:h + 1, :u])[0])
        return out

    def final_scores(self, view: LayerView) -> np.ndarray:
        """[n_head_kv, n_used] what the top-k ranks: the policy's score, kept whole, protected slots at +inf
        (and -inf past a head's own count)."""
        scores = np.asarray(self.ranked_score(view), dtype=np.float64)
        scores = np.where(np.isnan(scores), -np.inf, scores)
        valid = view.valid
        scores = self.keep_whole(np.where(valid, scores, -np.inf), view)
        return np.where(valid, np.where(self.protected(view), np.inf, scores), -np.inf)

    def select_layers(self, views: list[LayerView]) -> list[np.ndarray]:
        """Slots to keep for every layer compressed together.

        With `consensus` > 0, a word that the per-layer selection keeps in at least that fraction of the
        (layer, KV head)s holding it is kept in all of them: a fact kept in most layers but dropped in a
        few comes back with pieces missing (the layers that copy it lost it).
        """
        if self.consensus <= 0 or any(v.words is None for v in views):
            return [self.select(v) for v in views]
        scores = [self.final_scores(v) if (v.head_used > v.head_capacity).any() else None for v in views]
        kept_in: dict[int, int] = {}
        held_in: dict[int, int] = {}
        for v, sc in zip(views, scores):
            keep = self.top_k(sc, v) if sc is not None else None
            for h in range(v.n_head_kv):
                words = v.words[h][:v.head_used[h]]
                held = np.unique(words[words >= 0])
                kept = held if keep is None else np.unique(words[keep[h]][words[keep[h]] >= 0])
                for w in held.tolist():
                    held_in[w] = held_in.get(w, 0) + 1
                for w in kept.tolist():
                    kept_in[w] = kept_in.get(w, 0) + 1
        agreed = np.array([w for w, n in held_in.items() if kept_in.get(w, 0) >= self.consensus * n], dtype=np.int64)
        out = []
        for v, sc in zip(views, scores):
            if sc is None:
                out.append(self.select(v))
                continue
            # agreed words rank above every other score; protected slots stay first (inf beats the boost)
            boosted = np.where(np.isin(v.words, agreed) & np.isfinite(sc), np.finfo(np.float64).max, sc)
            out.append(self.top_k(boosted, v))
        return out

    def keep_whole(self, scores: np.ndarray, view: LayerView) -> np.ndarray:
        """The shared step that keeps multi-token facts whole: pooling, spans, words (each optional)."""
        scores = max_pool(scores, self.pool)
        if self.span > 1:
            scores = group_max(scores, view.positions // self.span)
        if self.whole_words and view.words is not None:
            scores = group_max(scores, view.words)
        return scores

    @classmethod
    def paper_exact(cls) -> dict[str, object]:
        """The --policy-arg values that give the paper's own selection (token-level top-k, no extra pooling)."""
        defaults = {f.name: f.default for f in fields(cls)}
        exact = {"whole_words": False, "pool": 1, "span": 1, "consensus": 0.0}
        return {k: v for k, v in exact.items() if defaults[k] != v}

    @classmethod
    def arguments(cls) -> list[tuple[str, type, object]]:
        """(name, type, default) of every hyper-parameter."""
        return [(f.name, f.type if isinstance(f.type, type) else type(f.default), f.default) for f in fields(cls)
                if f.name not in cls.not_arguments]


@dataclass
class HeadAdaptive(Policy):
    """A score-based policy whose heads can share their layer's budget by score (AdaKV's idea).

    With `adaptive`, a layer keeps its best `sum of its heads' capacities` tokens over all its KV heads
    together: every head first keeps its protected tokens and at least `adaptive_floor` x its capacity of its
    own best, then the rest of the layer's budget goes to the best remaining scores wherever they are, so a
    head that attends to a few tokens gives its share to one that spreads. Scores are compared across heads
    as they are (each head's attention rows sum to one, so their scales agree). The total kept per layer, and
    so the bytes, are those of the uniform split.
    """

    ranges = {"adaptive_floor": FRACTION}

    adaptive: bool = False
    adaptive_floor: float = 0.2
    # replay every span (KVzip's reconstruction) and keep a token that either the replay or the policy's own
    # score needs: the rank is the larger of the two, each divided by its head's largest
    replay: bool = False

    @property
    def reconstructs(self):
        return self.replay

    def ranked_score(self, view):
        own = np.asarray(self.score(view), dtype=np.float64)
        if not self.replay:
            return own
        rebuilt = view.stat(capi.STAT_MAX).astype(np.float64)
        top = lambda x: np.maximum(np.where(view.valid, x, 0).max(axis=1, keepdims=True), 1e-30)  # noqa: E731
        return np.maximum(own / top(own), rebuilt / top(rebuilt))

    @property
    def shares_layer_budget(self):
        return self.adaptive

    def select(self, view):
        if not self.adaptive:
            return super().select(view)
        limit = view.head_used if view.limit is None else np.minimum(view.limit, view.head_used)
        if view.head_used.sum() <= view.head_capacity.sum() and (view.head_used <= limit).all():
            return [np.arange(u, dtype=np.int32) for u in view.head_used]
        return self.top_k(self.final_scores(view), view)

    def top_k(self, scores, view):
        if not self.adaptive:
            return super().top_k(scores, view)
        counts = adaptive_counts(scores, view.head_used, view.head_capacity, self.adaptive_floor,
                                 view.head_used if view.limit is None else view.limit)
        return super().top_k(scores, replace(view, capacity=counts))


def select_one_threshold(policy: Policy, views: list[LayerView], floor: float) -> list:
    """One threshold over every layer and KV head (KVzip's and KVzap's budget mode): the total kept is the sum of
    the heads' capacities, each head first keeping its protected slots and `floor` x its capacity (AdaKV's sharing
    of a layer's budget, over every head of the model at once). Scores must be comparable across layers."""
    scores = [policy.final_scores(v) for v in views]
    heads = [(vi, h) for vi, v in enumerate(views) for h in range(v.n_head_kv)]
    used = np.array([views[vi].head_used[h] for vi, h in heads], dtype=np.int64)
    cap = np.array([views[vi].head_capacity[h] for vi, h in heads], dtype=np.int64)
    limit = np.array([views[vi].head_used[h] if views[vi].limit is None else views[vi].limit[h]
                      for vi, h in heads], dtype=np.int64)
    flat = np.full((len(heads), max(used.max(initial=0), 1)), -np.inf)
    for k, (vi, h) in enumerate(heads):
        flat[k, :used[k]] = scores[vi][h, :used[k]]
    counts = adaptive_counts(flat, used, cap, floor, limit)
    out, k = [], 0
    for vi, v in enumerate(views):
        out.append(policy.top_k(scores[vi], replace(v, capacity=counts[k:k + v.n_head_kv])))
        k += v.n_head_kv
    return out


def adaptive_counts(scores: np.ndarray, used: np.ndarray, capacity: np.ndarray, floor: float,
                    limit: np.ndarray) -> np.ndarray:
    """Tokens each head keeps when the heads of a layer share sum(capacity) by score.

    Each head first takes its +inf (protected) slots and ceil(floor x capacity) of its best; the rest of the
    total goes to the best remaining slots of any head, no head past min(limit, used).
    """
    used = np.asarray(used, dtype=np.int64)
    limit = np.minimum(np.asarray(limit, dtype=np.int64), used)
    total = min(int(np.asarray(capacity).sum()), int(limit.sum()))
    order = [np.argsort(-scores[h, :u], kind="stable") for h, u in enumerate(used.tolist())]
    protected = np.array([int(np.isposinf(scores[h, :u]).sum()) for h, u in enumerate(used.tolist())])
    base = np.minimum(limit, np.maximum(protected, np.ceil(floor * np.asarray(capacity)).astype(np.int64)))
    if base.sum() > total:  # the floors alone overflow (a tiny budget): shrink the largest first
        for _ in range(int(base.sum() - total)):
            base[int(np.argmax(base))] -= 1
    rest = total - int(base.sum())
    # every head's slots past its floor, best first, pooled: the best `rest` of them win
    cand_score = np.concatenate([scores[h, o[b:lim]] for h, (o, b, lim) in enumerate(zip(order, base, limit))])
    cand_head = np.concatenate([np.full(max(lim - b, 0), h) for h, (b, lim) in enumerate(zip(base, limit))])
    won = cand_head[np.argsort(-cand_score, kind="stable")[:rest]]
    return base + np.bincount(won, minlength=len(used)).astype(np.int64)


def top_k_slots(scores: np.ndarray, k: int) -> np.ndarray:
    """Per row, the k highest-scoring slots (ties: the earlier slot), sorted ascending."""
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.sort(order, axis=1).astype(np.int32)


def top_k_groups(scores: np.ndarray, k: int, groups: np.ndarray) -> np.ndarray:
    """Per row, k slots taken a group at a time, best group first; +inf (protected) slots always.

    Every slot of a group shares the group's best score, so a plain top-k would cut the last group it reaches
    in two (a fact with its tail missing). A group that no longer fits is passed over for the next one that does;
    only when no whole group fits what is left are single slots taken, best first.
    """
    n = scores.shape[1]
    out = np.empty((scores.shape[0], k), dtype=np.int32)
    for h in range(scores.shape[0]):
        order = np.argsort(-scores[h], kind="stable")
        take = np.zeros(n, dtype=bool)
        take[order[:k][np.isposinf(scores[h][order[:k]])]] = True
        left = k - int(take.sum())
        rest = order[~take[order]]
        # groups in the order their best slot ranks, with their sizes
        ids, first, inverse, sizes = np.unique(groups[h][rest], return_index=True, return_inverse=True,
                                               return_counts=True)
        ranked = np.argsort(first, kind="stable")
        fits = np.searchsorted(np.cumsum(sizes[ranked]), left, side="right")  # these groups fit one after another
        chosen = np.zeros(len(ids), dtype=bool)
        chosen[ranked[:fits]] = True
        left -= int(sizes[ranked[:fits]].sum())
        for g in ranked[fits:]:
            if left == 0:
                break
            if sizes[g] <= left:
                chosen[g] = True
                left -= int(sizes[g])
        take[rest[chosen[inverse.reshape(-1)]]] = True
        if left:  # nothing whole fits the rest: the best single slots
            take[order[~take[order]][:left]] = True
        out[h] = np.flatnonzero(take)
    return out


def group_max(scores: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Per row, give every slot the best score of the slots with the same group id (a group is kept or dropped whole)."""
    out = np.empty_like(scores)
    for h in range(scores.shape[0]):
        ids, inverse = np.unique(groups[h], return_inverse=True)
        best = np.full(len(ids), -np.inf, dtype=scores.dtype)
        np.maximum.at(best, inverse, scores[h])
        out[h] = best[inverse]
    return out
