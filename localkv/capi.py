"""ctypes bindings for include/llama-localkv.h (the patched llama.cpp's extension API), nothing else.

The functions live in the same libllama that `llama_cpp` loads. The first use of
`lib` or `llama_cpp` here (not the import: the policies import this module's
constants, and they and their tests work without the library built) checks that
the library is the localkv-patched build with the ABI this package was written
for, and raises LocalkvError naming the fix otherwise.
"""
from __future__ import annotations

import ctypes
from ctypes import POINTER, c_bool, c_char_p, c_float, c_int32, c_int64, c_size_t, c_uint32, c_void_p

import numpy as np

from .errors import LocalkvError

ABI_VERSION = 11
FIX = "run ./install.sh (it builds and installs the patched llama.cpp)"

# enum llama_localkv_stat
STAT_OBS = 0
STAT_OBS_ADAPTIVE = 1
STAT_ACC = 2
STAT_LAST = 3
STAT_VNORM = 4
STAT_ACC_ADAPTIVE = 5
STAT_MAX = 6  # running max over observed queries and GQA group heads (KVzip's reconstruction score)
STAT_MAX_NORMED = 7  # STAT_MAX with each query's row over its hidden-state norm (KVzip+, before ||W_o v||)
STAT_SCORE = 8  # the learned scorer's prediction per KV head, set when a token is written (KVzap)
STAT_COUNT = 9
# statistics of the written token (one per KV head and slot, whatever the storage)
WRITTEN_WITH_TOKEN = frozenset({STAT_VNORM, STAT_SCORE})
# set_stats flag: statistics per query head instead of summed per KV head (tests, analysis)
STATS_QUERY_HEADS = 1 << 31

# enum llama_localkv_status
STATUS_NAMES = {
    -1: "bad argument",
    -2: "unsupported",
    -3: "wrong state",
    -4: "no such layer",
    -5: "bad slot index",
    -6: "budget out of range",
    -7: "allocation failed",
}


def _load():
    try:
        import llama_cpp.llama_cpp as ll
    except ImportError as e:
        raise LocalkvError(f"llama_cpp is not installed ({e}); {FIX}") from None
    except Exception as e:  # the shared library failed to load
        raise LocalkvError(f"llama_cpp failed to load its library ({e}); {FIX}") from None
    lib = ll._lib
    if not hasattr(lib, "llama_localkv_abi_version"):
        raise LocalkvError(f"llama_cpp is a stock build without localkv's patches; {FIX}")
    lib.llama_localkv_abi_version.restype = c_int32
    lib.llama_localkv_abi_version.argtypes = []
    got = lib.llama_localkv_abi_version()
    if got != ABI_VERSION:
        raise LocalkvError(f"patched llama_cpp has localkv ABI {got}, this package needs {ABI_VERSION}; {FIX}")
    return ll, lib


