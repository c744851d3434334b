"""The engine: one model, one context, one generation loop with compression.

    eng = Engine(policy="snapkv", budget=384)
    res = eng.generate("What is the capital of France?", max_tokens=32)
    print(res.text, res.kv_bytes_allocated)

With a compressing policy the context's KV cache is switched to localkv's
compressed storage: every layer holds `capacity + chunk` slots. A prompt goes
in chunks; before a chunk that would not fit, and after the whole prompt, the
policy picks what each (layer, KV head) keeps. While decoding, the cache is
compressed back to the budget every `decode_interval` tokens, so memory stays
bounded for any prompt or conversation length.
"""
from __future__ import annotations

import os
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

from . import capi, models, policies
from .errors import LocalkvError
from .llama import TYPE_BYTES, Model, Sampler, Utf8Stream, cache_type, init_backend, last_log_error, ll
from .policies import DECODE, PREFILL, LayerView
from .words import WordIndex

DEFAULT_CTX = 4096
DEFAULT_CHUNK = 256
# tokens per KV head kept between prefill chunks by default: prompts up to this length are compressed once,
# after the whole prompt (as the research methods do); longer ones in a working set of this size
DEFAULT_PREFILL_BUDGET = 4096


# statistics every ubatch overwrites (its observation window), unlike the accumulated ones (capi.STAT_*)
WINDOWED_STATS = frozenset({capi.STAT_OBS, capi.STAT_OBS_ADAPTIVE, capi.STAT_LAST})


