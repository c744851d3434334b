"""`localkv serve`: an OpenAI-compatible HTTP server over the engine, one compressed cache per conversation.

    localkv serve --policy snapkv --budget 512
    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")

Endpoints: GET /v1/models, POST /v1/chat/completions and /v1/completions
(streamed as server-sent events or not), GET /v1/localkv/stats.

A chat client resends the whole conversation every turn. The server keeps a
small pool of engines (LRU), each holding one conversation's cache: a request
whose rendered prompt extends what an engine already holds feeds only the new
part, so the compressed cache carries the conversation. One worker thread runs
every request of the model, in arrival order; a client that goes away stops its
generation at the next token.

HTTP comes from Starlette, uvicorn and sse-starlette (the `serve` extra); the
request and cache logic below do not depend on them.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import json
import socket
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import policies
from .errors import LocalkvError

EXTRA_MODULES = ("starlette", "uvicorn", "sse_starlette")
DEFAULT_POOL = 4
DEFAULT_MAX_TOKENS = 512
DEFAULT_TEMPERATURE = 0.7
MAX_STOP = 16
ROLES = {"system", "user", "assistant", "tool", "developer"}
LOCALKV_KEYS = {"policy", "budget", "policy_args", "prefill_budget", "ignore_eos"}


def require_extra() -> None:
    """One line naming the extra when the HTTP libraries are missing."""
    for name in EXTRA_MODULES:
        try:
            __import__(name)
        except ImportError:
            raise LocalkvError(f"localkv serve needs the 'serve' extra ({name} is not installed): "
                               "pip install -e '.[serve]'") from None


class RequestError(Exception):
    """A request the server refuses: an OpenAI-style error with an HTTP status."""

    def __init__(self, message: str, status: int = 400, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.code, self.param = status, code, param

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": str(self), "type": kind, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------- requests


@dataclass(frozen=True)
class CacheKey:
    """What makes two engines interchangeable: one cache per (policy, budget, arguments, prefill budget)."""
    policy: str
    budget: int | None
    policy_args: tuple[tuple[str, str], ...] = ()
    prefill_budget: int | None = None

    def describe(self) -> dict:
        return {"policy": self.policy, "budget": self.budget, "policy_args": dict(self.policy_args),
                "prefill_budget": self.prefill_budget}


@dataclass
class GenRequest:
    kind: str                          # "chat" or "completion"
    key: CacheKey
    messages: list[dict] | None        # chat
    prompt: str | None                 # completion
    max_tokens: int
    temperature: float
    seed: int | None
    stop: list[str]
    stream: bool
    include_usage: bool
    ignore_eos: bool


def _int(body: dict, name: str, lo: int, hi: int | None = None, where: str = "") -> int | None:
    v = body.get(name)
    if v is None:
        return None
    label = f"{where}{name}"
    if isinstance(v, bool) or not isinstance(v, int):
        raise RequestError(f"'{label}' must be an integer, got {json.dumps(v)}", param=label)
    if v < lo or (hi is not None and v > hi):
        raise RequestError(f"'{label}' must be between {lo} and {hi}, got {v}" if hi is not None
                           else f"'{label}' must be at least {lo}, got {v}", param=label)
    return v


def cache_key(extra: Any, default: CacheKey) -> tuple[CacheKey, bool]:
    """The request's `localkv` object over the server's defaults -> (key, ignore_eos); checked against the policy."""
    if extra is None:
        extra = {}
    if not isinstance(extra, dict):
        raise RequestError("'localkv' must be an object like {\"policy\": \"snapkv\", \"budget\": 256}", param="localkv")
    unknown = sorted(set(extra) - LOCALKV_KEYS)
    if unknown:
        raise RequestError(f"'localkv' has no field {', '.join(map(repr, unknown))} "
                           f"(fields: {', '.join(sorted(LOCALKV_KEYS))})", param="localkv")
    name = extra.get("policy", default.policy)
    if not isinstance(name, str):
        raise RequestError("'localkv.policy' must be a string", param="localkv.policy")
    same = name == default.policy
    raw_args = extra.get("policy_args")
    if raw_args is None:
        args = dict(default.policy_args) if same else {}
    elif isinstance(raw_args, dict) and all(isinstance(v, (str, int, float, bool)) for v in raw_args.values()):
        args = {str(k): str(v).lower() if isinstance(v, bool) else str(v) for k, v in raw_args.items()}
    else:
        raise RequestError("'localkv.policy_args' must be an object of names to values", param="localkv.policy_args")
    try:
        policy = policies.create(name, args)
    except LocalkvError as e:
        raise RequestError(str(e), param="localkv.policy") from None
    budget = _int(extra, "budget", 1, where="localkv.")
    prefill = _int(extra, "prefill_budget", 0, where="localkv.")
    if policy.compresses:
        if budget is None:
            budget = default.budget if default.budget is not None else None
        if budget is None:
            raise RequestError(f"policy {name} needs a budget: add \"budget\": N (tokens kept per KV head) to 'localkv'",
                               param="localkv.budget")
        try:
            policy.validate(budget)
        except LocalkvError as e:
            raise RequestError(str(e), param="localkv.budget") from None
        if prefill is None:
            prefill = default.prefill_budget
        if prefill is not None and prefill != 0 and prefill < budget:
            raise RequestError(f"'localkv.prefill_budget' {prefill} is smaller than the budget {budget}",
                               param="localkv.prefill_budget")
    else:
        if budget is not None:
            raise RequestError(f"policy {name} keeps everything: a budget needs a compressing policy",
                               param="localkv.budget")
        prefill = None
    ignore_eos = extra.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise RequestError("'localkv.ignore_eos' must be true or false", param="localkv.ignore_eos")
    return CacheKey(name, budget, tuple(sorted(args.items())), prefill), ignore_eos


def _content(m: dict, i: int) -> str:
    c = m.get("content")
    if c is None:
        return ""
    if isinstance(c, str):
        return c
    if isinstance(c, list):
        parts = []
        for p in c:
            if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise RequestError(f"messages[{i}].content: only text parts are supported", param=f"messages[{i}]")
            parts.append(p["text"])
        return "".join(parts)
    raise RequestError(f"messages[{i}].content must be a string or a list of text parts", param=f"messages[{i}]")


def parse_request(body: Any, kind: str, default: CacheKey, model_id: str, default_max_tokens: int) -> GenRequest:
    """Check an OpenAI request body; RequestError (4xx) for anything malformed."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != model_id:
        raise RequestError(f"the model '{model}' does not exist: this server serves '{model_id}'", status=404,
                           code="model_not_found", param="model")
    messages = prompt = None
    if kind == "chat":
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise RequestError("'messages' must be a non-empty list of {role, content}", param="messages")
        messages = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ROLES:
                raise RequestError(f"messages[{i}] needs a role among {', '.join(sorted(ROLES))}",
                                   param=f"messages[{i}]")
            role = "system" if m["role"] == "developer" else m["role"]
            messages.append({"role": role, "content": _content(m, i)})
    else:
        p = body.get("prompt")
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
            p = p[0]
        if not isinstance(p, str) or not p:
            raise RequestError("'prompt' must be a non-empty string (token ids and several prompts are not supported)",
                               param="prompt")
        prompt = p
    if body.get("n", 1) != 1:
        raise RequestError("only one choice per request is supported ('n' must be 1)", param="n")
    max_tokens = _int(body, "max_completion_tokens", 1) if kind == "chat" else None
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens", 1)
    temperature = body.get("temperature")
    if temperature is None:
        temperature = DEFAULT_TEMPERATURE
    elif isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2:
        raise RequestError(f"'temperature' must be a number from 0 to 2, got {json.dumps(temperature)}",
                           param="temperature")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RequestError(f"'seed' must be an integer, got {json.dumps(seed)}", param="seed")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
        raise RequestError(f"'stop' must be a non-empty string or a list of at most {MAX_STOP} of them", param="stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError("'stream' must be true or false", param="stream")
    opts = body.get("stream_options") or {}
    include_usage = bool(opts.get("include_usage")) if isinstance(opts, dict) else False
    key, ignore_eos = cache_key(body.get("localkv"), default)
    return GenRequest(kind, key, messages, prompt, max_tokens or default_max_tokens, float(temperature),
                      seed, stop, stream, include_usage, ignore_eos)


class StopFilter:
    """Cuts the text at the first stop sequence, holding back any tail that may be the start of one."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.buf = ""
        self.hit = False

    def push(self, text: str) -> str:
        if self.hit:
            return ""
        self.buf += text
        if not self.stops:
            out, self.buf = self.buf, ""
            return out
        found = [i for i in (self.buf.find(s) for s in self.stops) if i >= 0]
        if found:
            self.hit = True
            out, self.buf = self.buf[:min(found)], ""
            return out
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.buf)), hold, -1):
                if self.buf.endswith(s[:k]):
                    hold = k
                    break
        out, self.buf = self.buf[:len(self.buf) - hold], self.buf[len(self.buf) - hold:]
        return out

    def flush(self) -> str:
        out, self.buf = ("" if self.hit else self.buf), ""
        return out


# ---------------------------------------------------------------- the pool of conversation caches


@dataclass
class Slot:
    key: CacheKey
    engine: Any
    last_used: float = field(default_factory=time.monotonic)
    requests: int = 0


class Pool:
    """At most `size` engines, each holding one conversation; least recently used evicted. Worker thread only."""

    def __init__(self, make_engine: Callable[[CacheKey], Any], size: int):
        if size < 1:
            raise LocalkvError(f"--pool must be at least 1, got {size}")
        self.make_engine, self.size = make_engine, size
        self.slots: list[Slot] = []

    @staticmethod
    def history(slot: Slot) -> str:
        """The rendered text the slot's cache holds (what a request must start with to continue it)."""
        return slot.engine.history_text

    def any_engine(self, key: CacheKey | None = None):
        for s in self.slots:
            if key is None or s.key == key:
                return s.engine
        return None

    def acquire(self, key: CacheKey, text: str) -> tuple[Slot, bool]:
        """The slot to serve `text` with, and whether its cache already holds a prefix of it."""
        best, best_len = None, 0
        for s in self.slots:
            h = self.history(s)
            if s.key == key and h and len(h) > best_len and text.startswith(h):
                best, best_len = s, len(h)
        if best is not None:
            return self._touch(best), True
        for s in self.slots:  # an engine of this kind that holds nothing yet
            if s.key == key and not self.history(s):
                return self._touch(s), False
        if len(self.slots) < self.size:
            slot = Slot(key, self.make_engine(key))
            self.slots.append(slot)
            return slot, False
        lru = min(self.slots, key=lambda s: s.last_used)
        if lru.key == key:
            lru.engine.reset()
            lru.requests = 0
            return self._touch(lru), False
        engine = self.make_engine(key)  # before evicting: a refused configuration keeps the pool as it was
        self.slots.remove(lru)
        lru.engine.close()
        slot = Slot(key, engine)
        self.slots.append(slot)
        return slot, False

    @staticmethod
    def _touch(slot: Slot) -> Slot:
        slot.last_used = time.monotonic()
        return slot

    def close(self) -> None:
        for s in self.slots:
            s.engine.close()
        self.slots.clear()


# ---------------------------------------------------------------- the worker


class Job:
    """One request on its way through the worker; events go back to the event loop through a queue."""

    def __init__(self, req: GenRequest, loop: asyncio.AbstractEventLoop):
        self.req = req
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.id = ("chatcmpl-" if req.kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def emit(self, event: tuple) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is gone (shutdown)
            pass


class Server:
    """The model, its pool of conversation caches, and the one worker thread that runs them."""

    def __init__(self, model: str | None = None, *, policy: str = "full", budget: int | None = None,
                 policy_args: dict[str, str] | None = None, prefill_budget: int | None = None,
                 ctx: int | None = None, cache_type_k: str = "f16", cache_type_v: str = "f16",
                 threads: int | None = None, pool_size: int = DEFAULT_POOL,
                 max_tokens: int = DEFAULT_MAX_TOKENS, verbose: bool = False, gpu_layers: int = -1):
        from . import models
        self.model_path = str(models.resolve(model))
        registry = {e["name"] for e in models.load_registry()}
        if model is None:
            self.model_id = models.default_model()
        else:  # a registry name, or the file's name without .gguf
            self.model_id = model if model in registry else Path(self.model_path).stem
        self.engine_kw = dict(ctx=ctx, cache_type_k=cache_type_k, cache_type_v=cache_type_v, threads=threads,
                              verbose=verbose)
        if max_tokens < 1:
            raise LocalkvError(f"--max-tokens must be at least 1, got {max_tokens}")
        if gpu_layers < -1:
            raise LocalkvError(f"--gpu-layers must be -1 (all), 0 (none) or a layer count, got {gpu_layers}")
        self.gpu_layers = gpu_layers
        self.max_tokens = max_tokens
        # checked when warm() creates its engine, with the command line's wording
        self.default_key = CacheKey(policy, budget, tuple(sorted((policy_args or {}).items())),
                                    prefill_budget if policies.create(policy, policy_args).compresses else None)
        self._model = None  # loaded by the worker with the first engine
        self.pool = Pool(self._make_engine, pool_size)
        self.worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="localkv-worker")
        self.closing = threading.Event()
        self._lock = threading.Lock()
        self._snapshot: list[dict] = []
        self._recent: deque[dict] = deque(maxlen=32)
        self._served = 0
        self._queued = 0
        self._busy = False
        self.started = time.time()

    # -- engines (worker thread)

    def _make_engine(self, key: CacheKey):
        from .engine import Engine
        from .llama import Model, init_backend
        kw = dict(self.engine_kw)
        if key.prefill_budget is not None:
            kw["prefill_budget"] = key.prefill_budget
        if self._model is None:  # one loaded model for every cache of the pool (each is only a context)
            init_backend(self.engine_kw["verbose"])
            self._model = Model(self.model_path, n_gpu_layers=self.gpu_layers)
        from .chat import conversation_policy_args
        return Engine(self.model_path, policy=key.policy, budget=key.budget, shared_model=self._model,
                      policy_args=conversation_policy_args(key.policy, dict(key.policy_args)), **kw)

    def _close_all(self) -> None:
        self.pool.close()
        if self._model is not None:
            self._model.close()
            self._model = None

    def warm(self) -> None:
        """Load the default engine before serving, so a bad model or policy fails at startup."""
        def load():
            self.pool.acquire(self.default_key, "")
            self._take_snapshot()
        self.worker.submit(load).result()

    def close(self) -> None:
        self.closing.set()
        try:
            self.worker.submit(self._close_all).result()
        finally:
            self.worker.shutdown(wait=True)

    def _take_snapshot(self) -> None:
        rows = []
        now = time.monotonic()
        for s in sorted(self.pool.slots, key=lambda s: -s.last_used):
            e = s.engine
            rows.append({**s.key.describe(), "conversation_tokens": e.n_past, "kv_tokens_kept": e.kv_tokens_kept(),
                         "kv_bytes_allocated": e.kv_bytes_allocated(),
                         "kv_bytes_full_f16": e.full_bytes(e.n_past, "f16"), "requests": s.requests,
                         "idle_s": round(now - s.last_used, 3)})
        with self._lock:
            self._snapshot = rows

    def stats(self) -> dict:
        with self._lock:
            rows = list(self._snapshot)
            recent = list(self._recent)
            served, queued, busy = self._served, self._queued, self._busy
        return {"model": self.model_id, "model_path": self.model_path, "pool_size": self.pool.size,
                "defaults": self.default_key.describe(), "conversations": rows,
                "kv_bytes_allocated": sum(r["kv_bytes_allocated"] for r in rows),
                "requests_served": served, "requests_queued": queued, "busy": busy, "recent": recent,
                "uptime_s": round(time.time() - self.started, 1)}

    def submit(self, job: Job) -> concurrent.futures.Future:
        with self._lock:
            self._queued += 1
        return self.worker.submit(self._run, job)

    def _run(self, job: Job) -> None:
        with self._lock:
            self._queued -= 1
            self._busy = True
        t0 = time.perf_counter()
        record = {"id": job.id, "kind": job.req.kind, "stream": job.req.stream, **job.req.key.describe()}
        try:
            if job.cancelled.is_set() or self.closing.is_set():
                record["finish_reason"] = "cancelled"
                job.emit(("error", RequestError("the client went away before its turn", 499)))
                return
            done = self._generate(job)
            record.update(done["record"])
            job.emit(("done", done))
        except RequestError as e:
            record["error"] = str(e)
            job.emit(("error", e))
        except LocalkvError as e:
            record["error"] = str(e)
            job.emit(("error", RequestError(str(e))))
        except Exception as e:  # a bug: the request fails, the server stays up
            record["error"] = f"{type(e).__name__}: {e}"
            job.emit(("error", RequestError(f"internal error: {type(e).__name__}: {e}", 500)))
        finally:
            record["seconds"] = round(time.perf_counter() - t0, 3)
            try:
                self._take_snapshot()
            finally:
                with self._lock:
                    self._busy = False
                    self._served += 1
                    self._recent.append(record)

    def _generate(self, job: Job) -> dict:
        from .cache import context_limit, full_cache_ctx
        req = job.req
        renderer = self.pool.any_engine(req.key) or self.pool.any_engine()
        if renderer is None:
            renderer = self.pool.acquire(req.key, "")[0].engine
        chat = req.kind == "chat"
        text = renderer.model.chat_prompt(req.messages) if chat else req.prompt
        prompt_tokens = len(renderer.model.tokenize(text, add_special=not chat, parse_special=True))
        max_tokens = req.max_tokens
        limit = context_limit(self.engine_kw["ctx"], renderer.shape)
        if req.key.prefill_budget is not None and req.key.prefill_budget > limit:
            raise RequestError(f"'localkv.prefill_budget' {req.key.prefill_budget} is larger than the context "
                               f"({limit} tokens)", param="localkv.prefill_budget")
        if not policies.create(req.key.policy, dict(req.key.policy_args)).compresses:
            # checked before a cache is taken for it: a refused request evicts no conversation
            n_ctx = full_cache_ctx(self.engine_kw["ctx"], renderer.shape)
            room = n_ctx - prompt_tokens
            if room <= 0:
                raise RequestError(
                    f"the prompt has {prompt_tokens} tokens but a full cache holds {n_ctx} (the server's --ctx): "
                    "shorten it, or use a compressing policy ('localkv': {\"policy\": ..., \"budget\": ...})",
                    code="context_length_exceeded", param="messages" if chat else "prompt")
            max_tokens = min(max_tokens, room)
        slot, reused = self.pool.acquire(req.key, text)
        eng = slot.engine
        stops = StopFilter(req.stop)
        pieces: list[str] = []

        def on_text(s: str) -> None:
            out = stops.push(s)
            if out:
                pieces.append(out)
                if req.stream:
                    job.emit(("text", out))

        def should_stop() -> bool:
            return stops.hit or job.cancelled.is_set() or self.closing.is_set()

        try:
            res = eng.generate(prompt=None if chat else req.prompt, messages=req.messages if chat else None,
                               max_tokens=max_tokens, temperature=req.temperature, seed=req.seed,
                               ignore_eos=req.ignore_eos, chat=chat, keep_history=True, on_text=on_text,
                               should_stop=should_stop)
        except BaseException:
            eng.reset()  # a half-fed prompt must not be taken for the conversation next time
            raise
        finally:
            slot.requests += 1
        tail = stops.flush()
        if tail:
            pieces.append(tail)
            if req.stream:
                job.emit(("text", tail))
        if res.stop_reason == "interrupted" and self.closing.is_set() and not stops.hit:
            raise RequestError("the server is shutting down", 503)
        if stops.hit or res.stop_reason == "eos":
            finish = "stop"
        elif res.stop_reason == "interrupted":
            finish = "cancelled"
        else:
            finish = "length"
        pool_bytes = sum(s.engine.kv_bytes_allocated() for s in self.pool.slots)
        usage = {
            "prompt_tokens": prompt_tokens, "completion_tokens": res.generated_tokens,
            "total_tokens": prompt_tokens + res.generated_tokens,
            "localkv": {
                "prompt_tokens_fed": res.prompt_tokens, "cache_reused": reused, "policy": res.policy,
                "budget": res.budget, "conversation_tokens": eng.n_past, "kv_tokens_kept": res.kv_tokens_kept,
                "kv_bytes_allocated": res.kv_bytes_allocated, "kv_bytes_full_f16": res.kv_bytes_full_f16,
                "kv_bytes_pool": pool_bytes, "prefill_tokens_per_s": round(res.prefill_tokens_per_s, 1),
                "decode_tokens_per_s": round(res.decode_tokens_per_s, 1)},
        }
        record = {"prompt_tokens": prompt_tokens, "prompt_tokens_fed": res.prompt_tokens, "cache_reused": reused,
                  "completion_tokens": res.generated_tokens, "finish_reason": finish}
        return {"text": "".join(pieces), "finish_reason": finish, "usage": usage, "record": record}


# ---------------------------------------------------------------- HTTP


def _error_response(e: RequestError):
    from starlette.responses import JSONResponse
    return JSONResponse(e.body(), status_code=e.status)


async def _wait(request, job: Job):
    """The job's next event; cancels the job if the client disconnects while it waits."""
    getter = asyncio.ensure_future(job.events.get())
    try:
        while True:
            done, _ = await asyncio.wait({getter}, timeout=0.1)
            if done:
                return getter.result()
            if await request.is_disconnected():
                job.cancelled.set()
                return None
    finally:
        if not getter.done():
            getter.cancel()


def _chunk(job: Job, model_id: str, text: str | None, finish: str | None, *, role: bool = False,
           usage: dict | None = None, empty: bool = False) -> dict:
    if job.req.kind == "chat":
        delta: dict = {}
        if role:
            delta = {"role": "assistant", "content": ""}
        elif text is not None:
            delta = {"content": text}
        choices = [] if empty else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
        obj = "chat.completion.chunk"
    else:
        choices = [] if empty else [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}]
        obj = "text_completion"
    out = {"id": job.id, "object": obj, "created": job.created, "model": model_id, "choices": choices}
    if usage is not None:
        out["usage"] = usage
    return out