_SIGNATURES = {
    "llama_localkv_memory_bytes": (c_int64, [c_void_p]),
    "llama_localkv_compute_bytes": (c_int64, [c_void_p]),
    "llama_localkv_n_kv_layers": (c_int32, [c_void_p]),
    "llama_localkv_kv_layer_info": (c_int32, [c_void_p, c_int32, POINTER(c_int32), POINTER(c_int32), POINTER(c_size_t),
                                              POINTER(c_size_t)]),
    "llama_localkv_n_windowed_layers": (c_int32, [c_void_p]),
    "llama_localkv_windowed_layer_info": (c_int32, [c_void_p, c_int32, POINTER(c_int32), POINTER(c_uint32),
                                                    POINTER(c_size_t), POINTER(c_size_t)]),
    "llama_localkv_last_error": (c_char_p, []),
    "llama_localkv_enable": (c_int32, [c_void_p, POINTER(c_uint32), POINTER(c_uint32), c_int32]),
    "llama_localkv_resize": (c_int32, [c_void_p, POINTER(c_uint32), POINTER(c_uint32), c_int32]),
    "llama_localkv_enabled": (c_int32, [c_void_p]),
    "llama_localkv_set_stats": (c_int32, [c_void_p, c_uint32, c_uint32]),
    "llama_localkv_clear_stat": (c_int32, [c_void_p, c_int32]),
    "llama_localkv_set_scorer": (c_int32, [c_void_p, c_int32, c_int32, c_int32, POINTER(c_float), POINTER(c_float),
                                           POINTER(c_float), POINTER(c_float)]),
    "llama_localkv_set_hidden": (c_int32, [c_void_p, c_int32, c_int32]),
    "llama_localkv_set_replay": (c_int32, [c_void_p, c_int32]),
    "llama_localkv_cache_state": (c_int32, [c_void_p, POINTER(c_uint32), POINTER(c_uint32), POINTER(c_uint32), c_size_t]),
    "llama_localkv_get_positions": (c_int32, [c_void_p, c_int32, POINTER(c_int32), c_size_t]),
    "llama_localkv_get_stat": (c_int32, [c_void_p, c_int32, c_int32, c_bool, POINTER(c_float), c_size_t]),
    "llama_localkv_keep": (c_int32, [c_void_p, c_int32, POINTER(c_int32), POINTER(c_int32)]),
    "llama_localkv_stats_bytes": (c_int64, [c_void_p]),
    "llama_localkv_transfer_bytes": (c_int64, [c_void_p]),
    "llama_localkv_transfers": (c_int64, [c_void_p]),
    "llama_localkv_get_stats": (c_int64, [c_void_p, c_int32, c_bool, POINTER(c_float), c_size_t]),
    "llama_localkv_read_rows": (c_int32, [c_void_p, c_int32, c_int32, c_void_p, c_size_t]),
    "llama_localkv_set_pod": (c_int32, [c_void_p, POINTER(c_int32), c_int32, c_uint32, c_uint32]),
    "llama_localkv_pod_state": (c_int32, [c_void_p, POINTER(c_int32), POINTER(c_uint32), POINTER(c_uint32),
                                          POINTER(c_uint32), c_size_t]),
}
_loaded: tuple | None = None


def _library() -> tuple:
    """(the llama_cpp module, its libllama with our signatures set), loaded and checked once, on first use."""
    global _loaded
    if _loaded is None:
        ll, so = _load()
        for name, (res, args) in _SIGNATURES.items():
            f = getattr(so, name)
            f.restype = res
            f.argtypes = args
        _loaded = ll, so
    return _loaded


class _OnFirstUse:
    """Stands for the llama_cpp module (0) or its libllama (1): reading any attribute loads the library."""
    __slots__ = ("_index",)

    def __init__(self, index: int):
        self._index = index

    def __getattr__(self, name: str):
        return getattr(_library()[self._index], name)


llama_cpp = _OnFirstUse(0)
lib = _OnFirstUse(1)


class CapiError(LocalkvError):
    """A llama_localkv_* call returned an error code."""

    def __init__(self, func: str, code: int):
        self.code = code
        detail = (lib.llama_localkv_last_error() or b"").decode(errors="replace")
        super().__init__(f"{func}: {STATUS_NAMES.get(code, code)}: {detail}")


def _check(func: str, rc: int) -> int:
    if rc < 0:
        raise CapiError(func, rc)
    return rc


def memory_bytes(ctx) -> int:
    return _check("memory_bytes", lib.llama_localkv_memory_bytes(ctx))


def compute_bytes(ctx) -> int:
    return _check("compute_bytes", lib.llama_localkv_compute_bytes(ctx))


def kv_layers(ctx) -> list[tuple[int, int, int]]:
    """(model layer, K bytes, V bytes) of every cached layer, as llama.cpp allocated them."""
    return [(il, kb, vb) for il, _h, kb, vb in _layer_info(ctx)]


