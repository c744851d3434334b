"""What a GGUF model file says about itself, read with `gguf.GGUFReader` (the library that ships with llama.cpp).

    info = read("model.gguf")
    info.architecture, info.n_layer, info.n_head_kv, info.head_dim_k, info.context_length
    info.kv_bytes_per_token("q8_0")

`read` turns every way a file can be unusable (missing, a directory, empty,
not GGUF, an unsupported GGUF version, cut short, corrupt, no attention shape)
into one-line LocalkvError. The reader parses the whole header, tokenizer
included (about 2 s for the default model on 2 cores), so results are cached
per (path, size, mtime) for the life of the process.
"""
from __future__ import annotations

import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import LocalkvError

# slots a compressed cache keeps at rest beyond the budget: one decode interval (the engine's default), the
# allocation padded to a multiple of SLOT_PAD like llama.cpp's side does
HEADROOM = 32
SLOT_PAD = 32
# tokens per KV head held while a prompt goes in, by default (engine.DEFAULT_PREFILL_BUDGET)
PREFILL_BUDGET = 4096
CACHE_TYPES = ("f16", "q8_0", "q4_0")
CONTEXTS = (4096, 16384, 32768)
# a windowed layer holds its window and one ubatch, padded to 256 cells (llama.cpp's SWA cache, as llama-server and
# localkv size it): ubatches of 512 with a full cache (llama-server's default, localkv's), of 256 compressed
FULL_UBATCH = 512
COMPRESSED_UBATCH = 256
WINDOW_PAD = 256
# which layers of a sliding-window architecture are windowed when the GGUF does not say
# ({arch}.attention.sliding_window_pattern): every n-th layer attends to everything (llama.cpp's defaults)
SWA_PATTERNS = {"gemma2": 2, "gemma3": 6, "gpt-oss": 2, "cohere2": 4}


def _gguf():
    import gguf  # a dependency of localkv; imported here so `import localkv` stays light
    return gguf


class _ShortRead(Exception):
    def __init__(self, offset: int, end: int):
        super().__init__(offset, end)
        self.offset, self.end = offset, end


_READER = None


def _reader_class():
    global _READER
    if _READER is not None:
        return _READER
    gguf = _gguf()

    class CheckedReader(gguf.GGUFReader):
        """GGUFReader whose reads stop at the end of the file.

        The stock reader slices its memory map, so a read past the end returns a
        shorter array and fails later with an unrelated IndexError or ValueError
        (or not at all, for a string cut at the very end). Here it is reported
        where it happens. Reading through a plain ndarray view of the map rather
        than the np.memmap subclass also makes the parse about 4x faster.
        """

        def _get(self, offset, dtype, count=1, override_order=None):
            raw = self.__dict__.get("_raw")
            if raw is None:
                raw = self._raw = self.data.view(np.ndarray)
            count = int(count)
            dt = np.dtype(dtype)
            end = int(offset) + dt.itemsize * count
            if end > raw.shape[0]:
                raise _ShortRead(int(offset), end)
            arr = raw[offset:end].view(dt)
            order = self.byte_order if override_order is None else override_order
            return arr if order == "I" else arr.view(dt.newbyteorder(order))

    _READER = CheckedReader
    return CheckedReader