def _final(job: Job, model_id: str, done: dict) -> dict:
    if job.req.kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": done["text"]}, "logprobs": None,
                  "finish_reason": done["finish_reason"]}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": done["text"], "logprobs": None, "finish_reason": done["finish_reason"]}
        obj = "text_completion"
    return {"id": job.id, "object": obj, "created": job.created, "model": model_id, "choices": [choice],
            "usage": done["usage"]}


def create_app(server: Server):
    """The Starlette application over `server`."""
    require_extra()
    from sse_starlette.sse import EventSourceResponse
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    def guarded(fn):
        async def endpoint(request):
            try:
                return await fn(request)
            except RequestError as e:
                return _error_response(e)
        return endpoint

    async def list_models(request):
        return JSONResponse({"object": "list", "data": [
            {"id": server.model_id, "object": "model", "created": int(server.started), "owned_by": "localkv"}]})

    async def get_model(request):
        if request.path_params["model"] != server.model_id:
            raise RequestError(f"the model '{request.path_params['model']}' does not exist", 404, "model_not_found")
        return JSONResponse({"id": server.model_id, "object": "model", "created": int(server.started),
                             "owned_by": "localkv"})

    async def stats(request):
        return JSONResponse(server.stats())

    async def health(request):
        return JSONResponse({"status": "ok"})

    def generation(kind: str):
        async def handle(request):
            raw = await request.body()
            try:
                body = json.loads(raw)
            except (ValueError, UnicodeDecodeError) as e:
                raise RequestError(f"the request body is not valid JSON ({e})") from None
            req = parse_request(body, kind, server.default_key, server.model_id, server.max_tokens)
            if server.closing.is_set():
                raise RequestError("the server is shutting down", 503)
            job = Job(req, asyncio.get_running_loop())
            server.submit(job)
            first = await _wait(request, job)
            if first is None:  # the client left while waiting
                return JSONResponse({}, status_code=499)
            if first[0] == "error":
                raise first[1]
            if not req.stream:
                return JSONResponse(_final(job, server.model_id, first[1]))

            async def events():
                event = first
                try:
                    yield {"data": json.dumps(_chunk(job, server.model_id, None, None, role=True))}
                    while True:
                        if event[0] == "text":
                            yield {"data": json.dumps(_chunk(job, server.model_id, event[1], None))}
                        elif event[0] == "done":
                            done = event[1]
                            yield {"data": json.dumps(_chunk(job, server.model_id, None if kind == "chat" else "",
                                                             done["finish_reason"], usage=done["usage"]))}
                            if req.include_usage:
                                yield {"data": json.dumps(_chunk(job, server.model_id, None, None, empty=True,
                                                                 usage=done["usage"]))}
                            yield {"data": "[DONE]"}
                            return
                        else:  # an error after tokens went out: an error event, as OpenAI's stream does
                            yield {"data": json.dumps(event[1].body())}
                            return
                        event = await job.events.get()
                finally:
                    job.cancelled.set()  # no-op when finished; stops the generation when the client went away

            return EventSourceResponse(events(), ping=15)
        return handle

    async def not_found(request, exc):
        if exc.status_code == 404:
            return _error_response(RequestError(f"no route {request.method} {request.url.path}", 404, "not_found"))
        if exc.status_code == 405:
            return _error_response(RequestError(f"{request.method} is not allowed on {request.url.path}", 405))
        return _error_response(RequestError(str(exc.detail), exc.status_code))

    routes = [
        Route("/v1/models", guarded(list_models), methods=["GET"]),
        Route("/v1/models/{model:path}", guarded(get_model), methods=["GET"]),
        Route("/v1/chat/completions", guarded(generation("chat")), methods=["POST"]),
        Route("/v1/completions", guarded(generation("completion")), methods=["POST"]),
        Route("/v1/localkv/stats", guarded(stats), methods=["GET"]),
        Route("/health", guarded(health), methods=["GET"]),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: not_found})


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, or a one-line error (port in use, bad address)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, OverflowError) as e:
        raise LocalkvError(f"cannot listen on {host}:{port}: {getattr(e, 'strerror', None) or e}") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise LocalkvError(f"cannot listen on {host}:{port}: {e.strerror or e}"
                           + (" (choose another --port)" if e.errno == errno.EADDRINUSE else "")) from None
    sock.set_inheritable(True)
    return sock


def run(server: Server, host: str, port: int, on_ready: Callable[[str], None], verbose: bool = False) -> None:
    """Serve until interrupted: bind, load the default engine, then hand the socket to uvicorn."""
    require_extra()
    import uvicorn
    if not 0 <= port <= 65535:
        raise LocalkvError(f"--port must be between 0 and 65535, got {port}")
    sock = bind(host, port)
    try:
        server.warm()
        app = create_app(server)

        class _Uvicorn(uvicorn.Server):
            def handle_exit(self, sig, frame):
                server.closing.set()  # running generations stop at their next token
                super().handle_exit(sig, frame)

        config = uvicorn.Config(app, log_level="info" if verbose else "warning", access_log=verbose,
                                timeout_graceful_shutdown=5, lifespan="off")
        bound = sock.getsockname()
        shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
        on_ready(f"http://{shown}:{bound[1]}/v1")
        _Uvicorn(config).run(sockets=[sock])
    finally:
        sock.close()
        server.close()