def windowed_layers(ctx) -> list[tuple[int, int, int, int]]:
    """(model layer, cells, K bytes, V bytes) of a sliding-window model's windowed layers: those the compressed
    cache keeps as upstream keeps them (with compression off: upstream's SWA cache); [] for other models."""
    n = _check("n_windowed_layers", lib.llama_localkv_n_windowed_layers(ctx))
    out = []
    il, cells, kb, vb = c_int32(), c_uint32(), c_size_t(), c_size_t()
    for i in range(n):
        _check("windowed_layer_info", lib.llama_localkv_windowed_layer_info(
            ctx, i, ctypes.byref(il), ctypes.byref(cells), ctypes.byref(kb), ctypes.byref(vb)))
        out.append((il.value, cells.value, kb.value, vb.value))
    return out


def kv_heads(ctx) -> list[int]:
    """KV heads of every cached layer (the per-head arrays below list them layer after layer)."""
    return [h for _il, h, _kb, _vb in _layer_info(ctx)]


def _layer_info(ctx) -> list[tuple[int, int, int, int]]:
    n = lib.llama_localkv_n_kv_layers(ctx)
    if n < 0:
        return []
    out = []
    il, nh, kb, vb = c_int32(), c_int32(), c_size_t(), c_size_t()
    for i in range(n):
        _check("kv_layer_info", lib.llama_localkv_kv_layer_info(
            ctx, i, ctypes.byref(il), ctypes.byref(nh), ctypes.byref(kb), ctypes.byref(vb)))
        out.append((il.value, nh.value, kb.value, vb.value))
    return out


def _u32(values):
    return (c_uint32 * len(values))(*[int(v) for v in values])


def enable(ctx, capacities, slots) -> None:
    """Compressed storage: per (layer, KV head), layer after layer, capacities[k] tokens kept by a compression
    and slots[k] allocated now."""
    if len(slots) != len(capacities):
        raise LocalkvError(f"enable: {len(capacities)} capacities but {len(slots)} slot counts")
    _check("enable", lib.llama_localkv_enable(ctx, _u32(capacities), _u32(slots), len(capacities)))


def resize(ctx, capacities, slots) -> None:
    """New capacities and slot counts per (layer, KV head), keeping the tokens held (reallocates, backend to backend)."""
    if len(slots) != len(capacities):
        raise LocalkvError(f"resize: {len(capacities)} capacities but {len(slots)} slot counts")
    _check("resize", lib.llama_localkv_resize(ctx, _u32(capacities), _u32(slots), len(capacities)))


def enabled(ctx) -> bool:
    return _check("enabled", lib.llama_localkv_enabled(ctx)) == 1


def set_stats(ctx, stats, window: int = 32, query_heads: bool = False) -> None:
    """Compute `stats` from the next decode on; query_heads keeps them per query head (else per KV head)."""
    flags = STATS_QUERY_HEADS if query_heads else 0
    for s in stats:
        flags |= 1 << s
    _check("set_stats", lib.llama_localkv_set_stats(ctx, flags, int(window)))


def set_scorer(ctx, i: int, w1=None, b1=None, w2=None, b2=None) -> None:
    """The learned scorer of the i-th layer (KVzap): linear, s = w1 x + b1 with w1 [n_head_kv, n_embd], or with
    w2 [n_head_kv, n_hidden] a two-layer MLP s = w2 gelu(w1 x + b1) + b2. w1 None removes it."""
    def f32(a):
        return None if a is None else np.ascontiguousarray(a, dtype=np.float32)
    w1, b1, w2, b2 = f32(w1), f32(b1), f32(w2), f32(b2)
    ptr = (lambda a: None if a is None else a.ctypes.data_as(POINTER(c_float)))
    n_in = 0 if w1 is None else w1.shape[1]
    n_hidden = 0 if w2 is None else w1.shape[0]
    _check("set_scorer", lib.llama_localkv_set_scorer(ctx, i, n_in, n_hidden, ptr(w1), ptr(b1), ptr(w2), ptr(b2)))


def clear_stat(ctx, stat: int) -> None:
    _check("clear_stat", lib.llama_localkv_clear_stat(ctx, stat))


