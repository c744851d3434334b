"""`localkv serve`: an OpenAI-compatible HTTP server over the engine, one compressed cache per conversation.

    localkv serve --policy snapkv --budget 512
    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")

Endpoints: GET /v1/models, POST /v1/chat/completions and /v1/completions
(streamed as server-sent events or not), GET /v1/localkv/stats, GET /health.

A chat client resends the whole conversation every turn. The server keeps a
small pool of engines (LRU), each holding one conversation's cache: a request
whose rendered prompt extends what an engine already holds feeds only the new
part, so the compressed cache carries the conversation. One worker thread runs
every request of the model, in arrival order, from a bounded queue (--queue; a
full queue is a 503 with Retry-After).

Everything a request can get wrong is refused before it reaches the worker, as
an OpenAI-style 4xx: the body (size, JSON, fields), policy arguments (each has a
declared type and range: localkv.policies), anything that would name a file on
the server or need a calibration, and the context (the prompt is tokenized in
the HTTP thread pool, on the loaded model). A streamed reply opens (its role
chunk) as soon as the request is queued; a client that goes away stops its
prompt at the next chunk and its generation at the next token.

HTTP comes from Starlette, uvicorn and sse-starlette (the `serve` extra); the
request and cache logic below do not depend on them.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import hmac
import json
import logging
import math
import socket
import threading
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import policies
from .errors import Interrupted, LocalkvError

EXTRA_MODULES = ("starlette", "uvicorn", "sse_starlette")
DEFAULT_POOL = 4
DEFAULT_MAX_TOKENS = 512
DEFAULT_TEMPERATURE = 0.7
DEFAULT_QUEUE = 16                  # requests waiting for the worker beyond the one it runs
DEFAULT_MAX_BODY = 4 << 20          # bytes of a request body
MAX_STOP = 16
MAX_STOP_CHARS = 256                # a stop sequence is matched at every token: a long one costs every token
ROLES = {"system", "user", "assistant", "tool", "developer"}
LOCALKV_KEYS = {"policy", "budget", "policy_args", "prefill_budget", "ignore_eos"}
PUBLIC_PATHS = {"/health"}          # answered without the API key

log = logging.getLogger("localkv.serve")


def require_extra() -> None:
    """One line naming the extra when the HTTP libraries are missing."""
    for name in EXTRA_MODULES:
        try:
            __import__(name)
        except ImportError:
            raise LocalkvError(f"localkv serve needs the 'serve' extra ({name} is not installed): "
                               "pip install -e '.[serve]'") from None


class RequestError(Exception):
    """A request the server refuses: an OpenAI-style error with an HTTP status (and headers, e.g. Retry-After)."""

    def __init__(self, message: str, status: int = 400, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.param, self.headers = status, code, param, headers

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
    top_p: float | None = None         # None: the sampler's default
    max_tokens_param: str | None = None  # the field that set max_tokens (None: the server's default)


@dataclass(frozen=True)
class Profiles:
    """The calibrated profiles a request's policy may use: this model's, found in the profile cache (the user's
    calibrations, then the shipped ones). A request never names a profile file and never starts a calibration."""
    sha256: str
    model: str            # what `localkv calibrate --model` takes for this model

    def have(self, kind: str) -> bool:
        from .profiles import find_profile
        return find_profile(self.sha256, kind) is not None


def _int(body: dict, name: str, lo: int, hi: int | None = None, where: str = "") -> int | None:
    v = body.get(name)
    if v is None:
        return None
    label = f"{where}{name}"
    if isinstance(v, bool) or not isinstance(v, int):
        raise RequestError(f"'{label}' must be an integer, got {_show(v)}", param=label)
    if v < lo or (hi is not None and v > hi):
        raise RequestError(f"'{label}' must be between {lo} and {hi}, got {v}" if hi is not None
                           else f"'{label}' must be at least {lo}, got {v}", param=label)
    return v


def _show(v: Any) -> str:
    """A request value in a one-line message, shortened."""
    try:
        text = json.dumps(v)
    except (TypeError, ValueError):
        text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _arg_text(v: Any) -> str:
    """A JSON policy argument as the command line would write it (2.0 for an int argument is 2)."""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float) and v.is_integer() and abs(v) < 2 ** 53:
        return str(int(v))
    return str(v)


def _file_arguments(policy) -> set[str]:
    """The arguments of a policy (and of the policy POD composes with) that name a file."""
    names = set(policy.file_arguments)
    inner = getattr(policy, "evict", None)
    if inner is not None:
        names |= set(inner.file_arguments)
    return names


def cache_key(extra: Any, default: CacheKey, profiles: Profiles | None = None) -> tuple[CacheKey, bool]:
    """The request's `localkv` object over the server's defaults -> (key, ignore_eos); checked against the policy.

    Every argument is checked by the policy's own declared ranges (the CLI's and the API's check); an argument
    that names a file is refused (profiles come from the server's flags and its profile cache), and so is a
    policy whose calibrated profile the model lacks (when `profiles` is given): no request ever calibrates."""
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
    asked: set[str] = set()
    if raw_args is None:
        args = dict(default.policy_args) if same else {}
    elif isinstance(raw_args, dict) and all(isinstance(v, (str, int, float, bool)) for v in raw_args.values()):
        args = {str(k): _arg_text(v) for k, v in raw_args.items()}
        asked = set(args)
    else:
        raise RequestError("'localkv.policy_args' must be an object of names to values (strings, numbers, "
                           "booleans)", param="localkv.policy_args")
    try:
        policy = policies.create(name, args)
    except policies.PolicyArgError as e:
        raise RequestError(str(e), param=f"localkv.policy_args.{e.arg}") from None
    except LocalkvError as e:
        raise RequestError(str(e), param="localkv.policy_args" if name in policies.available() or
                           name.startswith("pod+") and name[4:] in policies.available() else "localkv.policy") from None
    files = _file_arguments(policy)
    named = sorted(asked & files)
    if named:
        raise RequestError(f"'localkv.policy_args.{named[0]}' names a file on the server, which a request may not do: "
                           f"{name}'s profile comes from the server's own --policy-arg or its profile cache "
                           "(`localkv calibrate`)", param=f"localkv.policy_args.{named[0]}")
    if asked and same:  # the server's own file arguments still apply to the same policy
        inherited = {k: v for k, v in default.policy_args if k in files and k not in args}
        if inherited:
            args.update(inherited)
            policy = policies.create(name, args)
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
        except policies.PolicyArgError as e:
            raise RequestError(str(e), param=f"localkv.policy_args.{e.arg}") from None
        except LocalkvError as e:
            raise RequestError(str(e), param="localkv.budget") from None
        if prefill is None:
            prefill = default.prefill_budget
        if prefill is not None and prefill != 0 and prefill < budget:
            raise RequestError(f"'localkv.prefill_budget' {prefill} is smaller than the budget {budget}",
                               param="localkv.prefill_budget")
        if profiles is not None:
            for kind in sorted(policy.profile_kinds()):
                if not profiles.have(kind):
                    raise RequestError(
                        f"policy {name} needs this model's calibrated {kind} profile, which the server does not have "
                        f"(a request never calibrates): run `localkv calibrate --policy {kind} --model "
                        f"{profiles.model}` on the server, then retry", code="profile_missing", param="localkv.policy")
    else:
        if budget is not None:
            raise RequestError(f"policy {name} keeps everything: a budget needs a compressing policy",
                               param="localkv.budget")
        prefill = None
    ignore_eos = extra.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise RequestError("'localkv.ignore_eos' must be true or false", param="localkv.ignore_eos")
    return CacheKey(name, budget, tuple(sorted(args.items())), prefill), ignore_eos


def _text(s: str, param: str) -> str:
    """A string the model can read: UTF-8 encodable (JSON may carry lone surrogates)."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError(f"'{param}' is not valid Unicode (a lone surrogate)", param=param) from None
    return s


def _content(m: dict, i: int) -> str:
    c = m.get("content")
    if c is None:
        return ""
    if isinstance(c, str):
        return _text(c, f"messages[{i}].content")
    if isinstance(c, list):
        parts = []
        for p in c:
            if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise RequestError(f"messages[{i}].content: only text parts are supported", param=f"messages[{i}]")
            parts.append(_text(p["text"], f"messages[{i}].content"))
        return "".join(parts)
    raise RequestError(f"messages[{i}].content must be a string or a list of text parts", param=f"messages[{i}]")


def _off(*values):
    """A field's test: absent (None) or one of the values that ask for nothing (False is not 0 here)."""
    return lambda v: v is None or any(type(v) is type(o) and v == o or
                                      isinstance(o, float) and type(v) is int and v == o for o in values)


# OpenAI fields this server does not implement: a request that asks for one gets a 400 saying so, instead of a
# reply that silently ignored it. (field -> (the values that ask for nothing, what it is))
_SHARED_UNSUPPORTED = {
    "frequency_penalty": (_off(0.0), "repetition penalties"),
    "presence_penalty": (_off(0.0), "repetition penalties"),
    "logit_bias": (_off({}), "logit_bias"),
}
UNSUPPORTED = {
    "chat": {
        **_SHARED_UNSUPPORTED,
        "tools": (_off([]), "tool calling"),
        "tool_choice": (_off("none", "auto"), "tool calling"),
        "functions": (_off([]), "function calling"),
        "function_call": (_off("none", "auto"), "function calling"),
        "response_format": (_off({"type": "text"}), "structured output (response_format)"),
        "logprobs": (_off(False), "logprobs"),
        "top_logprobs": (_off(0), "logprobs"),
        "audio": (_off(), "audio output"),
        "modalities": (_off(["text"]), "modalities other than text"),
        "prediction": (_off(), "predicted outputs"),
        "web_search_options": (_off(), "web search"),
    },
    "completion": {
        **_SHARED_UNSUPPORTED,
        "logprobs": (_off(), "logprobs"),
        "echo": (_off(False), "echo"),
        "best_of": (_off(1), "best_of"),
        "suffix": (_off(""), "suffix (insertion)"),
    },
}


def _refuse_unsupported(body: dict, kind: str) -> None:
    for name, (off, what) in UNSUPPORTED[kind].items():
        if name in body and not off(body[name]):
            raise RequestError(f"'{name}' is not supported by this server ({what} is not implemented): "
                               f"leave it out (got {_show(body[name])})", code="unsupported_parameter", param=name)
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or n != 1):
        raise RequestError(f"several choices per request are not supported: 'n' must be 1, got {_show(n)}",
                           param="n", code="unsupported_parameter")


