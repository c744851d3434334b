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

`Engine` is the facade; the parts it runs have one job each: `CachePlan` and
`CompressedCache` (localkv.cache: the sizes, the per-head layout and the resize
rules), `Conversation` (localkv.conversation: what was fed, its words and text,
the replay state) and the sampling loop (localkv.generation). The engine
decodes, asks the policy what to keep and tells the cache.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from . import capi, models, policies
from .cache import (DEFAULT_CTX, DEFAULT_PREFILL_BUDGET, CachePlan, CompressedCache, pad_slots, plan_cache,
                    shares_attention)
from .conversation import Conversation
from .errors import Interrupted, LocalkvError
from .generation import GenerationResult, Reply, peak_rss_bytes, sample_reply
from .llama import TYPE_BYTES, Model, cache_type, init_backend, last_log_error, ll
from .policies import DECODE, PREFILL, LayerView
from .policies.base import StatReader

# the CLI, the server, the bench and the tests import these from here
__all__ = ["DEFAULT_CHUNK", "DEFAULT_CTX", "DEFAULT_PREFILL_BUDGET", "Engine", "GenerationResult", "LayerMemory",
           "MemoryReport", "pad_slots", "peak_rss_bytes"]

DEFAULT_CHUNK = 256

# statistics every ubatch overwrites (its observation window), unlike the accumulated ones (capi.STAT_*)
WINDOWED_STATS = frozenset({capi.STAT_OBS, capi.STAT_OBS_ADAPTIVE, capi.STAT_LAST})


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
    windowed: bool = False  # a sliding-window model's windowed layer: upstream's window of `capacity` cells


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
    kv_bytes_windowed: int = 0  # of kv_bytes_allocated: a sliding-window model's windowed layers (their window)

    def to_dict(self) -> dict:
        return asdict(self)


def _check_arguments(chunk: int, gpu_layers: int, ctx: int | None) -> None:
    """What is wrong whatever the model and policy."""
    if int(chunk) < 1:
        raise LocalkvError(f"chunk must be at least 1, got {chunk}")
    if gpu_layers < -1:
        raise LocalkvError(f"--gpu-layers must be -1 (all), 0 (none) or a layer count, got {gpu_layers}")
    if ctx is not None and ctx < 16:
        raise LocalkvError(f"--ctx {ctx} is too small (at least 16)")


class _PrefillWatch:
    """A prompt being read: how much of it, whom to tell, and whether to stop (Engine.generate)."""

    def __init__(self, total: int, should_stop: Callable[[], bool] | None,
                 on_progress: Callable[[int, int], None] | None):
        self.total, self.read = total, 0
        self.should_stop, self.on_progress = should_stop, on_progress

    def check(self) -> None:
        if self.should_stop is not None and self.should_stop():
            raise Interrupted("interrupted while the prompt was read: the turn was rolled back")

    def advance(self, read: int) -> None:
        if read:
            self.read += read
            if self.on_progress is not None:
                self.on_progress(min(self.read, self.total), self.total)
        self.check()