def set_hidden(ctx, p0: int = 0, p1: int = 0) -> None:
    """Hide positions [p0, p1) from the queries of the next decodes (attention and statistics); p0 >= p1: none."""
    _check("set_hidden", lib.llama_localkv_set_hidden(ctx, int(p0), int(p1)))


def set_replay(ctx, on: bool) -> None:
    """A replay starts (True) or ends (False): a sliding-window model's windowed layers are set aside and given
    back as they were, so the replay never reaches their window."""
    _check("set_replay", lib.llama_localkv_set_replay(ctx, int(bool(on))))


def set_pod(ctx, leaders, n_sink: int, n_recent: int) -> None:
    """POD: leaders[k] per (layer, KV head), layer after layer: -1, or the earlier cached layer whose same KV head
    it follows (its K then holds only the first n_sink and the n_recent latest tokens). On an empty cache."""
    arr = (c_int32 * len(leaders))(*[int(v) for v in leaders])
    _check("set_pod", lib.llama_localkv_set_pod(ctx, arr, len(leaders), int(n_sink), int(n_recent)))


def pod_state(ctx) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(leader, K slots allocated, proximal sinks, first recent slot) of every (layer, KV head), layer after layer."""
    n = _check("pod_state", lib.llama_localkv_pod_state(ctx, None, None, None, None, 0))
    lead = np.empty(n, dtype=np.int32)
    k_slots, n_sink, first = (np.empty(n, dtype=np.uint32) for _ in range(3))
    _check("pod_state", lib.llama_localkv_pod_state(
        ctx, lead.ctypes.data_as(POINTER(c_int32)), *(a.ctypes.data_as(POINTER(c_uint32)) for a in (k_slots, n_sink, first)),
        n))
    return lead.astype(np.int64), k_slots.astype(np.int64), n_sink.astype(np.int64), first.astype(np.int64)


def cache_state(ctx) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(capacity, allocated slots, slots in use) of every (layer, KV head), layer after layer: one call."""
    n = _check("cache_state", lib.llama_localkv_cache_state(ctx, None, None, None, 0))
    cap, alloc, used = (np.empty(n, dtype=np.uint32) for _ in range(3))
    _check("cache_state", lib.llama_localkv_cache_state(
        ctx, *(a.ctypes.data_as(POINTER(c_uint32)) for a in (cap, alloc, used)), n))
    return cap.astype(np.int64), alloc.astype(np.int64), used.astype(np.int64)