def parse_request(body: Any, kind: str, default: CacheKey, model_id: str, default_max_tokens: int,
                  profiles: Profiles | None = None) -> GenRequest:
    """Check an OpenAI request body; RequestError (4xx) for anything malformed or not implemented here."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != model_id:
        raise RequestError(f"the model {_show(model)} does not exist: this server serves '{model_id}'", status=404,
                           code="model_not_found", param="model")
    messages = prompt = None
    if kind == "chat":
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise RequestError("'messages' must be a non-empty list of {role, content}", param="messages")
        messages = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or m["role"] not in ROLES:
                raise RequestError(f"messages[{i}] needs a role among {', '.join(sorted(ROLES))}",
                                   param=f"messages[{i}]")
            if m.get("tool_calls"):
                raise RequestError(f"messages[{i}] has tool_calls: tool calling is not implemented",
                                   code="unsupported_parameter", param=f"messages[{i}].tool_calls")
            role = "system" if m["role"] == "developer" else m["role"]
            messages.append({"role": role, "content": _content(m, i)})
    else:
        p = body.get("prompt")
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
            p = p[0]
        if not isinstance(p, str) or not p:
            raise RequestError("'prompt' must be a non-empty string (token ids and several prompts are not supported)",
                               param="prompt")
        prompt = _text(p, "prompt")
    _refuse_unsupported(body, kind)
    param = None
    max_tokens = _int(body, "max_completion_tokens", 1) if kind == "chat" else None
    if max_tokens is not None:
        param = "max_completion_tokens"
    else:
        max_tokens = _int(body, "max_tokens", 1)
        param = "max_tokens" if max_tokens is not None else None
    temperature = body.get("temperature")
    if temperature is None:
        temperature = DEFAULT_TEMPERATURE
    elif isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2:
        raise RequestError(f"'temperature' must be a number from 0 to 2, got {_show(temperature)}",
                           param="temperature")
    top_p = body.get("top_p")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise RequestError(f"'top_p' must be a number above 0 and at most 1, got {_show(top_p)}", param="top_p")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RequestError(f"'seed' must be an integer, got {_show(seed)}", param="seed")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > MAX_STOP or \
            not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stop):
        raise RequestError(f"'stop' must be a non-empty string or a list of at most {MAX_STOP} of them, "
                           f"each at most {MAX_STOP_CHARS} characters", param="stop")
    stop = [_text(s, "stop") for s in stop]
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise RequestError("'stream' must be true or false", param="stream")
    opts = body.get("stream_options")
    if opts is None:
        opts = {}
    if not isinstance(opts, dict) or not isinstance(opts.get("include_usage", False), bool):
        raise RequestError("'stream_options' must be an object like {\"include_usage\": true}",
                           param="stream_options")
    include_usage = stream and opts.get("include_usage", False)
    key, ignore_eos = cache_key(body.get("localkv"), default, profiles)
    return GenRequest(kind, key, messages, prompt, max_tokens or default_max_tokens, float(temperature),
                      seed, stop, stream, include_usage, ignore_eos,
                      top_p=None if top_p is None else float(top_p), max_tokens_param=param)


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


@dataclass
class Prepared:
    """A request checked against the model before it is queued: its rendered prompt, and the reply length that fits."""
    text: str
    prompt_tokens: int
    max_tokens: int


class Job:
    """One request on its way through the worker; events go back to the event loop through a queue."""

    def __init__(self, req: GenRequest, loop: asyncio.AbstractEventLoop, prepared: Prepared | None = None):
        self.req = req
        self.prepared = prepared
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()  # the client went away (or its stream ended)
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
                 max_tokens: int = DEFAULT_MAX_TOKENS, verbose: bool = False, gpu_layers: int = -1,
                 queue: int = DEFAULT_QUEUE, max_body: int = DEFAULT_MAX_BODY, api_key: str | None = None,
                 cors: list[str] | None = None):
        from . import models
        self.model_path = str(models.resolve(model))
        registry = {e["name"] for e in models.load_registry()}
        if model is None:
            self.model_id = models.default_model()
        else:  # a registry name, or the file's name without .gguf
            self.model_id = model if model in registry else Path(self.model_path).stem
        self.model_arg = model or self.model_id  # what `localkv calibrate --model` takes
        self.engine_kw = dict(ctx=ctx, cache_type_k=cache_type_k, cache_type_v=cache_type_v, threads=threads,
                              verbose=verbose)
        if max_tokens < 1:
            raise LocalkvError(f"--max-tokens must be at least 1, got {max_tokens}")
        if gpu_layers < -1:
            raise LocalkvError(f"--gpu-layers must be -1 (all), 0 (none) or a layer count, got {gpu_layers}")
        if queue < 1:
            raise LocalkvError(f"--queue must be at least 1 (requests waiting for the worker), got {queue}")
        if max_body < 1024:
            raise LocalkvError(f"--max-body must be at least 1024 bytes, got {max_body}")
        if api_key is not None and not api_key.strip():
            raise LocalkvError("--api-key is empty")
        self.gpu_layers = gpu_layers
        self.max_tokens = max_tokens
        self.queue_limit, self.max_body = queue, max_body
        self.api_key = api_key
        self.cors = list(cors or [])
        # checked when warm() creates its engine, with the command line's wording
        self.default_key = CacheKey(policy, budget, tuple(sorted((policy_args or {}).items())),
                                    prefill_budget if policies.create(policy, policy_args).compresses else None)
        self.profiles: Profiles | None = None  # this model's profile cache (warm() hashes the model file once)
        self._model = None  # loaded by the worker with the first engine
        self._model_users = 0  # HTTP threads tokenizing on it (close() waits for them)
        self.pool = Pool(self._make_engine, pool_size)
        self.worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="localkv-worker")
        self.closing = threading.Event()
        self._lock = threading.Condition()
        self._snapshot: list[dict] = []
        self._recent: deque[dict] = deque(maxlen=32)
        self._waiting: dict[str, Job] = {}   # queued, not yet taken by the worker
        self._current: dict | None = None    # what the worker runs now
        self._counts: Counter = Counter()    # served, cancelled_*, refused_busy
        self._seconds: deque[float] = deque(maxlen=16)  # recent service times (Retry-After)
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
        return Engine(self.model_path, policy=key.policy, budget=key.budget, shared_model=self._model,
                      policy_args=self._engine_args(key), calibrate=False, **kw)

    @staticmethod
    def _engine_args(key: CacheKey) -> dict[str, str]:
        """A cached conversation replays its earlier turns like the chat's (policies.conversation_args)."""
        return policies.conversation_args(key.policy, dict(key.policy_args))

    def _close_all(self) -> None:
        self.pool.close()
        with self._lock:  # requests being tokenized finish first (they hold the model)
            self._lock.wait_for(lambda: self._model_users == 0, timeout=30)
            model, self._model = self._model, None
        if model is not None:
            model.close()

    def warm(self) -> None:
        """Load the default engine before serving, so a bad model or policy fails at startup."""
        from .models import file_sha256
        self.profiles = Profiles(file_sha256(self.model_path), self.model_arg)

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

    def _queue_depth(self) -> int:
        """Requests waiting for the worker whose client is still there (caller holds the lock)."""
        return sum(1 for j in self._waiting.values() if not j.cancelled.is_set())

    def health(self) -> dict:
        with self._lock:
            return {"status": "ok", "queue": self._queue_depth(), "busy": self._current is not None}

    def stats(self) -> dict:
        with self._lock:
            rows = list(self._snapshot)
            recent = list(self._recent)
            counts = dict(self._counts)
            queued, current = self._queue_depth(), dict(self._current) if self._current else None
        return {"model": self.model_id, "model_path": self.model_path, "pool_size": self.pool.size,
                "defaults": self.default_key.describe(), "conversations": rows,
                "kv_bytes_allocated": sum(r["kv_bytes_allocated"] for r in rows),
                "requests_served": counts.get("served", 0), "requests_queued": queued,
                "queue": {"depth": queued, "limit": self.queue_limit,
                          "refused_busy": counts.get("refused_busy", 0)},
                "cancelled": {k: counts.get(f"cancelled_{k}", 0) for k in ("queued", "prefill", "decode")},
                "busy": current is not None, "current": current, "recent": recent,
                "uptime_s": round(time.time() - self.started, 1)}

    # -- before the queue (HTTP threads)

    def prepare(self, req: GenRequest) -> Prepared:
        """Render and tokenize the prompt on the loaded model and check it against the context: every refusal
        here is a 4xx before anything is queued (and before a stream opens). Read-only on the model (llama.cpp's
        tokenizer and template), so it runs in the HTTP thread pool while the worker decodes."""
        from .cache import plan_cache
        from .engine import DEFAULT_CHUNK
        chat = req.kind == "chat"
        with self._lock:
            if self._model is None or self.closing.is_set():
                raise RequestError("the server is shutting down", 503)
            model = self._model
            self._model_users += 1
        try:
            if chat and not model.has_chat_template:
                raise RequestError(f"{self.model_id} has no chat template (a base model, never trained on turns): "
                                   "use /v1/completions", param="messages")
            text = model.chat_prompt(req.messages) if chat else req.prompt
            prompt_tokens = len(model.tokenize(text, add_special=not chat, parse_special=True))
            shape = model.shape
        finally:
            with self._lock:
                self._model_users -= 1
                self._lock.notify_all()
        key = req.key
        ctx = self.engine_kw["ctx"]
        policy = policies.create(key.policy, self._engine_args(key))
        try:
            plan = plan_cache(policy, shape, budget=key.budget, prefill_budget=key.prefill_budget, ctx=ctx,
                              chunk=DEFAULT_CHUNK, decode_interval=32)
        except LocalkvError as e:
            raise RequestError(str(e), param="localkv.prefill_budget" if "prefill" in str(e) else "localkv.budget") \
                from None
        n_ctx = plan.n_ctx  # a full cache's size; a compressed conversation's longest
        if key.prefill_budget is not None and key.prefill_budget > n_ctx:
            raise RequestError(f"'localkv.prefill_budget' {key.prefill_budget} is larger than the context "
                               f"({n_ctx} tokens)", param="localkv.prefill_budget")
        if req.max_tokens_param is not None and req.max_tokens > n_ctx:
            raise RequestError(f"'{req.max_tokens_param}' {req.max_tokens} is more than the context holds ({n_ctx} "
                               "tokens, the server's --ctx)", code="context_length_exceeded", param=req.max_tokens_param)
        room = n_ctx - prompt_tokens
        if room <= 0:
            what = "a full cache holds" if not policy.compresses else "a conversation may reach"
            raise RequestError(
                f"the prompt has {prompt_tokens} tokens but {what} {n_ctx} (the server's --ctx): shorten it"
                + (", or use a compressing policy ('localkv': {\"policy\": ..., \"budget\": ...})"
                   if not policy.compresses else ""),
                code="context_length_exceeded", param="messages" if chat else "prompt")
        return Prepared(text, prompt_tokens, min(req.max_tokens, room))

    def submit(self, job: Job) -> concurrent.futures.Future:
        """Queue a job for the worker; a full queue is a 503 with Retry-After."""
        with self._lock:
            depth = self._queue_depth()
            if depth >= self.queue_limit:
                self._counts["refused_busy"] += 1
                mean = sum(self._seconds) / len(self._seconds) if self._seconds else 1.0
                retry = max(1, min(60, math.ceil(mean * (depth + 1))))
                raise RequestError(f"the server is busy: {depth} requests are waiting (--queue {self.queue_limit}); "
                                   f"retry in {retry} s", 503, code="server_busy",
                                   headers={"Retry-After": str(retry)})
            self._waiting[job.id] = job
        return self.worker.submit(self._run, job)

    # -- the worker thread

    def _run(self, job: Job) -> None:
        t0 = time.perf_counter()
        with self._lock:
            self._waiting.pop(job.id, None)
            self._current = {"id": job.id, "kind": job.req.kind, "phase": "prefill", "prompt_tokens_read": 0,
                             "prompt_tokens": job.prepared.prompt_tokens if job.prepared else None}
        record = {"id": job.id, "kind": job.req.kind, "stream": job.req.stream, **job.req.key.describe()}
        try:
            if job.cancelled.is_set() or self.closing.is_set():
                record["finish_reason"] = "cancelled"
                record["cancelled"] = "queued"
                job.emit(("error", RequestError("the client went away before its turn", 499)))
                return
            done = self._generate(job)
            record.update(done["record"])
            job.emit(("done", done))
        except Interrupted:  # the prompt was stopped between two chunks and rolled back
            with self._lock:
                read = (self._current or {}).get("prompt_tokens_read")
            record.update(prompt_tokens=job.prepared.prompt_tokens if job.prepared else None, prompt_tokens_read=read)
            if job.cancelled.is_set() or not self.closing.is_set():
                record["finish_reason"] = "cancelled"
                record["cancelled"] = "prefill"
                job.emit(("error", RequestError("the client went away while its prompt was read", 499)))
            else:
                record["error"] = "the server is shutting down"
                job.emit(("error", RequestError("the server is shutting down", 503)))
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
                    self._current = None
                    self._counts["served"] += 1
                    if "cancelled" in record:
                        self._counts[f"cancelled_{record['cancelled']}"] += 1
                    else:
                        self._seconds.append(record["seconds"])
                    self._recent.append(record)

    def _progress(self, **fields) -> None:
        with self._lock:
            if self._current is not None:
                self._current.update(fields)

    def _generate(self, job: Job) -> dict:
        req = job.req
        prep = job.prepared if job.prepared is not None else self.prepare(req)
        chat = req.kind == "chat"
        slot, reused = self.pool.acquire(req.key, prep.text)
        eng = slot.engine
        stops = StopFilter(req.stop)
        pieces: list[str] = []
        decoding = []

        def on_text(s: str) -> None:
            if not decoding:
                decoding.append(True)
                self._progress(phase="decode")
            out = stops.push(s)
            if out:
                pieces.append(out)
                if req.stream:
                    job.emit(("text", out))

        def should_stop() -> bool:
            return stops.hit or job.cancelled.is_set() or self.closing.is_set()

        def on_progress(read: int, total: int) -> None:
            self._progress(prompt_tokens_read=read)

        kw = {} if req.top_p is None else {"top_p": req.top_p}
        try:
            res = eng.generate(prompt=None if chat else req.prompt, messages=req.messages if chat else None,
                               max_tokens=prep.max_tokens, temperature=req.temperature, seed=req.seed,
                               ignore_eos=req.ignore_eos, chat=chat, keep_history=True, on_text=on_text,
                               should_stop=should_stop, on_progress=on_progress, **kw)
        except Interrupted:
            raise  # the engine rolled the prompt back: the conversation it held is intact
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
        record = {"prompt_tokens": prep.prompt_tokens, "prompt_tokens_fed": res.prompt_tokens, "cache_reused": reused,
                  "completion_tokens": res.generated_tokens}
        if res.stop_reason == "interrupted" and not stops.hit:
            if job.cancelled.is_set() or not self.closing.is_set():
                # the client went away: nobody reads the reply (a stream's own end also lands here)
                finish = "stop"
                record.update(finish_reason="cancelled", cancelled="decode")
            else:
                raise RequestError("the server is shutting down", 503)
        else:
            # OpenAI's reasons: "stop" (end of turn or a stop sequence), "length" (max_tokens or the context)
            finish = "stop" if stops.hit or res.stop_reason == "eos" else "length"
            record["finish_reason"] = finish
        pool_bytes = sum(s.engine.kv_bytes_allocated() for s in self.pool.slots)
        usage = {
            "prompt_tokens": prep.prompt_tokens, "completion_tokens": res.generated_tokens,
            "total_tokens": prep.prompt_tokens + res.generated_tokens,
            "localkv": {
                "prompt_tokens_fed": res.prompt_tokens, "cache_reused": reused, "policy": res.policy,
                "budget": res.budget, "conversation_tokens": eng.n_past, "kv_tokens_kept": res.kv_tokens_kept,
                "kv_bytes_allocated": res.kv_bytes_allocated, "kv_bytes_full_f16": res.kv_bytes_full_f16,
                "kv_bytes_pool": pool_bytes, "prefill_tokens_per_s": round(res.prefill_tokens_per_s, 1),
                "decode_tokens_per_s": round(res.decode_tokens_per_s, 1)},
        }
        return {"text": "".join(pieces), "finish_reason": finish, "usage": usage, "record": record}


