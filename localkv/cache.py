"""The compressed cache's geometry and resize rules.

`CachePlan`: the sizes fixed before the llama context exists, each computed once, with the checks that refuse
a bad one: the prompt chunk, the decode interval, the working set a prompt may use, the context llama.cpp is
created with and the most tokens a conversation may reach.

`CompressedCache`: localkv's compressed storage in a live context, per (layer, KV head) in the C API's order:
what each head keeps (its capacity), how far it may grow while a prompt goes in, what one of its slots costs,
and how it resizes: grown for the tokens that come, settled back to what it kept plus one decode interval.
It never drops a token: what to evict is the engine's and the policy's.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import capi
from .errors import LocalkvError
from .policies import DECODE, PREFILL, Policy

DEFAULT_CTX = 4096
# tokens per KV head kept between prefill chunks by default: prompts up to this length are compressed once,
# after the whole prompt (as the research methods do); longer ones in a working set of this size
DEFAULT_PREFILL_BUDGET = 4096


# attention calls per cached layer: a layer's heads are padded into at most this many runs of equal slots (the C
# side attends a run of heads with equal slots in one call, whatever each holds); more runs, fewer padded bytes
ATTENTION_PARTS = 2


def pad_slots(n: int) -> int:
    """Slots as the compressed cache allocates them (a multiple of 32, at least one)."""
    return max(32, -(-int(n) // 32) * 32)


def group_slots(slots, max_parts: int) -> list[int]:
    """One layer's per-head slots raised so that consecutive heads form at most `max_parts` runs of equal slots,
    with the fewest slots added (each run takes its largest head's): an exact split of the heads into runs."""
    s = [int(x) for x in slots]
    n = len(s)
    if n == 0 or max_parts >= n or len(set(s)) <= 1:
        return s
    # cost[a][b]: slots added when heads a..b-1 form one run
    cost = [[0] * (n + 1) for _ in range(n + 1)]
    for a in range(n):
        top = total = 0
        for b in range(a + 1, n + 1):
            top, total = max(top, s[b - 1]), total + s[b - 1]
            cost[a][b] = top * (b - a) - total
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(max_parts + 1)]  # best[k][b]: heads 0..b-1 in k runs
    cut = [[0] * (n + 1) for _ in range(max_parts + 1)]
    best[0][0] = 0
    for k in range(1, max_parts + 1):
        for b in range(1, n + 1):
            for a in range(k - 1, b):
                c = best[k - 1][a] + cost[a][b]
                if c < best[k][b]:
                    best[k][b], cut[k][b] = c, a
    k = min(range(1, max_parts + 1), key=lambda k: best[k][n])
    out, b = list(s), n
    while b > 0:
        a = cut[k][b]
        out[a:b] = [max(s[a:b])] * (b - a)
        b, k = a, k - 1
    return out


def context_limit(ctx: int | None, shape) -> int:
    """The most tokens a conversation may reach: --ctx, else what the model was trained on."""
    return ctx or shape.n_ctx_train


def full_cache_ctx(ctx: int | None, shape) -> int:
    """The size of a full (uncompressed) cache: --ctx, else DEFAULT_CTX within the model's training context."""
    return ctx or min(DEFAULT_CTX, shape.n_ctx_train)


def shares_attention(policy: Policy) -> bool:
    """Whether the policy shares attention across layers (POD: leaders and followers in the cache)."""
    return hasattr(policy, "pod_leaders")


@dataclass(frozen=True)
class CachePlan:
    """The cache's sizes, fixed before the context exists."""
    chunk: int             # prompt tokens per llama_decode (at most: a compressed prompt's chunks end on its window)
    decode_interval: int   # decoded tokens between two compressions (a head holds at most capacity + this)
    n_ctx: int             # the most tokens the conversation may reach (a full cache's size)
    n_ctx_created: int     # the context llama.cpp is created with (a compressed cache replaces its plain cache)
    n_batch: int           # tokens per ubatch
    budget: int | None         # tokens kept per KV head (compressing policies)
    prefill_budget: int | None  # tokens per KV head kept between the chunks of a long prompt