class Engine:
    """A model and a context configured for one policy and budget."""

    def __init__(self, model: str | None = None, *, policy: str | policies.Policy = "full", budget: int | None = None,
                 policy_args: dict[str, str] | None = None, ctx: int | None = None,
                 prefill_budget: int | None = None,
                 cache_type_k: str = "f16", cache_type_v: str = "f16", chunk: int = DEFAULT_CHUNK,
                 decode_interval: int = 32, threads: int | None = None, flash_attn: bool | None = None,
                 verbose: bool = False, progress: bool | None = None, eval_callback=None,
                 shared_model: Model | None = None, gpu_layers: int = -1, calibrate: bool = True,
                 conversation: bool = False, rpc: list[str] | None = None):
        """`shared_model`: a loaded Model to run on instead of loading `model` again (several contexts on one
        model, as the server's conversation pool does); the caller keeps it open and closes it.
        `gpu_layers`: layers offloaded to a GPU backend when one was built (llama.cpp's convention: -1 all,
        0 none); their K/V caches, compressed ones included, live on the GPU with them.
        `rpc`: llama.cpp RPC servers ("HOST:PORT", `localkv rpc-server`) whose devices take the offloaded layers.
        `calibrate`: whether a policy whose profile this model lacks may calibrate it now (minutes); False
        refuses in one line instead (the server: no request ever calibrates).
        `conversation`: the engine holds a conversation (the chat, the server): earlier turns are compressed
        before later questions exist, so a score-based policy also replays them (policies.conversation_args)
        where the model allows a replay."""
        init_backend(verbose)
        self.calibrate = calibrate
        # a name (the CLI), or a Policy instance (the Python API: a subclass with its own per-head budgets)
        self.policy = policy if isinstance(policy, policies.Policy) else policies.create(policy, policy_args)
        self.budget = budget
        self.cache_type_k, self.cache_type_v = cache_type_k, cache_type_v
        type_k, type_v = cache_type(cache_type_k), cache_type(cache_type_v)
        _check_arguments(chunk, gpu_layers, ctx)
        devices = None
        if rpc:
            from . import rpc as rpc_backend
            devices = rpc_backend.devices(rpc)
        self._load_model(model, shared_model, gpu_layers, progress, devices)
        if conversation and not isinstance(policy, policies.Policy):
            self.policy = policies.create(policy, policies.conversation_args(policy, policy_args or {}))
        self._check_windowed()
        self.plan: CachePlan = plan_cache(self.policy, self.shape, budget=budget, prefill_budget=prefill_budget,
                                          ctx=ctx, chunk=int(chunk), decode_interval=int(decode_interval))
        self.ctx = self._create_context(type_k, type_v, threads, flash_attn, eval_callback)
        # (model layer, cells, K bytes, V bytes) of a sliding-window model's windowed layers: upstream keeps them
        self.windowed_layers = capi.windowed_layers(self.ctx)
        windowed = {w[0] for w in self.windowed_layers}
        # (model layer, K bytes, V bytes) of each full-attention cached layer: the ones a policy compresses
        self.kv_layers = [x for x in capi.kv_layers(self.ctx) if x[0] not in windowed]
        self.kv_heads: list[int] | None = None
        self.cache: CompressedCache | None = None
        if self.compressing:
            self.kv_heads = [h for (il, _k, _v), h in zip(capi.kv_layers(self.ctx), capi.kv_heads(self.ctx))
                             if il not in windowed]
            self.policy.prepare(self)  # it may read a calibrated profile (Engine.profile) before it sizes heads
            self.cache = self._compressed_cache()
            self.windowed_layers = capi.windowed_layers(self.ctx)  # now the compressed cache's own (a window each)
        self.conversation = Conversation(self.model)
        self._turn: tuple | None = None      # the conversation before the last generate()'s prompt (rollback_turn)
        self._prefill: _PrefillWatch | None = None  # the prompt being read: interruption and progress
        self._stats_phase: tuple | str | None = None
        # what the engine has done so far (the bench reads these)
        self.compressions, self.compress_seconds = 0, 0.0
        self.replays, self.replay_tokens, self.replay_seconds = 0, 0, 0.0

    def _check_windowed(self) -> None:
        """What a sliding-window model's compressed cache cannot do (its windowed layers stay as upstream's)."""
        if not (self.compressing and self.shape.n_swa):
            return
        name = f"{self.shape.architecture} (windowed layers of {self.shape.n_swa} tokens)"
        if self.pod:
            raise LocalkvError(f"policy {self.policy.name} cannot compress {name}: POD shares attention between "
                               "consecutive layers, and this model's full-attention layers have windowed ones between them")

    def _load_model(self, model: str | None, shared_model: Model | None, gpu_layers: int, progress, devices=None) -> None:
        if shared_model is not None:
            self.model_path, self.model, self._owns_model = shared_model.path, shared_model, False
        else:
            self.model_path = str(models.resolve(model, progress=progress))
            self.model, self._owns_model = Model(self.model_path, n_gpu_layers=gpu_layers, devices=devices), True
        self.shape = self.model.shape

    def _create_context(self, type_k: int, type_v: int, threads: int | None, flash_attn: bool | None,
                        eval_callback):
        cp = ll.llama_context_default_params()
        cp.n_threads = cp.n_threads_batch = threads or os.cpu_count() or 1
        cp.n_seq_max = 1
        cp.type_k, cp.type_v = type_k, type_v
        if flash_attn is not None:
            cp.flash_attn_type = 1 if flash_attn else 0
        if eval_callback is not None:  # ggml_backend_sched_eval_callback, to look at graph tensors (tests, calibration)
            self._eval_callback = eval_callback  # alive as long as the context calls it
            cp.cb_eval = eval_callback
        cp.n_ctx = self.plan.n_ctx_created
        cp.n_batch = cp.n_ubatch = self.plan.n_batch
        # a sliding-window model's windowed layers hold their window (and a ubatch), as llama-server keeps them;
        # the C API's default (swa_full) would give them the whole context
        cp.swa_full = False
        ctx = ll.llama_init_from_model(self.model.ptr, cp)
        if not ctx:
            raise LocalkvError(f"llama.cpp could not create a context: {last_log_error()}")
        return ctx

    def _compressed_cache(self) -> CompressedCache:
        try:
            return CompressedCache(self.ctx, self.policy, self.plan, self.kv_heads)
        except capi.CapiError as e:
            if e.code == -2:
                raise LocalkvError(f"policy {self.policy.name} cannot compress this model "
                                   f"({self.shape.architecture}): {e}") from None
            raise

    def profile(self, kind: str) -> tuple[dict, Path]:
        """This model's calibration profile of `kind` (localkv.profiles), for a policy being prepared: the
        user's, else the shipped one, else calibrated now, once, and saved."""
        # calibration sits above the engine (it runs an engine of its own): reached only for a missing profile
        from .calibrate import load_or_calibrate_kind
        if not self.calibrate:
            from .profiles import find_profile
            if find_profile(models.file_sha256(self.model_path), kind) is None:
                raise LocalkvError(f"no {kind} profile for {Path(self.model_path).name}: run `localkv calibrate "
                                   f"--policy {kind} --model {self.model_path}` first")
        return load_or_calibrate_kind(self, kind)

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
        if self.cache:
            self.cache.settle()
        self.conversation.reset()
        self._stats_phase = None  # the next phase asks for its statistics again

    # ---------------------------------------------------------------- the parts' figures, read here

    chunk = property(lambda self: self.plan.chunk, doc="prompt tokens per llama_decode")
    decode_interval = property(lambda self: self.plan.decode_interval, doc="decoded tokens between compressions")
    n_ctx = property(lambda self: self.plan.n_ctx, doc="the most tokens the conversation may reach")
    n_batch = property(lambda self: self.plan.n_batch, doc="tokens per ubatch")
    prefill_budget = property(lambda self: self.plan.prefill_budget, doc="tokens per KV head kept in a long prompt")
    capacities = property(lambda self: self.cache.capacities if self.cache else None,
                          doc="per cached layer, the tokens a KV head keeps (compressed)")
    head_capacities = property(lambda self: self.cache.head_capacities if self.cache else None,
                               doc="per (layer, KV head), the tokens it keeps (compressed)")
    reallocations = property(lambda self: self.cache.reallocations if self.cache else 0,
                             doc="resizes of the compressed cache (growing for a prompt, shrinking at rest)")
    history_text = property(lambda self: self.conversation.history_text,
                            doc="the rendered text the cache holds: generate(keep_history=True) continues after it")

    @property
    def kv_bytes_peak(self) -> int:
        """The most the KV buffers have held (a compressed cache peaks while a long prompt goes in)."""
        return self.cache.peak_bytes if self.cache else self.kv_bytes_allocated()

    @property
    def n_past(self) -> int:
        """Tokens fed so far (the next position)."""
        return self.conversation.n_past

    @n_past.setter
    def n_past(self, n: int) -> None:
        self.conversation.n_past = n

    # ---------------------------------------------------------------- compression

    @property
    def compressing(self) -> bool:
        return self.policy.compresses

    @property
    def pod(self) -> bool:
        """Whether the policy shares attention across layers (POD: leaders and followers in the cache)."""
        return shares_attention(self.policy)

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

    def heads_of(self, i: int) -> slice:
        """The entries of cached layer i in per-head arrays (a compressed cache's, in the C API's order)."""
        return self.cache.heads_of(i)

    def layer_view(self, i: int, phase: str, capacity=None, used=None, reader: StatReader | None = None) -> LayerView:
        """What the policy sees of layer i; `capacity`/`used`: per-head values the caller already read; `reader`:
        the statistics of every layer, shared by the views of one compression."""
        if capacity is None or used is None:
            cap, _alloc, used = capi.head_state(self.ctx, i)
            capacity = cap if capacity is None else capacity
        positions = capi.positions(self.ctx, i, used=used)
        return LayerView(ctx=self.ctx, index=i, layer=self.kv_layers[i][0], n_layers=len(self.kv_layers),
                         n_head=self.shape.n_head, n_head_kv=len(used),
                         capacity=np.asarray(capacity),
                         positions=positions, n_seen=self.n_past, phase=phase,
                         words=self.conversation.words.of(positions), used=used, reader=reader)

    def layer_views(self, phase: str) -> list[LayerView]:
        """What the policy sees of every cached layer now (the per-head counts read once for all layers)."""
        cap, _alloc, used = capi.cache_state(self.ctx)
        heads = [self.heads_of(i) for i in range(len(self.kv_layers))]
        reader = StatReader(self.ctx, self.shape.n_head, [h.stop - h.start for h in heads], used)
        return [self.layer_view(i, phase, capacity=cap[h], used=used[h], reader=reader) for i, h in enumerate(heads)]

    def kv_bytes_allocated(self) -> int:
        """The KV buffers llama.cpp holds now (from its memory breakdown)."""
        return capi.memory_bytes(self.ctx)

    def working_set_bytes(self, tokens: int) -> int:
        """KV bytes a compressed cache holds while a prompt of `tokens` tokens goes in (its largest size)."""
        return self.cache.working_set_bytes(tokens) if self.cache else self.kv_bytes_allocated()

    def _make_room(self, n: int, phase: str, targets=None) -> None:
        """Room for n more tokens in every head: grow the slots while under the phase's limit, else compress."""
        if phase == PREFILL and self.policy.shares_model_budget:
            self._make_room_shared(n, targets)
        elif self.cache.grow_for(n, phase):
            self.compress(phase, room=n, targets=targets)

    def _make_room_shared(self, n: int, targets) -> None:
        """_make_room for one threshold over every head: the working set is a total, not a share per head. Capped at
        its share, no head could keep more than it while a long prompt goes in, and each compression would be a
        uniform top-k; here a compression brings the total back to the targets' (each head within what it holds),
        then every head is sized to what it kept plus the tokens that come."""
        _cap, alloc, used = capi.cache_state(self.ctx)
        if (used + n <= alloc).all():
            return
        if used.sum() + n * len(used) > self.cache.prefill_limits.sum():
            self.compress(PREFILL, targets=targets)
        self.cache.settle(room=n)

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
        layers = self.cache.layers_over(used, targets, limits)
        heads = self.cache.heads_of
        reader = StatReader(self.ctx, self.shape.n_head, [len(used[heads(i)]) for i in range(len(self.kv_layers))], used)
        views = [self.layer_view(i, phase, capacity=targets[heads(i)], used=used[heads(i)], reader=reader) for i in layers]
        for v in views:
            v.limit = limits[heads(v.index)]
        # every layer is chosen before any is compacted: a policy may weigh the layers together
        for i, keep in zip(layers, self.policy.select_layers(views)):
            capi.keep(self.ctx, i, keep)
        did = bool(layers)
        if did:
            self.policy.after_compress(self.ctx)
            self.compressions += 1
        self.compress_seconds += time.perf_counter() - t0
        return did

    def graphs_reused(self) -> int:
        """Compute graphs llama.cpp reused instead of building anew (its own performance counter)."""
        return int(ll.llama_perf_context(self.ctx).n_reused)

    def compress_bytes(self) -> int:
        """Bytes compression has moved between host and backend so far (0 with the full cache)."""
        return capi.transfer_bytes(self.ctx) if self.compressing else 0

    def kv_tokens_per_head(self) -> np.ndarray:
        """Tokens each (layer, KV head) holds now (every head holds the whole conversation with a full cache)."""
        if not self.compressing:
            return np.full(len(self.kv_layers) * self.shape.n_head_kv, self.n_past, dtype=np.int64)
        return capi.cache_state(self.ctx)[2]

    def kv_tokens_kept(self) -> int:
        """Tokens per KV head held now (the largest layer), or all tokens with the full cache."""
        if not self.compressing:
            return self.n_past
        return int(capi.cache_state(self.ctx)[2].max())

    # ---------------------------------------------------------------- decoding

    def _decode(self, tokens: list[int], want_logits: bool, all_logits: bool = False) -> None:
        self._run_batch(tokens, self.n_past, want_logits, all_logits)
        self.conversation.append(tokens, replayed_later=self.policy.reconstructs)

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
        size = self.plan.n_batch
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
            self.cache.grow(len(tokens))  # nothing is evicted: room for the whole prompt in one reallocation
        for j, chunk in enumerate(chunks):
            if self.compressing:
                self._make_room(len(chunk), PREFILL, targets=self.cache.prefill_capacities)
                # the observation window matters only for a chunk a compression follows (the last one, or one
                # after which the working set is full): the others skip it
                last = j == len(chunks) - 1
                self._set_phase(PREFILL, observe=last or self.cache.compresses_before(len(chunk), len(chunks[j + 1])))
            self._decode(chunk, want_logits and j == len(chunks) - 1)
            self._tick(len(chunk))
            if self.compressing and self.policy.prunes_always and j < len(chunks) - 1:
                self.compress(PREFILL)  # a score threshold: what scores under it never waits in the working set
        # question-aware: the last queries of the prompt decide what the budget keeps
        if self.compressing:
            self.compress(PREFILL)
            self.cache.settle()

    # ---------------------------------------------------------------- reconstruction (KVzip)

    def _feed_replayed(self, tokens: list[int], want_logits: bool) -> None:
        """Prefill for a policy that scores by reconstruction: span by span, each replayed once it is read.

        Before a span everything held has been replayed, so the cache first goes down to the budget: the
        working set is the budget plus one span and its replay. The last token is decoded after the last
        replay (a replay overwrites the logits), before the final compression.
        """
        span = self.policy.replay_chunk
        body, last = tokens[:-1], tokens[-1:]
        if len(self.conversation.unscored) >= span:
            self.reconstruct()
        at = 0
        while at < len(body):
            piece = body[at:at + max(1, span - len(self.conversation.unscored))]
            at += len(piece)
            if not self.conversation.unscored:
                self.compress(PREFILL)
            # the piece, then its replay: the prefix, what was not replayed yet and the piece again
            prefix = self.conversation.replay_prefix()
            self.cache.grow(len(piece) + len(prefix) + len(self.conversation.unscored) + len(piece) + 1)
            chunks = self._chunks(piece)
            for j, chunk in enumerate(chunks):  # a policy's own window statistic sees each span's end
                self._set_phase(PREFILL, observe=j == len(chunks) - 1)
                self._decode(chunk, False)
                self._tick(len(chunk))
            self.reconstruct(prefix)
        self.cache.grow(1)
        self._set_phase(PREFILL, observe=False)
        self._decode(last, want_logits)
        self.compress(PREFILL)
        self.cache.settle()

    def reconstruct(self, prefix: list[int] | None = None) -> None:
        """Score the tokens not replayed yet by how much rebuilding them needs each kept token (KVzip).

        Feeds, after them, the replay prefix and the tokens again (teacher-forced), with every position
        between the sinks and the span hidden; STAT_MAX keeps, per (layer, KV head, slot), the most
        attention any replay query of the group gave it. Then the replay leaves the cache: the positions
        and the next token's output are as if it had never been fed.
        """
        span = self.conversation.unscored
        if not self.compressing or not span:
            return
        t0 = time.perf_counter()
        start = self.n_past - len(span)
        replay = (prefix if prefix is not None else self.conversation.replay_prefix()) + span
        self.cache.grow(len(replay))
        n_batch = self.plan.n_batch
        capi.set_replay(self.ctx, True)  # a sliding-window model's windowed layers are given back as they are now
        capi.set_hidden(self.ctx, min(self.policy.sinks, start), start)
        capi.set_stats(self.ctx, {self.policy.replay_stat}, n_batch, query_heads=self.policy.query_heads)
        self._stats_phase = None
        try:
            for i in range(0, len(replay), n_batch):
                self._tick(0)
                self._run_batch(replay[i:i + n_batch], self.n_past + i, False)
        finally:
            capi.set_replay(self.ctx, False)
            capi.set_hidden(self.ctx, 0, 0)
            capi.set_stats(self.ctx, set(), query_heads=self.policy.query_heads)
            if not ll.llama_memory_seq_rm(ll.llama_get_memory(self.ctx), 0, self.n_past, -1):
                raise LocalkvError("could not remove the replay from the compressed cache")
        self.conversation.replayed(span)
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
        n_vocab, n_batch = self.shape.n_vocab, self.plan.n_batch
        for i in range(0, len(tokens), n_batch):
            chunk = tokens[i:i + n_batch]
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
        if self.compressing and self.cache.decode_interval_full():
            self.compress(DECODE)
            if self.policy.shares_model_budget:
                # one threshold over all heads moves tokens between heads at every compression: without
                # this a head that lost some kept the slots it had grown to, and the cache crept up to
                # every head's largest count (one reallocation per compression, as growing costs anyway)
                self.cache.settle()

    # ---------------------------------------------------------------- generation

    def generate(self, prompt: str | None = None, *, messages: list[dict] | None = None,
                 max_tokens: int = 256, temperature: float = 0.7, seed: int | None = None,
                 ignore_eos: bool = False, chat: bool = True, keep_history: bool = False,
                 answer_prefix: str = "", split_before: str | None = None,
                 on_text: Callable[[str], None] | None = None,
                 should_stop: Callable[[], bool] | None = None,
                 on_progress: Callable[[int, int], None] | None = None,
                 top_p: float | None = None) -> GenerationResult:
        """Generate a reply. `prompt` is wrapped in the chat template unless chat=False.

        With keep_history the cache is not emptied first: `messages` continues
        the conversation the cache already holds (only the new part is fed).
        answer_prefix is appended after the template (the reply continues it).
        split_before cuts the prompt at the last occurrence of that text: what
        comes before is fed and compressed first, without seeing the rest (how
        every later turn of a chat works; "question-agnostic" compression).
        should_stop is asked between prompt chunks (Interrupted is raised, the
        prompt rolled back) and between decoded tokens (the reply ends there,
        stop_reason "interrupted"; rollback_turn() forgets it). on_progress(read,
        total) is called after each prompt chunk. top_p: the sampler's nucleus (None: its default).
        """
        if max_tokens < 0:
            raise LocalkvError(f"max tokens must be >= 0, got {max_tokens}")
        if messages is None:
            if prompt is None:
                raise LocalkvError("no prompt given")
            messages = [{"role": "user", "content": prompt}]
        text = (self.model.chat_prompt(messages) if chat else (prompt or "")) + answer_prefix
        segments = self._prompt_segments(text, keep_history, chat, split_before)
        n_prompt = sum(len(seg) for seg in segments)
        before = (self.compressions, self.compress_seconds, self.compress_bytes())
        self._turn = (self.conversation.mark(), self.compressions)
        t0 = time.perf_counter()
        self._prefill = _PrefillWatch(n_prompt, should_stop, on_progress)
        try:
            self._prefill.check()
            for seg in segments:
                self.feed(seg)
        except BaseException:
            self.rollback_turn()  # an interrupted or failed prompt leaves nothing half-read in the cache
            raise
        finally:
            self._prefill = None
        t_prefill = time.perf_counter() - t0
        reply = sample_reply(self, max_tokens=max_tokens, temperature=temperature, seed=seed, ignore_eos=ignore_eos,
                             on_text=on_text, should_stop=should_stop, top_p=top_p)
        self.conversation.history_text = text + reply.text if answer_prefix == "" and reply.in_cache else ""
        return self._result(reply, n_prompt, t0, t_prefill, before)

    def rollback_turn(self) -> None:
        """Forget what the last generate() fed (its prompt and reply): the cache and the conversation are as they
        were before it. The turn's tokens are cut from the cache; if a compression ran during the turn it may
        have dropped earlier tokens for the turn's sake (and a sliding-window model's windowed layers may have
        reused the cells of their window for the turn's tokens), so the cache is emptied instead and the next
        turn of a chat reads the conversation again (history_text is then "")."""
        if self._turn is None:
            return
        mark, compressions = self._turn
        self._turn = None
        n_past = mark[0]
        # a windowed layer's ring may have reused the cells of the window before the turn for the turn's tokens
        windowed_lost = bool(self.windowed_layers) and self.n_past > n_past
        if windowed_lost or self.compressions != compressions or (
                self.n_past > n_past and not ll.llama_memory_seq_rm(ll.llama_get_memory(self.ctx), 0, n_past, -1)):
            self.reset()
            return
        self.conversation.restore(mark)
        self._stats_phase = None
        if self.cache:
            self.cache.settle()

    def _tick(self, read: int) -> None:
        """Between prompt chunks (and replay batches): stop if asked, report progress."""
        if self._prefill is not None:
            self._prefill.advance(read)

    def _prompt_segments(self, text: str, keep_history: bool, chat: bool, split_before: str | None) -> list[list[int]]:
        """The tokens to feed for `text`: what is new after the conversation the cache holds (all of it when
        it holds another, which is forgotten first), cut before `split_before`'s last occurrence."""
        continued = keep_history and self.conversation.continues(text)
        if continued:
            text = text[len(self.conversation.history_text):]
        else:
            self.reset()
        segments = [text]
        if split_before:
            cut = text.rfind(split_before)
            if cut <= 0:
                raise LocalkvError("split_before text is not in the prompt")
            segments = [text[:cut], text[cut:]]
        # a raw prompt that starts a conversation gets the model's BOS (a chat template writes its own)
        tokens = [self.model.tokenize(seg, add_special=not continued and not chat and i == 0, parse_special=True)
                  for i, seg in enumerate(segments)]
        if not any(tokens):
            raise LocalkvError("the prompt is empty")
        return tokens

    def _result(self, reply: Reply, n_prompt: int, t0: float, t_prefill: float, before: tuple) -> GenerationResult:
        compressions, compress_seconds, compress_bytes = before
        return GenerationResult(
            text=reply.text, policy=self.policy.name, budget=self.budget, prompt_tokens=n_prompt,
            generated_tokens=reply.generated,
            prefill_tokens_per_s=n_prompt / t_prefill if t_prefill > 0 else 0.0,
            decode_tokens_per_s=reply.decode_tokens_per_s,
            first_token_latency_s=(reply.first_token_at - t0) if reply.first_token_at is not None else t_prefill,
            kv_bytes_allocated=self.kv_bytes_allocated(), kv_bytes_prefill=self.kv_bytes_peak,
            kv_bytes_full_f16=self.full_bytes(self.n_past, "f16"),
            kv_tokens_kept=self.kv_tokens_kept(),
            kv_stats_bytes=capi.stats_bytes(self.ctx) if self.compressing else 0,
            compute_bytes=capi.compute_bytes(self.ctx), peak_rss_bytes=peak_rss_bytes(),
            compressions=self.compressions - compressions,
            compress_seconds=self.compress_seconds - compress_seconds,
            compress_bytes=self.compress_bytes() - compress_bytes,
            stop_reason=reply.stop_reason,
            cache_type_k=self.cache_type_k, cache_type_v=self.cache_type_v, model=self.model_path)

    # ---------------------------------------------------------------- memory

    def full_bytes(self, tokens: int, type_name: str) -> int:
        """Upstream's full (uncompressed) cache of `tokens` tokens, K and V of type `type_name`: every full-attention
        layer holds them all, a windowed layer (sliding-window models) at most its window of cells, as a full-cache
        engine sizes it (gguf_info.ModelFile.window_cells)."""
        from .gguf_info import FULL_UBATCH, WINDOW_PAD
        per_token = self.shape.n_head_kv * self.shape.head_dim * 2
        window = -(-(self.shape.n_swa + FULL_UBATCH) // WINDOW_PAD) * WINDOW_PAD
        cells = len(self.kv_layers) * tokens + len(self.windowed_layers) * min(tokens, window)
        return int(round(per_token * cells * TYPE_BYTES[type_name]))

    def memory_report(self, tokens: int | None = None) -> MemoryReport:
        """What llama.cpp allocated for this context's KV cache, layer by layer, next to full caches."""
        n = tokens if tokens is not None else (self.n_ctx if not self.compressing else DEFAULT_CTX)
        if self.compressing and self.n_past == 0:
            # an empty cache holds one decode interval; size it as it is at rest after n tokens (a real
            # allocation by llama.cpp, read back below), so the report shows what such a prompt leaves held
            self.cache.size_at_rest(n)
            for phase in (PREFILL, DECODE):  # the statistics the policy allocates over a prompt and a reply
                self._set_phase(phase)
        return MemoryReport(
            model=self.model_path, policy=self.policy.name, budget=self.budget, ctx=self.n_ctx, tokens=n,
            cache_type_k=self.cache_type_k, cache_type_v=self.cache_type_v,
            kv_bytes_allocated=self.kv_bytes_allocated(), kv_bytes_prefill=self.working_set_bytes(n),
            kv_bytes_full_f16=self.full_bytes(n, "f16"), kv_bytes_full_q8_0=self.full_bytes(n, "q8_0"),
            kv_bytes_full_q4_0=self.full_bytes(n, "q4_0"),
            kv_stats_bytes=capi.stats_bytes(self.ctx) if self.compressing else 0,
            compute_bytes=capi.compute_bytes(self.ctx), layers=self._layer_memory(),
            kv_bytes_windowed=sum(kb + vb for _il, _cells, kb, vb in capi.windowed_layers(self.ctx)))

    def _layer_memory(self) -> list[LayerMemory]:
        """Each cached layer's K and V bytes now, in layer order; compressed: what its heads keep and hold (POD: and
        share); a sliding-window model's windowed layers: their window of cells, as upstream keeps them."""
        windowed = [LayerMemory(layer=il, k_bytes=kb, v_bytes=vb, capacity=cells, windowed=True)
                    for il, cells, kb, vb in capi.windowed_layers(self.ctx)]
        return sorted(self._cached_layer_memory() + windowed, key=lambda lm: lm.layer)

    def _cached_layer_memory(self) -> list[LayerMemory]:
        if not self.compressing:
            return [LayerMemory(layer=il, k_bytes=kb, v_bytes=vb) for il, kb, vb in self.kv_layers]
        pod = capi.pod_state(self.ctx) if self.pod else None
        layers = []
        for i, (il, kb, vb) in enumerate(capi.kv_layers(self.ctx)):  # the bytes now: the cache resizes
            cap, _alloc, used = capi.head_state(self.ctx, i)
            lm = LayerMemory(layer=il, k_bytes=kb, v_bytes=vb, capacity=int(cap.max()), used=int(used.max()),
                             head_capacities=cap.tolist(), head_used=used.tolist())
            if pod is not None:
                lead, k_slots, _s, _r = pod
                heads = self.heads_of(i)
                # as model layers, like `layer`
                lm.head_leaders = [self.kv_layers[x][0] if x >= 0 else -1 for x in lead[heads].tolist()]
                lm.head_k_slots = k_slots[heads].tolist()
            layers.append(lm)
        return layers