def pad_slots(n: int) -> int:
    """Slots as the compressed cache allocates them (a multiple of 32, at least one)."""
    return max(32, -(-int(n) // 32) * 32)


def peak_rss_bytes() -> int:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb if sys.platform == "darwin" else kb * 1024


@dataclass
class GenerationResult:
    text: str
    policy: str
    budget: int | None
    prompt_tokens: int
    generated_tokens: int
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    first_token_latency_s: float
    kv_bytes_allocated: int     # KV buffers llama.cpp holds now (at rest: budget + decode interval at most)
    kv_bytes_prefill: int       # the most the KV buffers held so far (a long prompt's working set)
    kv_bytes_full_f16: int
    kv_tokens_kept: int
    kv_stats_bytes: int
    compute_bytes: int
    peak_rss_bytes: int
    compressions: int
    compress_seconds: float
    compress_bytes: int         # bytes compression moved between host and backend (indices, scores read)
    stop_reason: str
    cache_type_k: str
    cache_type_v: str
    model: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LayerMemory:
    layer: int
    k_bytes: int
    v_bytes: int
    capacity: int | None = None  # tokens per KV head (compressed: its largest head) or context size (full)
    used: int | None = None
    head_capacities: list[int] | None = None  # compressed: per KV head
    head_used: list[int] | None = None
    head_leaders: list[int] | None = None  # POD: per KV head, the layer it follows (-1: it leads or is alone)
    head_k_slots: list[int] | None = None  # POD: K slots per KV head (a follower's proximal ring)


@dataclass
class MemoryReport:
    model: str
    policy: str
    budget: int | None
    ctx: int
    tokens: int                 # tokens the figures below are for
    cache_type_k: str
    cache_type_v: str
    kv_bytes_allocated: int     # from llama.cpp's memory breakdown (at rest: budget + decode interval at most)
    kv_bytes_prefill: int       # the KV buffers while a prompt of `tokens` goes in (the prefill working set)
    kv_bytes_full_f16: int      # a full f16 cache for `tokens`
    kv_bytes_full_q8_0: int
    kv_bytes_full_q4_0: int
    kv_stats_bytes: int
    compute_bytes: int
    layers: list[LayerMemory] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


class Engine:
    """A model and a context configured for one policy and budget."""

    def __init__(self, model: str | None = None, *, policy: str | policies.Policy = "full", budget: int | None = None,
                 policy_args: dict[str, str] | None = None, ctx: int | None = None,
                 prefill_budget: int | None = None,
                 cache_type_k: str = "f16", cache_type_v: str = "f16", chunk: int = DEFAULT_CHUNK,
                 decode_interval: int = 32, threads: int | None = None, flash_attn: bool | None = None,
                 verbose: bool = False, progress: bool | None = None, eval_callback=None,
                 shared_model: Model | None = None, gpu_layers: int = -1):
        """`shared_model`: a loaded Model to run on instead of loading `model` again (several contexts on one
        model, as the server's conversation pool does); the caller keeps it open and closes it.
        `gpu_layers`: layers offloaded to a GPU backend when one was built (llama.cpp's convention: -1 all,
        0 none); their K/V caches, compressed ones included, live on the GPU with them."""
        init_backend(verbose)
        # a name (the CLI), or a Policy instance (the Python API: a subclass with its own per-head budgets)
        self.policy = policy if isinstance(policy, policies.Policy) else policies.create(policy, policy_args)
        self.budget = budget
        self.chunk = int(chunk)
        self.decode_interval = int(decode_interval)
        self.cache_type_k, self.cache_type_v = cache_type_k, cache_type_v
        type_k, type_v = cache_type(cache_type_k), cache_type(cache_type_v)
        if self.chunk < 1:
            raise LocalkvError(f"chunk must be at least 1, got {chunk}")
        if gpu_layers < -1:
            raise LocalkvError(f"--gpu-layers must be -1 (all), 0 (none) or a layer count, got {gpu_layers}")
        if ctx is not None and ctx < 16:
            raise LocalkvError(f"--ctx {ctx} is too small (at least 16)")

        if shared_model is not None:
            self.model_path, self.model, self._owns_model = shared_model.path, shared_model, False
        else:
            self.model_path = str(models.resolve(model, progress=progress))
            self.model, self._owns_model = Model(self.model_path, n_gpu_layers=gpu_layers), True
        shape = self.model.shape
        self.shape = shape

        if self.policy.compresses:
            if budget is None:
                raise LocalkvError(f"policy {self.policy.name} needs --budget (tokens kept per KV head)")
            self.policy.validate(budget)
            limit = ctx or shape.n_ctx_train
            if budget > limit:
                raise LocalkvError(f"budget {budget} is larger than the context ({limit} tokens)")
            self.decode_interval = max(1, min(self.decode_interval, self.chunk))
            if prefill_budget == 0:  # strict: nothing beyond the budget, even while a prompt goes in
                prefill_budget = budget
            if prefill_budget is not None and prefill_budget < budget:
                raise LocalkvError(f"--prefill-budget {prefill_budget} is smaller than --budget {budget}")
            if self.pod:  # a POD follower's recent ring holds a whole ubatch
                self.chunk = min(self.chunk, self.policy.n_recent(budget))
                self.decode_interval = max(1, min(self.decode_interval, self.chunk))
        elif budget is not None and self.policy.name == "full":
            raise LocalkvError("--budget needs a compressing policy (full keeps everything); see `localkv policies`")

        cp = ll.llama_context_default_params()
        n_threads = threads or os.cpu_count() or 1
        cp.n_threads = cp.n_threads_batch = n_threads
        cp.n_seq_max = 1
        cp.type_k, cp.type_v = type_k, type_v
        if flash_attn is not None:
            cp.flash_attn_type = 1 if flash_attn else 0
        if eval_callback is not None:  # ggml_backend_sched_eval_callback, to look at graph tensors (tests, calibration)
            self._eval_callback = eval_callback
            cp.cb_eval = eval_callback
        if self.policy.compresses:
            self.prefill_budget = prefill_budget if prefill_budget is not None else max(budget, DEFAULT_PREFILL_BUDGET)
        else:
            self.prefill_budget = None
        if self.policy.compresses:
            self.capacities = self.policy.capacities(budget, shape.n_layer)
            # room for the largest layer's prefill working set plus one chunk; positions may go far beyond it
            # (the plain cache made here is replaced by the compressed one at once: plain POD's is minimal)
            cp.n_ctx = 2 * self.chunk if self.keeps_all else \
                max(self.policy.capacities(self.prefill_budget, shape.n_layer)) + self.chunk
            cp.n_batch = cp.n_ubatch = self.chunk
        else:
            self.capacities = None
            cp.n_ctx = ctx or min(DEFAULT_CTX, shape.n_ctx_train)
            cp.n_batch = cp.n_ubatch = min(self.chunk * 2, cp.n_ctx)
        self.n_ctx = ctx or (cp.n_ctx if not self.policy.compresses else shape.n_ctx_train)
        self.ctx = ll.llama_init_from_model(self.model.ptr, cp)
        if not self.ctx:
            raise LocalkvError(f"llama.cpp could not create a context: {last_log_error()}")
        self.n_batch = cp.n_batch
        self.kv_layers = capi.kv_layers(self.ctx)
        if self.policy.compresses:
            n = len(self.kv_layers)
            self.kv_heads = capi.kv_heads(self.ctx)
            # cached layer of every (layer, KV head) in the C API's per-head order, and each layer's first head
            self._head_layer = np.repeat(np.arange(n), self.kv_heads)
            self._head0 = np.concatenate([[0], np.cumsum(self.kv_heads)]).astype(int)
            self.policy.prepare(self)
            self.capacities = self.policy.capacities(budget, n)
            self.head_capacities = np.asarray(self.policy.head_capacities(budget, self.kv_heads), dtype=np.int64)
            self.prefill_capacities = np.asarray(self.policy.head_capacities(self.prefill_budget, self.kv_heads),
                                                 dtype=np.int64)
            # what a head may hold while a prompt goes in: the prefill budget at least (a prompt that fits it
            # is compressed once, after all of it was read, even in a head whose share is smaller), plus a chunk
            self._prefill_limits = np.maximum(self.prefill_capacities, self.prefill_budget) + self.chunk
            try:
                # C's capacity is the budget (AhaKV's k); the slots start at one decode interval and grow as tokens
                # come (see _make_room), so a short chat never holds more than a full cache would
                capi.enable(self.ctx, self.head_capacities, [self.decode_interval] * len(self.head_capacities))
                _cap, alloc, _used = capi.cache_state(self.ctx)
                # bytes of one slot of each head (K + V, as llama.cpp allocated them)
                layer_slots = np.bincount(self._head_layer, weights=alloc)
                self._slot_bytes = np.array([kb + vb for _il, kb, vb in capi.kv_layers(self.ctx)]) / layer_slots
                self._slot_bytes = self._slot_bytes[self._head_layer]
                # a POD follower's K is a fixed ring, not a row per slot: its slot holds V only
                self._pod_k_bytes = np.zeros(len(alloc))
                if self.pod:
                    k_slot = np.array([kb for _il, kb, _vb in capi.kv_layers(self.ctx)])[self._head_layer] / \
                        layer_slots[self._head_layer]
                    capi.set_pod(self.ctx, self.policy.pod_leaders(), self.policy.sinks, self.policy.n_recent(budget))
                    lead, k_slots, _s, _r = capi.pod_state(self.ctx)
                    self._slot_bytes = np.where(lead >= 0, self._slot_bytes - k_slot, self._slot_bytes)
                    self._pod_k_bytes = np.where(lead >= 0, k_slot * k_slots, 0.0)
            except capi.CapiError as e:
                if e.code == -2:
                    raise LocalkvError(f"policy {self.policy.name} cannot compress this model "
                                       f"({shape.architecture}): {e}") from None
                raise
        # the most the KV buffers have held (a compressed cache peaks while a long prompt goes in)
        self.kv_bytes_peak = capi.memory_bytes(self.ctx)
        self.n_past = 0
        self._words = WordIndex(self.model.piece)  # which positions form one word (policies keep words whole)
        self._history_text = ""  # the rendered text the cache holds (a chat continues after it)
        self.compressions = 0
        self.reallocations = 0  # resizes of the compressed cache (growing for a prompt, shrinking at rest)
        self.compress_seconds = 0.0
        self._stats_phase: tuple | str | None = None
        # reconstruction (KVzip): the tokens at the end of the cache not replayed yet, and the last replayed
        # span's final tokens (a later replay starts from them)
        self._unscored: list[int] = []
        self._span_tail: list[int] = []
        self._replay_turn: tuple[str, str] | None = None
        self.replays = 0
        self.replay_tokens = 0
        self.replay_seconds = 0.0

    # ---------------------------------------------------------------- lifecycle

    def close(self) -> None:
        if getattr(self, "ctx", None):
            ll.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            if self._owns_model:
                self.model.close()
            self.model = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        self.close()

    def reset(self) -> None:
        """Forget the conversation (the cache is emptied, its buffers stay)."""
        ll.llama_memory_clear(ll.llama_get_memory(self.ctx), True)
        if self.compressing:
            self._settle()
        self.n_past = 0
        self._words.reset()
        self._history_text = ""
        self._unscored, self._span_tail = [], []
        self._stats_phase = None  # the next phase asks for its statistics again

    # ---------------------------------------------------------------- compression

    @property
    def compressing(self) -> bool:
        return self.policy.compresses

    @property
    def pod(self) -> bool:
        """Whether the policy shares attention across layers (POD: leaders and followers in the cache)."""
        return hasattr(self.policy, "pod_leaders")

    @property
    def keeps_all(self) -> bool:
        return self.policy.keeps_all

    def _set_phase(self, phase: str, observe: bool = True) -> None:
        """Switch on the statistics the policy needs in `phase`. Without `observe`, the ones every ubatch
        overwrites (its observation window: read only when a compression follows) stay off."""
        key = (phase, observe)
        if not self.compressing or key == self._stats_phase:
            return
        needs = set(self.policy.needs(phase))
        if not observe:
            needs -= WINDOWED_STATS
        capi.set_stats(self.ctx, needs, self.policy.obs_window(phase), query_heads=self.policy.query_heads)
        self._stats_phase = key

    def _heads_of(self, i: int) -> slice:
        """The entries of cached layer i in per-head arrays."""
        return slice(self._head0[i], self._head0[i + 1])

    def _compresses_before(self, n: int, n_next: int) -> bool:
        """Whether, after n more prompt tokens, the next n_next would need a compression first (_make_room's
        rule: the slots cannot grow past the prefill working set plus one chunk)."""
        _cap, _alloc, used = capi.cache_state(self.ctx)
        limits = np.array([pad_slots(x) for x in self._prefill_limits])
        return bool((used + n + n_next > limits).any())

    def layer_view(self, i: int, phase: str, capacity=None, used=None) -> LayerView:
        """What the policy sees of layer i; `capacity`/`used`: per-head values the caller already read."""
        if capacity is None or used is None:
            cap, _alloc, used = capi.head_state(self.ctx, i)
            capacity = cap if capacity is None else capacity
        positions = capi.positions(self.ctx, i, used=used)
        return LayerView(ctx=self.ctx, index=i, layer=self.kv_layers[i][0], n_layers=len(self.kv_layers),
                         n_head=self.shape.n_head, n_head_kv=len(used),
                         capacity=np.asarray(capacity),
                         positions=positions, n_seen=self.n_past, phase=phase, words=self._words.of(positions),
                         used=used)

    def _resize(self, slots, alloc) -> None:
        """Reallocate every head to `slots` (padded like the C side) unless that changes nothing."""
        slots = [pad_slots(s) for s in slots]
        if slots != [int(a) for a in alloc]:
            capi.resize(self.ctx, self.head_capacities, slots)
            self.reallocations += 1
            self.kv_bytes_peak = max(self.kv_bytes_peak, capi.memory_bytes(self.ctx))

    def working_set_bytes(self, tokens: int) -> int:
        """KV bytes a compressed cache holds while a prompt of `tokens` tokens goes in (its largest size)."""
        if not self.compressing:
            return capi.memory_bytes(self.ctx)
        if self.policy.reconstructs:
            # what was kept before the last span, the span, and its replay (a prefix of under 64 tokens)
            span = min(tokens, self.policy.replay_chunk)
            return int(sum(b * pad_slots(min(cap, tokens - span) + 2 * span + 64 + 1)
                           for b, cap in zip(self._slot_bytes, self.head_capacities)))
        slots = [min(limit, tokens + self.chunk) for limit in self._prefill_limits]
        if self.keeps_all:
            slots = [tokens for _ in slots]  # one reallocation for the whole prompt
        return int(sum(b * pad_slots(n) for b, n in zip(self._slot_bytes, slots)) + self._pod_k_bytes.sum())

    def _make_room(self, n: int, phase: str, targets=None) -> None:
        """Room for n more tokens in every head: grow the slots while under the phase's limit, else compress.

        Growth: up to the tokens held + n + one chunk, never past the limit (the prefill working set + one
        chunk while a prompt goes in, the budget + the decode interval while decoding), so the cache never
        holds more than the tokens seen plus one chunk and reallocates at most once per chunk of tokens.
        """
        _cap, alloc, used = capi.cache_state(self.ctx)
        if (used + n <= alloc).all():
            return
        limits = self._prefill_limits if phase == PREFILL else self.head_capacities + self.decode_interval
        if phase == DECODE and self.policy.shares_model_budget:
            # heads keep different counts under one total: each may grow by an interval (step() holds the total)
            limits = np.maximum(limits, used + self.decode_interval)
        self._resize(np.maximum(alloc, np.minimum(limits, used + n + self.chunk)), alloc)
        self.compress(phase, room=n, targets=targets)

    def _settle(self) -> None:
        """At rest (between turns, while decoding): each head holds what it kept plus one decode interval."""
        _cap, alloc, used = capi.cache_state(self.ctx)
        self._resize(used + self.decode_interval, alloc)

    def compress(self, phase: str, room: int = 0, targets=None) -> bool:
        """Bring every head over its target (default: its budget capacity) back to it.

        With `room`, only if `room` more tokens would not fit.
        """
        if not self.compressing:
            return False
        cap, alloc, used = capi.cache_state(self.ctx)
        if room and (used + room <= alloc).all():
            return False
        targets = np.asarray(targets if targets is not None else cap)
        if room:  # whatever the target, leave room for what comes next
            targets = np.minimum(targets, alloc - room)
        t0 = time.perf_counter()
        limits = alloc - room if room else used
        layers = self._layers_over(used, targets, limits)
        views = [self.layer_view(i, phase, capacity=targets[self._heads_of(i)], used=used[self._heads_of(i)])
                 for i in layers]
        for v in views:
            v.limit = limits[self._heads_of(v.index)]
        # every layer is chosen before any is compacted: a policy may weigh the layers together
        for i, keep in zip(layers, self.policy.select_layers(views)):
            capi.keep(self.ctx, i, keep)
        did = bool(layers)
        if did:
            self.policy.after_compress(self.ctx)
            self.compressions += 1
        self.compress_seconds += time.perf_counter() - t0
        return did

    def _layers_over(self, used, targets, limits=None) -> list[int]:
        """The cached layers the policy must compress to bring `used` to `targets`: a head over its target, or,
        for a policy whose heads share their layer's budget, the layer's total over its total or a head past
        its limit (vectorised: step() asks after every token)."""
        first = self._head0[:-1]
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

    def graphs_reused(self) -> int:
        """Compute graphs llama.cpp reused instead of building anew (its own performance counter)."""
        return int(ll.llama_perf_context(self.ctx).n_reused)

    def compress_bytes(self) -> int:
        """Bytes compression has moved between host and backend so far (0 with the full cache)."""
        return capi.transfer_bytes(self.ctx) if self.compressing else 0

    def kv_tokens_kept(self) -> int:
        """Tokens per KV head held now (the largest layer), or all tokens with the full cache."""
        if not self.compressing:
            return self.n_past
        return int(capi.cache_state(self.ctx)[2].max())

    # ---------------------------------------------------------------- decoding

    def _decode(self, tokens: list[int], want_logits: bool, all_logits: bool = False) -> None:
        self._run_batch(tokens, self.n_past, want_logits, all_logits)
        self._words.extend(tokens)
        self.n_past += len(tokens)
        if self.policy.reconstructs:
            self._unscored.extend(tokens)

    def _run_batch(self, tokens: list[int], pos0: int, want_logits: bool, all_logits: bool = False) -> None:
        """One llama_decode of tokens at positions pos0.. (the engine's bookkeeping is _decode's)."""
        n = len(tokens)
        batch = ll.llama_batch_init(n, 0, 1)
        try:
            for i, t in enumerate(tokens):
                batch.token[i] = t
                batch.pos[i] = pos0 + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = all_logits or (want_logits and i == n - 1)
            batch.n_tokens = n
            rc = ll.llama_decode(self.ctx, batch)
        finally:
            ll.llama_batch_free(batch)
        if rc != 0:
            raise LocalkvError(f"llama_decode failed with code {rc} at position {pos0}: {last_log_error()}")

    def _chunks(self, tokens: list[int]) -> list[list[int]]:
        """Chunks of at most n_batch; the last is at least the observation window when possible."""
        size = self.n_batch
        if not self.compressing:
            return [tokens[i:i + size] for i in range(0, len(tokens), size)]
        w = min(self.policy.obs_window(PREFILL), size, len(tokens))
        out = []
        rest = len(tokens)
        end = len(tokens)
        # cut from the end so the final chunk holds the whole observation window
        while rest > 0:
            take = min(size, rest)
            if rest - take != 0 and take < w:
                take = w
            out.append(tokens[end - take:end])
            end -= take
            rest -= take
        return out[::-1]

    def feed(self, tokens: list[int], want_logits: bool = True) -> None:
        """Prefill tokens after what the cache holds, compressing between chunks and at the end."""
        if not tokens:
            return
        if not self.compressing and self.n_past + len(tokens) > self.n_ctx:
            raise LocalkvError(
                f"the prompt needs {self.n_past + len(tokens)} tokens but the context holds {self.n_ctx}: "
                f"raise --ctx (the model supports {self.shape.n_ctx_train}) or use a compressing policy with --budget")
        if self.compressing and self.policy.reconstructs:
            self._feed_replayed(tokens, want_logits)
            return
        chunks = self._chunks(tokens)
        if self.keeps_all:
            self._grow(len(tokens))  # nothing is evicted: room for the whole prompt in one reallocation
        for j, chunk in enumerate(chunks):
            if self.compressing:
                self._make_room(len(chunk), PREFILL, targets=self.prefill_capacities)
                # the observation window matters only for a chunk a compression follows (the last one, or one
                # after which the working set is full): the others skip it
                last = j == len(chunks) - 1
                self._set_phase(PREFILL, observe=last or self._compresses_before(len(chunk), len(chunks[j + 1])))
            self._decode(chunk, want_logits and j == len(chunks) - 1)
        # question-aware: the last queries of the prompt decide what the budget keeps
        if self.compressing:
            self.compress(PREFILL)
            self._settle()

    # ---------------------------------------------------------------- reconstruction (KVzip)

    def _grow(self, n: int) -> None:
        """Slots for n more tokens in every head, without compressing."""
        _cap, alloc, used = capi.cache_state(self.ctx)
        if (used + n > alloc).any():
            self._resize(np.maximum(alloc, used + n), alloc)

    def _feed_replayed(self, tokens: list[int], want_logits: bool) -> None:
        """Prefill for a policy that scores by reconstruction: span by span, each replayed once it is read.

        Before a span everything held has been replayed, so the cache first goes down to the budget: the
        working set is the budget plus one span and its replay. The last token is decoded after the last
        replay (a replay overwrites the logits), before the final compression.
        """
        span = self.policy.replay_chunk
        body, last = tokens[:-1], tokens[-1:]
        if len(self._unscored) >= span:
            self.reconstruct()
        at = 0
        while at < len(body):
            piece = body[at:at + max(1, span - len(self._unscored))]
            at += len(piece)
            if not self._unscored:
                self.compress(PREFILL)
            # the piece, then its replay: the prefix, what was not replayed yet and the piece again
            prefix = self._replay_prefix()
            self._grow(len(piece) + len(prefix) + len(self._unscored) + len(piece) + 1)
            chunks = self._chunks(piece)
            for j, chunk in enumerate(chunks):  # a policy's own window statistic sees each span's end
                self._set_phase(PREFILL, observe=j == len(chunks) - 1)
                self._decode(chunk, False)
            self.reconstruct(prefix)
        self._grow(1)
        self._set_phase(PREFILL, observe=False)
        self._decode(last, want_logits)
        self.compress(PREFILL)
        self._settle()

    def _replay_prefix(self) -> list[int]:
        """The replay's instruction in a user turn of the model's template, then the assistant prefix."""
        if self._replay_turn is None:
            marks = ("@@LKV1@@", "@@LKV2@@", "@@LKV3@@")
            text = self.model.chat_prompt([{"role": "user", "content": marks[0]},
                                           {"role": "assistant", "content": marks[1]},
                                           {"role": "user", "content": marks[2]}])
            at = [text.find(m) for m in marks]
            if min(at) >= 0 and at[0] < at[1] < at[2]:
                self._replay_turn = (text[at[1] + len(marks[1]):at[2]], text[at[2] + len(marks[2]):])
            else:  # no usable template: a plain transcript
                self._replay_turn = ("\n\nuser: ", "\nassistant: ")
        opening, closing = self._replay_turn
        if self._span_tail:
            tail = b"".join(self.model.piece(t) for t in self._span_tail).decode("utf-8", errors="replace")
            instruction = f'Repeat the part of the previous context exactly, starting with "{tail}".'
        else:
            instruction = "Repeat the previous context exactly."
        return self.model.tokenize(opening + instruction + closing, parse_special=True)

    def reconstruct(self, prefix: list[int] | None = None) -> None:
        """Score the tokens not replayed yet by how much rebuilding them needs each kept token (KVzip).

        Feeds, after them, the replay prefix and the tokens again (teacher-forced), with every position
        between the sinks and the span hidden; STAT_MAX keeps, per (layer, KV head, slot), the most
        attention any replay query of the group gave it. Then the replay leaves the cache: the positions
        and the next token's output are as if it had never been fed.
        """
        span = self._unscored
        if not self.compressing or not span:
            return
        t0 = time.perf_counter()
        start = self.n_past - len(span)
        replay = (prefix if prefix is not None else self._replay_prefix()) + span
        self._grow(len(replay))
        capi.set_hidden(self.ctx, min(self.policy.sinks, start), start)
        capi.set_stats(self.ctx, {capi.STAT_MAX}, self.n_batch, query_heads=self.policy.query_heads)
        self._stats_phase = None
        try:
            for i in range(0, len(replay), self.n_batch):
                self._run_batch(replay[i:i + self.n_batch], self.n_past + i, False)
        finally:
            capi.set_hidden(self.ctx, 0, 0)
            capi.set_stats(self.ctx, set(), query_heads=self.policy.query_heads)
            if not ll.llama_memory_seq_rm(ll.llama_get_memory(self.ctx), 0, self.n_past, -1):
                raise LocalkvError("could not remove the replay from the compressed cache")
        self._span_tail = span[-8:]
        self._unscored = []
        self.replays += 1
        self.replay_tokens += len(replay)
        self.replay_seconds += time.perf_counter() - t0

    def log_probs(self, tokens: list[int]) -> np.ndarray:
        """Teacher-forced log-probabilities [len(tokens), n_vocab] of the next token after each of `tokens`.

        The tokens are fed after what the cache holds (compressing between chunks
        as usual); the row i is the distribution predicting tokens[i + 1].
        """
        if not self.compressing and self.n_past + len(tokens) > self.n_ctx:
            raise LocalkvError(f"{self.n_past + len(tokens)} tokens do not fit the context ({self.n_ctx})")
        self._set_phase(PREFILL)
        rows = []
        n_vocab = self.shape.n_vocab
        for i in range(0, len(tokens), self.n_batch):
            chunk = tokens[i:i + self.n_batch]
            if self.compressing:
                if self.policy.reconstructs:  # what a compression may drop is scored first
                    self.reconstruct()
                    self._set_phase(PREFILL)
                self._make_room(len(chunk), PREFILL)
            self._decode(chunk, True, all_logits=True)
            logits = np.ctypeslib.as_array(ll.llama_get_logits(self.ctx), shape=(len(chunk), n_vocab))
            x = logits.astype(np.float64)
            x -= x.max(axis=1, keepdims=True)
            x -= np.log(np.exp(x).sum(axis=1, keepdims=True))
            rows.append(x.astype(np.float32))
        return np.concatenate(rows)

    def last_logits(self) -> np.ndarray:
        """[n_vocab] float32 logits after the last decoded token (a copy)."""
        return np.ctypeslib.as_array(ll.llama_get_logits_ith(self.ctx, -1), shape=(self.shape.n_vocab,)).copy()

    def step(self, token: int) -> None:
        """Decode one generated token, compressing every decode_interval tokens to hold the budget."""
        if not self.compressing and self.n_past + 1 > self.n_ctx:
            raise LocalkvError(f"the context is full ({self.n_ctx} tokens): raise --ctx or use a compressing policy")
        self._set_phase(DECODE)
        if self.compressing:
            self._make_room(1, DECODE)
        self._decode([token], True)
        if self.compressing and self._layers_over(capi.cache_state(self.ctx)[2],
                                                  self.head_capacities + self.decode_interval - 1):
            self.compress(DECODE)
            if self.policy.shares_model_budget:
                # one threshold over all heads moves tokens between heads at every compression: without
                # this a head that lost some kept the slots it had grown to, and the cache crept up to
                # every head's largest count (one reallocation per compression, as growing costs anyway)
                self._settle()

    # ---------------------------------------------------------------- generation

    def generate(self, prompt: str | None = None, *, messages: list[dict] | None = None,
                 max_tokens: int = 256, temperature: float = 0.7, seed: int | None = None,
                 ignore_eos: bool = False, chat: bool = True, keep_history: bool = False,
                 answer_prefix: str = "", split_before: str | None = None,
                 on_text: Callable[[str], None] | None = None,
                 should_stop: Callable[[], bool] | None = None) -> GenerationResult:
        """Generate a reply. `prompt` is wrapped in the chat template unless chat=False.

        With keep_history the cache is not emptied first: `messages` continues
        the conversation the cache already holds (only the new part is fed).
        answer_prefix is appended after the template (the reply continues it).
        split_before cuts the prompt at the last occurrence of that text: what
        comes before is fed and compressed first, without seeing the rest (how
        every later turn of a chat works; "question-agnostic" compression).
        """
        if max_tokens < 0:
            raise LocalkvError(f"max tokens must be >= 0, got {max_tokens}")
        if messages is None:
            if prompt is None:
                raise LocalkvError("no prompt given")
            messages = [{"role": "user", "content": prompt}]
        text = (self.model.chat_prompt(messages) if chat else (prompt or "")) + answer_prefix
        if not keep_history:
            self.reset()
        history = self._history_text
        if keep_history and history and text.startswith(history):
            new_text, add_special = text[len(history):], False
        else:
            if keep_history:  # the cache holds nothing this text is known to continue: start it over
                self.reset()
            new_text, add_special = text, True
        segments = [new_text]
        if split_before:
            cut = new_text.rfind(split_before)
            if cut <= 0:
                raise LocalkvError("split_before text is not in the prompt")
            segments = [new_text[:cut], new_text[cut:]]
        token_segments = [self.model.tokenize(seg, add_special=add_special and not chat and i == 0, parse_special=True)
                          for i, seg in enumerate(segments)]
        tokens = [t for seg in token_segments for t in seg]
        if not tokens:
            raise LocalkvError("the prompt is empty")

        start_compressions, start_cs, start_cb = self.compressions, self.compress_seconds, self.compress_bytes()
        t0 = time.perf_counter()
        for seg in token_segments:
            self.feed(seg)
        t_prefill = time.perf_counter() - t0

        sampler = Sampler(temperature, seed if seed is not None else int.from_bytes(os.urandom(4), "little"))
        out = Utf8Stream()
        pieces: list[str] = []
        generated = 0
        stop = "length"
        t_first = t_end = None
        unfed = None  # the last sampled token when the reply ended on max_tokens (sampled, never decoded)
        try:
            while generated < max_tokens:
                if should_stop and should_stop():
                    stop = "interrupted"
                    break
                tok = sampler.sample(self.ctx)
                if t_first is None:
                    t_first = time.perf_counter()
                if self.model.is_eog(tok) and not ignore_eos:
                    stop = "eos"
                    break
                piece = out.push(self.model.piece(tok))
                generated += 1
                if piece:
                    pieces.append(piece)
                    if on_text:
                        on_text(piece)
                if generated >= max_tokens:
                    unfed = tok
                    break
                self.step(tok)
        finally:
            sampler.close()
            t_end = time.perf_counter()
        history_ok = True
        if unfed is not None:
            # the cache must hold the whole reply, or the next turn of a chat would continue without this token
            if self.compressing or self.n_past + 1 <= self.n_ctx:
                self.step(unfed)
            else:
                history_ok = False  # no room: the next turn feeds the conversation again
        tail = out.flush()
        if tail:
            pieces.append(tail)
            if on_text:
                on_text(tail)
        reply = "".join(pieces)
        self._history_text = text + reply if answer_prefix == "" and history_ok else ""
        # tokens decoded after the first sample: one step() each
        steps = max(generated - 1, 0)
        decode_s = (t_end - t_first) if t_first is not None else 0.0

        mem = capi.memory_bytes(self.ctx)
        return GenerationResult(
            text=reply, policy=self.policy.name, budget=self.budget, prompt_tokens=len(tokens),
            generated_tokens=generated,
            prefill_tokens_per_s=len(tokens) / t_prefill if t_prefill > 0 else 0.0,
            decode_tokens_per_s=steps / decode_s if steps and decode_s > 0 else 0.0,
            first_token_latency_s=(t_first - t0) if t_first is not None else t_prefill,
            kv_bytes_allocated=mem, kv_bytes_prefill=self.kv_bytes_peak,
            kv_bytes_full_f16=self.full_bytes(self.n_past, "f16"),
            kv_tokens_kept=self.kv_tokens_kept(),
            kv_stats_bytes=capi.stats_bytes(self.ctx) if self.compressing else 0,
            compute_bytes=capi.compute_bytes(self.ctx), peak_rss_bytes=peak_rss_bytes(),
            compressions=self.compressions - start_compressions,
            compress_seconds=self.compress_seconds - start_cs, compress_bytes=self.compress_bytes() - start_cb,
            stop_reason=stop,
            cache_type_k=self.cache_type_k, cache_type_v=self.cache_type_v, model=self.model_path)

    # ---------------------------------------------------------------- memory

    def full_bytes(self, tokens: int, type_name: str) -> int:
        """A full (uncompressed) cache of `tokens` tokens in every layer, K and V of type `type_name`."""
        per_token = len(self.kv_layers) * self.shape.n_head_kv * self.shape.head_dim * 2
        return int(round(per_token * tokens * TYPE_BYTES[type_name]))

    def memory_report(self, tokens: int | None = None) -> MemoryReport:
        """What llama.cpp allocated for this context's KV cache, layer by layer, next to full caches."""
        n = tokens if tokens is not None else (self.n_ctx if not self.compressing else DEFAULT_CTX)
        if self.compressing and self.n_past == 0:
            # an empty cache holds one decode interval; size it as it is at rest after n tokens (a real
            # allocation by llama.cpp, read back below), so the report shows what such a prompt leaves held
            self._resize(np.minimum(self.head_capacities, n) + self.decode_interval, capi.cache_state(self.ctx)[1])
            for phase in (PREFILL, DECODE):  # the statistics the policy allocates over a prompt and a reply
                self._set_phase(phase)
        layers = []
        pod = capi.pod_state(self.ctx) if self.pod else None
        for i, (il, kb, vb) in enumerate(self.kv_layers if not self.compressing else capi.kv_layers(self.ctx)):
            lm = LayerMemory(layer=il, k_bytes=kb, v_bytes=vb)
            if self.compressing:
                cap, _alloc, used = capi.head_state(self.ctx, i)
                lm.capacity, lm.used = int(cap.max()), int(used.max())
                lm.head_capacities, lm.head_used = cap.tolist(), used.tolist()
                if pod is not None:
                    lead, k_slots, _s, _r = pod
                    heads = self._heads_of(i)
                    # as model layers, like `layer`
                    lm.head_leaders = [self.kv_layers[x][0] if x >= 0 else -1 for x in lead[heads].tolist()]
                    lm.head_k_slots = k_slots[heads].tolist()
            layers.append(lm)
        return MemoryReport(
            model=self.model_path, policy=self.policy.name, budget=self.budget, ctx=self.n_ctx, tokens=n,
            cache_type_k=self.cache_type_k, cache_type_v=self.cache_type_v,
            kv_bytes_allocated=capi.memory_bytes(self.ctx), kv_bytes_prefill=self.working_set_bytes(n),
            kv_bytes_full_f16=self.full_bytes(n, "f16"), kv_bytes_full_q8_0=self.full_bytes(n, "q8_0"),
            kv_bytes_full_q4_0=self.full_bytes(n, "q4_0"),
            kv_stats_bytes=capi.stats_bytes(self.ctx) if self.compressing else 0,
            compute_bytes=capi.compute_bytes(self.ctx), layers=layers)