def plan_cache(policy: Policy, shape, *, budget: int | None, prefill_budget: int | None, ctx: int | None,
               chunk: int, decode_interval: int) -> CachePlan:
    """The sizes for `policy` at `budget` on a model of `shape`; LocalkvError for a combination that cannot work."""
    if not policy.compresses:
        if budget is not None and policy.name == "full":
            raise LocalkvError("--budget needs a compressing policy (full keeps everything); see `localkv policies`")
        n_ctx = full_cache_ctx(ctx, shape)
        return CachePlan(chunk=chunk, decode_interval=decode_interval, n_ctx=n_ctx, n_ctx_created=n_ctx,
                         n_batch=min(chunk * 2, n_ctx), budget=budget, prefill_budget=None)
    if budget is None:
        raise LocalkvError(f"policy {policy.name} needs --budget (tokens kept per KV head)")
    policy.validate(budget)
    limit = context_limit(ctx, shape)
    if budget > limit:
        raise LocalkvError(f"budget {budget} is larger than the context ({limit} tokens)")
    if prefill_budget == 0:  # strict: nothing beyond the budget, even while a prompt goes in
        prefill_budget = budget
    if prefill_budget is not None and prefill_budget < budget:
        raise LocalkvError(f"--prefill-budget {prefill_budget} is smaller than --budget {budget}")
    if prefill_budget is None:
        # a question-aware policy's last queries must see a long prompt to steer what it keeps; scores that need no
        # question (KVzap) lose nothing compressed chunk by chunk: the working set is the budget plus one chunk
        prefill_budget = budget if policy.query_agnostic else max(budget, DEFAULT_PREFILL_BUDGET)
    if shares_attention(policy):  # a POD follower's recent ring holds a whole ubatch
        chunk = min(chunk, policy.n_recent(budget))
    # room for the largest layer's prefill working set plus one chunk; positions may go far beyond it
    # (the plain cache made here is replaced by the compressed one at once: plain POD's is minimal)
    created = 2 * chunk if policy.keeps_all else max(policy.capacities(prefill_budget, shape.n_layer)) + chunk
    return CachePlan(chunk=chunk, decode_interval=max(1, min(decode_interval, chunk)), n_ctx=limit,
                     n_ctx_created=created, n_batch=chunk, budget=budget, prefill_budget=prefill_budget)


