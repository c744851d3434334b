"""Reading named tensors out of llama.cpp's compute graph while it runs (ggml's eval callback).

KVzap's calibration reads each layer's hidden state at the attention's input here (`HiddenTap`); the tests read
Q, K and V the same way (tests/graph_dump.py) to check the in-graph statistics against NumPy.
"""
from __future__ import annotations

import ctypes
import functools

import numpy as np

from .capi import llama_cpp as ll  # loads the library on first use: importing this module needs none

GGML_MAX_DIMS, GGML_MAX_SRC, GGML_MAX_OP_PARAMS, GGML_MAX_NAME = 4, 10, 64, 64
GGML_TYPE_F32 = 0


class GgmlTensor(ctypes.Structure):
    """The leading fields of struct ggml_tensor (ggml/include/ggml.h), enough to read shape and name."""
    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * GGML_MAX_DIMS),
        ("nb", ctypes.c_size_t * GGML_MAX_DIMS),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * (GGML_MAX_OP_PARAMS // 4)),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * GGML_MAX_SRC),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * GGML_MAX_NAME),
    ]


def ggml_base_function(name: str):
    """A function of the libggml-base that libllama loaded (found globally, else next to libllama)."""
    try:
        return getattr(ctypes.CDLL(None), name)
    except AttributeError:
        import pathlib
        lib_dir = pathlib.Path(ll._lib._name).parent
        return getattr(ctypes.CDLL(str(lib_dir / "libggml-base.so")), name)


@functools.cache
def _tensor_get():
    f = ggml_base_function("ggml_backend_tensor_get")
    f.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    f.restype = None
    return f


def read_f32(t_ptr, t: GgmlTensor) -> np.ndarray | None:
    """A contiguous float32 tensor's data (None for another type or layout), shaped as NumPy sees it (ne reversed)."""
    ne = list(t.ne)
    contiguous = t.nb[0] == 4 and all(t.nb[d] == t.nb[d - 1] * ne[d - 1] for d in range(1, GGML_MAX_DIMS))
    if t.type != GGML_TYPE_F32 or not contiguous:
        return None
    buf = np.empty(int(np.prod(ne)), dtype=np.float32)
    _tensor_get()(t_ptr, buf.ctypes.data, 0, buf.nbytes)
    return buf.reshape(ne[::-1])


class HiddenTap:
    """While `armed`, keeps every layer's hidden state at the attention's input (the graph's `attn_norm-<layer>`, the
    name llama.cpp's model builders give the normed input of Q, K and V), [tokens, n_embd] float32 per decode, in
    `states[layer]` (a list, one array per ubatch). Pass `callback` as the engine's eval_callback."""

    PREFIX = "attn_norm-"

    def __init__(self, n_embd: int):
        self.n_embd = n_embd
        self.armed = False
        self.states: dict[int, list[np.ndarray]] = {}
        self.callback = ll.ggml_backend_sched_eval_callback(self._cb)

    def clear(self) -> None:
        self.states = {}

    def _cb(self, t_ptr, ask, user_data):
        if not self.armed:
            return False if ask else True
        t = ctypes.cast(t_ptr, ctypes.POINTER(GgmlTensor)).contents
        name = t.name.decode(errors="replace")
        layer = name[len(self.PREFIX):]
        if not name.startswith(self.PREFIX) or not layer.isdigit() or t.ne[0] != self.n_embd:
            return False if ask else True
        if ask:
            return True
        x = read_f32(t_ptr, t)
        if x is not None:
            self.states.setdefault(int(layer), []).append(x.reshape(-1, self.n_embd))
        return True


@functools.cache
def op_name():
    """ggml_op_name(op) -> bytes."""
    f = ggml_base_function("ggml_op_name")
    f.argtypes = [ctypes.c_int]
    f.restype = ctypes.c_char_p
    return f


# ops that only reinterpret a tensor's memory: no kernel runs for them
EMPTY_OPS = frozenset({"NONE", "VIEW", "RESHAPE", "PERMUTE", "TRANSPOSE"})


class OpCounter:
    """Counts the nodes llama.cpp computes, by op (ggml_op_name): ggml's eval callback asks about each node once;
    answering no keeps every graph computed in one piece, as it would be without the callback."""

    def __init__(self):
        self.ops: dict[str, int] = {}
        self.callback = ll.ggml_backend_sched_eval_callback(self._cb)

    def reset(self) -> None:
        self.ops = {}

    @property
    def nodes(self) -> int:
        return sum(self.ops.values())

    @property
    def kernels(self) -> int:
        """Nodes that run a kernel (not a view, reshape, permute or transpose)."""
        return sum(n for op, n in self.ops.items() if op not in EMPTY_OPS)

    def _cb(self, t_ptr, ask, user_data):
        if ask:
            op = op_name()(ctypes.cast(t_ptr, ctypes.POINTER(GgmlTensor)).contents.op).decode()
            self.ops[op] = self.ops.get(op, 0) + 1
        return False if ask else True