def head_state(ctx, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(capacity, allocated slots, slots in use) of each KV head of the i-th cached layer."""
    heads = kv_heads(ctx)
    if not 0 <= i < len(heads):
        raise CapiError("head_state", -4)
    first = sum(heads[:i])
    return tuple(a[first:first + heads[i]] for a in cache_state(ctx))


def layer_state(ctx, i: int) -> tuple[int, int, int]:
    """(capacity, allocated slots, slots in use) of the i-th cached layer's largest KV head."""
    return tuple(int(a.max()) for a in head_state(ctx, i))


def _ragged(flat: np.ndarray, counts, fill) -> np.ndarray:
    """[len(counts), max(counts)] rows of `flat` cut by counts, padded with `fill`."""
    counts = [int(c) for c in counts]
    out = np.full((len(counts), max(counts, default=0)), fill, dtype=flat.dtype)
    at = 0
    for h, c in enumerate(counts):
        out[h, :c] = flat[at:at + c]
        at += c
    return out


def positions(ctx, i: int, n_head_kv: int | None = None, used=None) -> np.ndarray:
    """[n_head_kv, n_used] token positions held by the i-th layer's slots (-1 past a head's own count when its
    heads hold different numbers). `used`: the layer's per-head fill, when the caller already read it."""
    used = head_state(ctx, i)[2] if used is None else np.asarray(used)
    buf = np.empty(int(used.sum()), dtype=np.int32)
    got = _check("get_positions", lib.llama_localkv_get_positions(
        ctx, i, buf.ctypes.data_as(POINTER(c_int32)), buf.size))
    assert got == buf.size
    return _ragged(buf, used, -1)


def get_stat(ctx, i: int, stat: int, n_heads: int, sum_per_kv_head: bool = False, used=None) -> np.ndarray:
    """[n_heads, n_used] float32 statistic of the i-th layer (n_heads: query or KV heads, as requested; 0 past
    a head's own count). `used`: the layer's per-head fill, when the caller already read it."""
    used = head_state(ctx, i)[2] if used is None else np.asarray(used)
    rows = np.repeat(used, n_heads // len(used))
    buf = np.empty(int(rows.sum()), dtype=np.float32)
    got = _check("get_stat", lib.llama_localkv_get_stat(
        ctx, i, stat, sum_per_kv_head, buf.ctypes.data_as(POINTER(c_float)), buf.size))
    assert got == buf.size
    return _ragged(buf, rows, 0.0)


def get_stats(ctx, stat: int, heads: list[int], used: np.ndarray, sum_per_kv_head: bool = False) -> list[np.ndarray]:
    """get_stat of every cached layer in one call (one transfer per device): a [heads[i], n_used] array per layer.
    `heads`: rows per layer (query or KV heads, as requested); `used`: every head's fill, layer after layer."""
    kv = kv_heads(ctx)
    first = np.concatenate([[0], np.cumsum(kv)]).astype(int)
    rows = [np.repeat(np.asarray(used[first[i]:first[i + 1]]), heads[i] // kv[i]) for i in range(len(kv))]
    buf = np.empty(int(sum(r.sum() for r in rows)), dtype=np.float32)
    got = _check("get_stats", lib.llama_localkv_get_stats(
        ctx, stat, sum_per_kv_head, buf.ctypes.data_as(POINTER(c_float)), buf.size))
    assert got == buf.size
    out, at = [], 0
    for r in rows:
        n = int(r.sum())
        out.append(_ragged(buf[at:at + n], r, 0.0))
        at += n
    return out


def keep(ctx, i: int, slots) -> None:
    """Keep slots[h] in KV head h of the i-th layer (a [n_head_kv, n_keep] array, or one array per head when
    the heads keep different counts); free the rest."""
    rows = [np.asarray(s, dtype=np.int32).reshape(-1) for s in slots]
    if isinstance(slots, np.ndarray) and slots.ndim != 2:
        raise LocalkvError("keep: slots must be a [n_head_kv, n_keep] array or one array per KV head")
    counts = np.array([len(r) for r in rows], dtype=np.int32)
    flat = np.ascontiguousarray(np.concatenate(rows) if rows else np.empty(0, dtype=np.int32), dtype=np.int32)
    _check("keep", lib.llama_localkv_keep(ctx, i, flat.ctypes.data_as(POINTER(c_int32)),
                                          counts.ctypes.data_as(POINTER(c_int32))))


def transfers(ctx) -> int:
    """Synchronous host-device transfers compression has made since enable."""
    return _check("transfers", lib.llama_localkv_transfers(ctx))


def stats_bytes(ctx) -> int:
    return _check("stats_bytes", lib.llama_localkv_stats_bytes(ctx))


def transfer_bytes(ctx) -> int:
    """Bytes compression moved between host and backend since enable (indices, statistics read, fallbacks)."""
    return _check("transfer_bytes", lib.llama_localkv_transfer_bytes(ctx))


def read_rows(ctx, i: int, which: int) -> np.ndarray:
    """[rows, row bytes] uint8: the raw K (which=0) or V (1) rows of the i-th layer's slots in use, one row per
    (KV head, slot), head after head."""
    row = _check("read_rows", lib.llama_localkv_read_rows(ctx, i, which, None, 0))
    n = int(head_state(ctx, i)[2].sum())
    buf = np.empty((n, row), dtype=np.uint8)
    _check("read_rows", lib.llama_localkv_read_rows(ctx, i, which, buf.ctypes.data_as(c_void_p), buf.size))
    return buf