# ---------------------------------------------------------------- HTTP


def _error_response(e: RequestError):
    from starlette.responses import JSONResponse
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def _read_body(request, limit: int) -> bytes:
    """The request body, at most `limit` bytes: 413 as soon as it is known to be larger (its declared length,
    else what has arrived)."""
    declared = request.headers.get("content-length")
    too_large = f"the request body is larger than the server takes ({limit} bytes, --max-body)"
    if declared is not None:
        if not declared.isdigit():
            raise RequestError("the Content-Length header is not a number")
        if int(declared) > limit:
            raise RequestError(too_large, 413, code="request_too_large")
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > limit:
            raise RequestError(too_large, 413, code="request_too_large")
    return bytes(buf)


async def _wait(request, job: Job):
    """The job's next event; cancels the job if the client disconnects while it waits (in the queue, while its
    prompt is read, or while it is generated)."""
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


class BearerAuth:
    """ASGI middleware: every path but PUBLIC_PATHS needs `Authorization: Bearer <key>` (llama-server's
    --api-key); anything else is OpenAI's 401."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in PUBLIC_PATHS:
            given = b""
            for name, value in scope.get("headers", []):
                if name == b"authorization":
                    given = value
                    break
            scheme, _, token = given.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                e = RequestError("invalid or missing API key: send 'Authorization: Bearer <key>' with the key the "
                                 "server was started with (--api-key)", 401, code="invalid_api_key",
                                 headers={"WWW-Authenticate": "Bearer"})
                await _error_response(e)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(server: Server):
    """The Starlette application over `server`."""
    require_extra()
    from sse_starlette.sse import EventSourceResponse
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.middleware.cors import CORSMiddleware
    from starlette.requests import ClientDisconnect
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    def guarded(fn):
        async def endpoint(request):
            try:
                return await fn(request)
            except RequestError as e:
                return _error_response(e)
            except ClientDisconnect:  # gone while its body was read: nobody to answer
                return Response(status_code=499)
            except LocalkvError as e:  # a check below the request's own (policy, cache plan)
                return _error_response(RequestError(str(e)))
            except Exception as e:  # a bug: this request fails, the server stays up
                log.exception("internal error on %s %s", request.method, request.url.path)
                return _error_response(RequestError(f"internal error: {type(e).__name__}: {e}", 500))
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
        return JSONResponse(server.health())

    def generation(kind: str):
        async def handle(request):
            raw = await _read_body(request, server.max_body)
            try:
                body = json.loads(raw)
            except (ValueError, UnicodeDecodeError, RecursionError) as e:
                raise RequestError(f"the request body is not valid JSON ({str(e)[:100]})") from None
            req = parse_request(body, kind, server.default_key, server.model_id, server.max_tokens,
                                profiles=server.profiles)
            if server.closing.is_set():
                raise RequestError("the server is shutting down", 503)
            prepared = await asyncio.to_thread(server.prepare, req)
            job = Job(req, asyncio.get_running_loop(), prepared)
            server.submit(job)
            if not req.stream:
                event = await _wait(request, job)
                if event is None:  # the client left
                    return Response(status_code=499)
                if event[0] == "error":
                    raise event[1]
                return JSONResponse(_final(job, server.model_id, event[1]))

            async def events():
                # the stream opens at once (the role chunk) while the request waits and its prompt is read;
                # sse-starlette notices a client that goes away and closes this generator: the job stops
                try:
                    yield {"data": json.dumps(_chunk(job, server.model_id, None, None, role=True))}
                    while True:
                        event = await job.events.get()
                        if event[0] == "text":
                            yield {"data": json.dumps(_chunk(job, server.model_id, event[1], None))}
                        elif event[0] == "done":
                            done = event[1]
                            yield {"data": json.dumps(_chunk(job, server.model_id, None if kind == "chat" else "",
                                                             done["finish_reason"]))}
                            if req.include_usage:  # one last chunk, no choices, the usage (OpenAI's)
                                yield {"data": json.dumps(_chunk(job, server.model_id, None, None, empty=True,
                                                                 usage=done["usage"]))}
                            yield {"data": "[DONE]"}
                            return
                        else:  # an error after the stream opened: an error event, as OpenAI's stream does
                            yield {"data": json.dumps(event[1].body())}
                            return
                finally:
                    job.cancelled.set()  # no-op when finished; stops the job when the client went away

            return EventSourceResponse(events(), ping=15, headers={"Cache-Control": "no-cache",
                                                                   "X-Accel-Buffering": "no"})
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
    middleware = []
    if server.cors:  # outermost: a preflight is answered before the key is asked for, and errors carry the headers
        middleware.append(Middleware(CORSMiddleware, allow_origins=server.cors, allow_methods=["GET", "POST"],
                                     allow_headers=["*"], expose_headers=["Retry-After"], max_age=600))
    if server.api_key is not None:
        middleware.append(Middleware(BearerAuth, key=server.api_key))
    return Starlette(routes=routes, middleware=middleware, exception_handlers={HTTPException: not_found})


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