class CompressedCache:
    """The compressed cache of one context: its per-head layout and its resize rules."""

    def __init__(self, ctx, policy: Policy, plan: CachePlan, kv_heads: list[int]):
        """Switch the context's cache to localkv's compressed storage; `policy` is prepared (it knows the model)."""
        self.ctx, self.policy, self.plan = ctx, policy, plan
        n_layers = len(kv_heads)
        # cached layer of every (layer, KV head) in the C API's per-head order, and each layer's first head
        self.head_layer = np.repeat(np.arange(n_layers), kv_heads)
        self.head0 = np.concatenate([[0], np.cumsum(kv_heads)]).astype(int)
        # plain POD evicts nothing: every head's capacity is the whole context (its budget is the proximal size)
        kept = plan.n_ctx if policy.keeps_all else plan.budget
        kept_in_prefill = plan.n_ctx if policy.keeps_all else plan.prefill_budget
        self.capacities = policy.capacities(kept, n_layers)
        self.head_capacities = np.asarray(policy.head_capacities(kept, kv_heads), dtype=np.int64)
        self.prefill_capacities = np.asarray(policy.head_capacities(kept_in_prefill, kv_heads), dtype=np.int64)
        # what a head may hold while a prompt goes in: the prefill budget at least (a prompt that fits it is
        # compressed once, after all of it was read, even in a head whose share is smaller), plus a chunk
        self.prefill_limits = np.maximum(self.prefill_capacities, plan.prefill_budget) + plan.chunk
        # C's capacity is the budget (AhaKV's k); the slots start at one decode interval and grow as tokens come
        # (see grow_for), so a short chat never holds more than a full cache would
        capi.enable(ctx, self.head_capacities, [plan.decode_interval] * len(self.head_capacities))
        policy.attach(ctx)
        self._count_slot_bytes()
        self.peak_bytes = capi.memory_bytes(ctx)  # the most the buffers have held (a long prompt's working set)
        self.reallocations = 0  # resizes (growing for a prompt, shrinking at rest)
        # attention calls per layer (see ATTENTION_PARTS); a POD follower attends on its own, so POD pads nothing
        self.max_parts = max(kv_heads, default=1) if shares_attention(policy) else ATTENTION_PARTS
        self._requested = None  # the slots last asked for (the C side may pad them further, to 256 on a GPU)
        self.decoded = 0  # tokens decoded (a policy that prunes always compresses every decode interval)

    def _count_slot_bytes(self) -> None:
        """slot_bytes: what one slot of each head costs (K + V, as llama.cpp allocated them); pod_k_bytes: a POD
        follower's K, a fixed ring instead of a row per slot (its slot then holds V only)."""
        kv_bytes = np.array([(kb, vb) for _il, kb, vb in capi.kv_layers(self.ctx)], dtype=np.float64)
        layer_slots = np.bincount(self.head_layer, weights=capi.cache_state(self.ctx)[1])
        self.slot_bytes = (kv_bytes.sum(axis=1) / layer_slots)[self.head_layer]
        self.pod_k_bytes = np.zeros(len(self.slot_bytes))
        if shares_attention(self.policy):
            k_slot = (kv_bytes[:, 0] / layer_slots)[self.head_layer]  # read before set_pod shrinks the followers' K
            capi.set_pod(self.ctx, self.policy.pod_leaders(), self.policy.sinks, self.policy.n_recent(self.plan.budget))
            lead, k_slots, _s, _r = capi.pod_state(self.ctx)
            self.slot_bytes = np.where(lead >= 0, self.slot_bytes - k_slot, self.slot_bytes)
            self.pod_k_bytes = np.where(lead >= 0, k_slot * k_slots, 0.0)

    def heads_of(self, i: int) -> slice:
        """The entries of cached layer i in per-head arrays."""
        return slice(self.head0[i], self.head0[i + 1])

    # ---------------------------------------------------------------- resizing

    def layout(self, slots) -> list[int]:
        """Per-head slots as they are allocated: padded to 32, and each layer's heads grouped into at most
        max_parts runs of equal slots."""
        padded = [pad_slots(s) for s in slots]
        out: list[int] = []
        for i in range(len(self.head0) - 1):
            out += group_slots(padded[self.head0[i]:self.head0[i + 1]], self.max_parts)
        return out

    def resize(self, slots, alloc) -> None:
        """Reallocate every head to `slots` (laid out as the C side attends them) unless that changes nothing."""
        slots = self.layout(slots)
        if slots != self._requested and not (self._requested is None and slots == [int(a) for a in alloc]):
            capi.resize(self.ctx, self.head_capacities, slots)
            self._requested = slots
            self.reallocations += 1
            self.peak_bytes = max(self.peak_bytes, capi.memory_bytes(self.ctx))

    def grow(self, n: int) -> None:
        """Slots for n more tokens in every head, whatever the limits (nothing is evicted to make room)."""
        _cap, alloc, used = capi.cache_state(self.ctx)
        if (used + n > alloc).any():
            self.resize(np.maximum(alloc, used + n), alloc)

    def grow_for(self, n: int, phase: str) -> bool:
        """Grow the heads toward room for n more tokens, within the phase's limit; False when all had room.

        Up to the tokens held + n + one chunk, never past the limit (the prefill working set + one chunk while a
        prompt goes in, the budget + the decode interval while decoding), so the cache never holds more than the
        tokens seen plus one chunk and reallocates at most once per chunk of tokens. Whatever still does not
        fit, a compression must make room for.
        """
        _cap, alloc, used = capi.cache_state(self.ctx)
        if (used + n <= alloc).all():
            return False
        interval = self.plan.decode_interval
        limits = self.prefill_limits if phase == PREFILL else self.head_capacities + interval
        if phase == DECODE and self.policy.shares_model_budget:
            # heads keep different counts under one total: each may grow by an interval (step() holds the total)
            limits = np.maximum(limits, used + interval)
        self.resize(np.maximum(alloc, np.minimum(limits, used + n + self.plan.chunk)), alloc)
        return True

    def settle(self, room: int | None = None) -> None:
        """At rest (between turns, while decoding): each head holds what it kept plus one decode interval (or `room`)."""
        _cap, alloc, used = capi.cache_state(self.ctx)
        self.resize(used + (self.plan.decode_interval if room is None else room), alloc)

    def size_at_rest(self, tokens: int) -> None:
        """Size an empty cache as it is at rest after `tokens` tokens (a real allocation, for the memory report)."""
        self.resize(np.minimum(self.head_capacities, tokens) + self.plan.decode_interval,
                    capi.cache_state(self.ctx)[1])

    # ---------------------------------------------------------------- when to compress

    def compresses_before(self, n: int, n_next: int) -> bool:
        """Whether, after n more prompt tokens, the next n_next would need a compression first (grow_for's rule:
        the slots cannot grow past the prefill working set plus one chunk)."""
        _cap, _alloc, used = capi.cache_state(self.ctx)
        limits = np.array([pad_slots(x) for x in self.prefill_limits])
        return bool((used + n + n_next > limits).any())

    def decode_interval_full(self) -> bool:
        """Whether decoding has filled a decode interval past the capacities: time to compress back."""
        if self.policy.prunes_always:  # every decode interval, whatever the heads hold
            self.decoded += 1
            return self.decoded % self.plan.decode_interval == 0
        used = capi.cache_state(self.ctx)[2]
        return bool(self.layers_over(used, self.head_capacities + self.plan.decode_interval - 1))

    def layers_over(self, used, targets, limits=None) -> list[int]:
        """The cached layers the policy must compress to bring `used` to `targets`: a head over its target, or,
        for a policy whose heads share their layer's budget, the layer's total over its total or a head past
        its limit (vectorised: step() asks after every token)."""
        first = self.head0[:-1]
        if self.policy.prunes_always:  # a score threshold prunes every layer at every compression point
            return list(range(len(first)))
        if self.policy.shares_model_budget or self.policy.groups_layers:
            over = used.sum() > targets.sum() or (limits is not None and bool((used > limits).any()))
            return list(range(len(first))) if over else []
        if self.policy.shares_layer_budget:
            over = np.add.reduceat(used, first) > np.add.reduceat(targets, first)
            if limits is not None:
                over |= np.logical_or.reduceat(used > limits, first)
        else:
            over = np.logical_or.reduceat(used > targets, first)
        return np.flatnonzero(over).tolist()

    # ---------------------------------------------------------------- bytes

    def working_set_bytes(self, tokens: int) -> int:
        """KV bytes the cache holds while a prompt of `tokens` tokens goes in (its largest size)."""
        chunk = self.plan.chunk
        if self.policy.reconstructs:
            # what was kept before the last span, the span, and its replay (a prefix of under 64 tokens)
            span = min(tokens, self.policy.replay_chunk)
            slots = [min(cap, tokens - span) + 2 * span + 64 + 1 for cap in self.head_capacities]
            return int(sum(b * n for b, n in zip(self.slot_bytes, self.layout(slots))))
        slots = [min(limit, tokens + chunk) for limit in self.prefill_limits]
        if self.policy.keeps_all:
            slots = [tokens for _ in slots]  # one reallocation for the whole prompt
        return int(sum(b * n for b, n in zip(self.slot_bytes, self.layout(slots))) + self.pod_k_bytes.sum())
