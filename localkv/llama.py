"""Thin helpers over llama_cpp's low-level bindings: logging, model and context lifetime, tokens, sampling.

Only plumbing lives here; the generation loop and compression live in engine.py.
"""
from __future__ import annotations

import codecs
import collections
import ctypes
import os
import sys
from dataclasses import dataclass

from . import capi
from .errors import LocalkvError

ll = capi.llama_cpp

# llama.cpp's log goes here instead of stderr unless verbose; the tail explains load failures
_LOG_TAIL: collections.deque[str] = collections.deque(maxlen=64)
_VERBOSE = False


@ll.llama_log_callback
def _log_callback(level, text, user_data):  # pragma: no cover - called from C
    msg = text.decode("utf-8", errors="replace") if text else ""
    if msg.strip():
        _LOG_TAIL.append(msg.strip())
    if _VERBOSE:
        sys.stderr.write(msg)


_backend_ready = False


def init_backend(verbose: bool = False) -> None:
    global _backend_ready, _VERBOSE
    _VERBOSE = verbose
    ll.llama_log_set(_log_callback, ctypes.c_void_p(0))
    if not _backend_ready:
        ll.llama_backend_init()
        _backend_ready = True


def last_log_error() -> str:
    """The most telling recent line of llama.cpp's log (for a failure message)."""
    for line in reversed(_LOG_TAIL):
        low = line.lower()
        if "error" in low or "failed" in low or "unknown" in low or "invalid" in low:
            return line.split(": ", 1)[-1] if ": " in line else line
    return _LOG_TAIL[-1] if _LOG_TAIL else "no detail from llama.cpp"


CACHE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "bf16": 30}
# bytes per element of each cache type (block size / block bytes), for the comparison figures
TYPE_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32, "q4_1": 20 / 32,
              "q5_0": 22 / 32, "q5_1": 24 / 32}


def cache_type(name: str) -> int:
    try:
        return CACHE_TYPES[name]
    except KeyError:
        raise LocalkvError(f"unknown KV cache type '{name}': choose one of {', '.join(CACHE_TYPES)}") from None


@dataclass
class ModelShape:
    n_layer: int
    n_head: int
    n_head_kv: int
    n_embd: int
    head_dim: int
    n_ctx_train: int
    n_vocab: int
    architecture: str
    n_swa: int = 0  # the sliding window of a model whose layers mix windowed and full attention (0: none)


def plain_transcript(messages: list[dict], add_assistant: bool = True) -> str:
    """Messages as plain text for a model without a chat template: each turn under a heading, the reply's heading
    last (a prefix of the transcript with more turns, so a conversation continues after it)."""
    text = "".join(f"### {m['role'].capitalize()}:\n{m['content']}\n\n" for m in messages)
    return text + ("### Assistant:\n" if add_assistant else "")