@dataclass(frozen=True)
class ModelFile:
    path: str
    file_size: int
    gguf_version: int
    architecture: str
    name: str | None
    quant: str | None             # from general.file_type, e.g. "Q4_K_M"
    n_layer: int
    n_head: int                   # query heads (the largest layer's, when they vary)
    n_head_kv: int                # KV heads (the largest layer's, when they vary)
    n_head_kv_per_layer: tuple[int, ...]
    n_embd: int
    head_dim_k: int
    head_dim_v: int
    context_length: int | None    # the trained context
    sliding_window: int | None    # sliding-window attention: the window of the windowed layers
    chat_template: str | None
    tensor_count: int
    windowed_layers: tuple[int, ...] = ()  # layers that attend only to the window (kept as upstream keeps them)

    def window_cells(self, ubatch: int = COMPRESSED_UBATCH) -> int:
        """Cells a windowed layer holds: its window and one ubatch, padded as llama.cpp pads its SWA cache."""
        return -(-((self.sliding_window or 0) + ubatch) // WINDOW_PAD) * WINDOW_PAD

    def _bytes_per_token(self, layers, cache_type: str) -> int:
        block, size = type_size(cache_type)
        elements = sum(self.n_head_kv_per_layer[il] for il in layers) * (self.head_dim_k + self.head_dim_v)
        return round(elements * size / block)

    def kv_bytes_per_token(self, cache_type: str = "f16") -> int:
        """K and V bytes one token takes in the full-attention layers (every layer but a sliding-window model's
        windowed ones) of a full cache of `cache_type` (llama.cpp's types)."""
        windowed = set(self.windowed_layers)
        return self._bytes_per_token([il for il in range(self.n_layer) if il not in windowed], cache_type)

    def windowed_bytes(self, tokens: int, cache_type: str = "f16", ubatch: int = COMPRESSED_UBATCH) -> int:
        """What the windowed layers hold after `tokens`: at most their window of cells, compressed or not."""
        return self._bytes_per_token(self.windowed_layers, cache_type) * min(tokens, self.window_cells(ubatch))

    def full_bytes(self, tokens: int, cache_type: str = "f16") -> int:
        return self.kv_bytes_per_token(cache_type) * tokens + self.windowed_bytes(tokens, cache_type, FULL_UBATCH)

    def compressed_bytes(self, budget: int, cache_type: str = "f16", tokens: int | None = None) -> int:
        """KV bytes a compressed cache holds at rest after `tokens` (default: more than the budget): what it
        kept, at most `budget` per KV head, plus one decode interval of slots, padded as llama.cpp allocates (and
        a sliding-window model's windowed layers, which keep their window)."""
        kept = budget if tokens is None else min(budget, tokens)
        return (self.kv_bytes_per_token(cache_type) * (-(-(kept + HEADROOM) // SLOT_PAD) * SLOT_PAD)
                + self.windowed_bytes(tokens if tokens is not None else self.window_cells(), cache_type))

    def savings(self, budget: int, contexts: tuple[int, ...] = CONTEXTS) -> list[dict[str, Any]]:
        """Per context length: full caches in f16, q8_0 and q4_0 against a compressed f16 cache of `budget`.

        A context shorter than the budget holds only its own tokens plus one decode interval.
        """
        if budget < 1:
            raise LocalkvError(f"budget must be at least 1, got {budget}")
        rows = []
        for n in contexts:
            full = {t: self.full_bytes(n, t) for t in CACHE_TYPES}
            kept = self.compressed_bytes(budget, tokens=n)  # what llama.cpp allocates at rest after n tokens
            rows.append({"tokens": n, **{f"full_{t}": b for t, b in full.items()}, "compressed_f16": kept,
                         "saved_f16": full["f16"] - kept,
                         "beyond_trained_context": self.context_length is not None and n > self.context_length})
        return rows

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["chat_template"] = self.chat_template is not None
        return d


def type_size(cache_type: str) -> tuple[int, int]:
    """(elements per block, bytes per block) of a llama.cpp tensor type, from gguf's table."""
    gguf = _gguf()
    try:
        qtype = gguf.GGMLQuantizationType[cache_type.upper()]
    except KeyError:
        raise LocalkvError(f"unknown KV cache type '{cache_type}': try f16, q8_0 or q4_0") from None
    return gguf.GGML_QUANT_SIZES[qtype]


_CACHE: dict[tuple[str, int, int], ModelFile] = {}
_CACHE_LOCK = threading.Lock()


def read(path: str | os.PathLike[str]) -> ModelFile:
    """The model's shape and metadata, or a one-line LocalkvError saying why the file cannot be used."""
    path = Path(path)
    if not path.exists():
        raise LocalkvError(f"model file {path} does not exist; check the path or run `localkv models list`")
    if path.is_dir():
        raise LocalkvError(f"{path} is a directory, not a GGUF model file; pass the path of the .gguf file")
    try:
        with open(path, "rb"):
            pass
        st = path.stat()
    except OSError as e:
        raise LocalkvError(f"cannot open model file {path}: {e.strerror}; check its permissions") from None
    if st.st_size == 0:
        raise LocalkvError(f"{path} is empty (0 bytes); re-download or re-assemble the model")
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
    if hit is not None:
        return hit
    info = _parse(path, st.st_size)
    with _CACHE_LOCK:
        _CACHE[key] = info
    return info


def _parse(path: Path, size: int) -> ModelFile:
    gguf = _gguf()
    from gguf.gguf_reader import READER_SUPPORTED_VERSIONS

    cls = _reader_class()
    reader = cls.__new__(cls)  # kept when __init__ fails, to tell a wrong magic from a wrong version
    redo = "re-download or re-assemble the model"
    try:
        reader.__init__(path, "r")
    except _ShortRead as e:
        if e.offset < 4:
            raise LocalkvError(f"{path} is not a GGUF model file ({size} bytes, shorter than the magic); "
                               "pass a .gguf file") from None
        data_offset = getattr(reader, "data_offset", None)
        if data_offset is not None and e.offset >= data_offset:
            raise LocalkvError(f"{path} is truncated: {size} bytes but its tensors need at least {e.end}; {redo}") \
                from None
        raise LocalkvError(f"{path} is truncated: its GGUF header ends early at byte {size} "
                           f"(a field needs {e.end}); {redo}") from None
    except (ValueError, KeyError, IndexError, OverflowError, TypeError) as e:
        raw = reader.__dict__.get("_raw")
        if raw is None:
            raw = reader.data.view(np.ndarray)
        magic = bytes(raw[:4])
        if int.from_bytes(magic, "little") != gguf.GGUF_MAGIC:
            raise LocalkvError(f"{path} is not a GGUF model file (starts with {magic!r}, expected b'GGUF'); "
                               "pass a .gguf file") from None
        version = int(reader._get(4, np.uint32)[0]) if raw.shape[0] >= 8 else None
        if version is not None and version not in READER_SUPPORTED_VERSIONS:
            raise LocalkvError(f"{path} uses GGUF version {version}, which localkv does not support "
                               f"(only {' and '.join(map(str, READER_SUPPORTED_VERSIONS))}); "
                               "convert it with a current llama.cpp") from None
        detail = " ".join(str(e).split()) or type(e).__name__
        raise LocalkvError(f"{path} is not a valid GGUF file ({detail}); {redo}") from None
    return _model_file(path, size, reader)


def _field(reader, key: str) -> Any:
    f = reader.get_field(key)
    if f is None or not f.types:
        return None
    try:
        return f.contents()
    except (ValueError, UnicodeDecodeError):
        return None


def _ints(value: Any) -> list[int] | None:
    """A count stored as one integer or (per layer) as an array of them."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return value
    return None


def _model_file(path: Path, size: int, reader) -> ModelFile:
    arch = _field(reader, "general.architecture")
    if not isinstance(arch, str) or not arch:
        raise LocalkvError(f"{path} is a GGUF file but not a model: it has no general.architecture")

    def need(suffix: str) -> list[int]:
        v = _ints(_field(reader, f"{arch}.{suffix}"))
        if v is None or max(v) <= 0:
            raise LocalkvError(f"{path}: unsupported architecture '{arch}': it has no {arch}.{suffix}, so it is "
                               "not a transformer whose KV cache localkv can hold")
        return v

    n_layer = need("block_count")[0]
    n_embd = need("embedding_length")[0]
    heads = need("attention.head_count")
    kv = _ints(_field(reader, f"{arch}.attention.head_count_kv")) or heads  # absent: no GQA
    heads_l = heads * n_layer if len(heads) == 1 else heads
    kv_l = kv * n_layer if len(kv) == 1 else kv
    if len(heads_l) != n_layer or len(kv_l) != n_layer:
        raise LocalkvError(f"{path} is not a valid GGUF file: per-layer head counts do not match "
                           f"{n_layer} layers; re-download or re-assemble the model")
    n_head = max(heads_l)
    first = next(h for h in heads_l if h > 0)  # llama.cpp sizes a head from the first attention layer's count
    key_len = (_ints(_field(reader, f"{arch}.attention.key_length")) or [n_embd // first])[0]
    value_len = (_ints(_field(reader, f"{arch}.attention.value_length")) or [n_embd // first])[0]
    ctx = _ints(_field(reader, f"{arch}.context_length"))
    window = _ints(_field(reader, f"{arch}.attention.sliding_window"))
    template = _field(reader, "tokenizer.chat_template")
    ft = _field(reader, "general.file_type")
    quant = None
    if isinstance(ft, int):
        try:
            quant = _gguf().LlamaFileType(ft).name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except ValueError:
            quant = None
    name = _field(reader, "general.name")
    windowed = _windowed_layers(reader, arch, n_layer) if window and window[0] > 0 else ()
    return ModelFile(
        path=str(path), file_size=size, gguf_version=int(_field(reader, "GGUF.version")), architecture=arch,
        name=name if isinstance(name, str) else None, quant=quant, n_layer=n_layer, n_head=n_head,
        n_head_kv=max(kv_l), n_head_kv_per_layer=tuple(kv_l), n_embd=n_embd, head_dim_k=key_len,
        head_dim_v=value_len, context_length=ctx[0] if ctx else None,
        sliding_window=window[0] if window and window[0] > 0 else None,
        chat_template=template if isinstance(template, str) else None, tensor_count=len(reader.tensors),
        windowed_layers=windowed)


def _windowed_layers(reader, arch: str, n_layer: int) -> tuple[int, ...]:
    """The windowed layers of a sliding-window model: the GGUF's per-layer pattern (true: windowed), or every
    n-th layer global for a pattern n (the GGUF's, else llama.cpp's default for the architecture)."""
    pattern = _field(reader, f"{arch}.attention.sliding_window_pattern")
    if isinstance(pattern, (list, tuple, np.ndarray)) and len(pattern) == n_layer:
        return tuple(il for il in range(n_layer) if bool(pattern[il]))
    n = _ints(pattern) if pattern is not None else None
    every = n[0] if n and n[0] > 0 else SWA_PATTERNS.get(arch)
    if not every:  # a window over every layer (llama.cpp keeps it in one cache; nothing global to compress)
        return tuple(range(n_layer))
    return tuple(il for il in range(n_layer) if il % every < every - 1)