class Model:
    """A loaded GGUF model (llama_model*)."""

    def __init__(self, path: str, n_gpu_layers: int = -1, devices: list[int] | None = None):
        """`devices`: the ggml devices to offload to (RPC servers', localkv.rpc.devices); None: llama.cpp's choice."""
        mp = ll.llama_model_default_params()
        mp.n_gpu_layers = n_gpu_layers
        if devices:
            dev_list = (ctypes.c_void_p * (len(devices) + 1))(*devices, None)  # NULL-terminated
            mp.devices = ctypes.cast(dev_list, ctypes.c_void_p)
        if os.environ.get("LOCALKV_NO_REPACK"):  # CPU weights as stored, as an RPC server holds them (tests compare)
            mp.use_extra_bufts = False
        _LOG_TAIL.clear()
        ptr = ll.llama_model_load_from_file(os.fsencode(path), mp)
        if not ptr:
            raise LocalkvError(f"llama.cpp could not load {path}: {last_log_error()}")
        self.ptr = ptr
        self.path = path
        self.vocab = ll.llama_model_get_vocab(ptr)
        arch = self.meta("general.architecture") or "unknown"
        n_head = ll.llama_model_n_head(ptr)
        n_embd = ll.llama_model_n_embd(ptr)
        key_len = self.meta(f"{arch}.attention.key_length")
        self.shape = ModelShape(
            n_layer=ll.llama_model_n_layer(ptr), n_head=n_head, n_head_kv=ll.llama_model_n_head_kv(ptr),
            n_embd=n_embd, head_dim=int(key_len) if key_len else n_embd // max(n_head, 1),
            n_ctx_train=ll.llama_model_n_ctx_train(ptr), n_vocab=ll.llama_vocab_n_tokens(self.vocab),
            architecture=arch, n_swa=int(ll.llama_model_n_swa(ptr)))

    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(512)
        n = ll.llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", errors="replace") if n >= 0 else None

    def tokenize(self, text: str, add_special: bool = False, parse_special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        cap = len(data) + 16
        buf = (ll.llama_token * cap)()
        n = ll.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:  # buffer too small: -n is the size needed
            cap = -n
            buf = (ll.llama_token * cap)()
            n = ll.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        return list(buf[:n])

    def piece(self, token: int) -> bytes:
        buf = ctypes.create_string_buffer(128)
        n = ll.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = ll.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        return buf.raw[:n]

    def is_eog(self, token: int) -> bool:
        return bool(ll.llama_vocab_is_eog(self.vocab, token))

    @property
    def has_chat_template(self) -> bool:
        """Whether the model brings a chat template (a base model does not: llama.cpp would fall back to ChatML,
        which such a model never saw)."""
        return ll.llama_model_chat_template(self.ptr, None) is not None

    def chat_prompt(self, messages: list[dict], add_assistant: bool = True) -> str:
        """The model's own chat template applied to messages ({'role', 'content'}). A model without one (a base
        model) gets a plain transcript to complete, not llama.cpp's ChatML fallback it never saw."""
        tmpl = ll.llama_model_chat_template(self.ptr, None)
        if tmpl is None:
            return plain_transcript(messages, add_assistant)
        arr = (ll.llama_chat_message * len(messages))()
        keep = []  # the bytes must outlive the call
        for i, m in enumerate(messages):
            role, content = m["role"].encode(), m["content"].encode("utf-8")
            keep += [role, content]
            arr[i].role, arr[i].content = role, content
        size = 4096 + sum(len(k) for k in keep) * 2
        buf = ctypes.create_string_buffer(size)
        n = ll.llama_chat_apply_template(tmpl, arr, len(messages), add_assistant, buf, size)
        if n > size:
            buf = ctypes.create_string_buffer(n)
            n = ll.llama_chat_apply_template(tmpl, arr, len(messages), add_assistant, buf, n)
        if n < 0:  # a template llama.cpp cannot apply
            return plain_transcript(messages, add_assistant)
        return buf.raw[:n].decode("utf-8", errors="replace")

    def close(self) -> None:
        if getattr(self, "ptr", None):
            ll.llama_model_free(self.ptr)
            self.ptr = None

    def __del__(self):
        self.close()


class Sampler:
    """A llama.cpp sampler chain: greedy at temperature 0, else top-k/top-p/min-p/temperature/seeded draw."""

    def __init__(self, temperature: float, seed: int, top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05):
        self.ptr = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
        if temperature <= 0:
            ll.llama_sampler_chain_add(self.ptr, ll.llama_sampler_init_greedy())
        else:
            ll.llama_sampler_chain_add(self.ptr, ll.llama_sampler_init_top_k(top_k))
            ll.llama_sampler_chain_add(self.ptr, ll.llama_sampler_init_top_p(top_p, 1))
            ll.llama_sampler_chain_add(self.ptr, ll.llama_sampler_init_min_p(min_p, 1))
            ll.llama_sampler_chain_add(self.ptr, ll.llama_sampler_init_temp(temperature))
            ll.llama_sampler_chain_add(self.ptr, ll.llama_sampler_init_dist(seed & 0xFFFFFFFF))

    def sample(self, ctx) -> int:
        tok = ll.llama_sampler_sample(self.ptr, ctx, -1)
        return int(tok)

    def close(self) -> None:
        if getattr(self, "ptr", None):
            ll.llama_sampler_free(self.ptr)
            self.ptr = None

    def __del__(self):
        self.close()


class Utf8Stream:
    """Turns token byte pieces into text without splitting multi-byte characters."""

    def __init__(self):
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, data: bytes) -> str:
        return self._dec.decode(data)

    def flush(self) -> str:
        return self._dec.decode(b"", final=True)
