"""Read named tensors out of llama.cpp's compute graph while it runs (ggml's eval callback).

Used to check the in-graph statistics against NumPy computed from the very Q, K
and V of the same forward pass.
"""
from __future__ import annotations

import ctypes

import numpy as np

from localkv.capi import llama_cpp as ll  # loads the library on first use: importing this module needs none
from localkv.graph_tap import GgmlTensor, OpCounter
from localkv.graph_tap import _tensor_get as _get

F32 = 0


OpCount = OpCounter  # the product's counter (localkv.graph_tap), as the tests name it


class GraphDump:
    """Collects float32 copies of the graph tensors whose names are in `names` (e.g. 'Qcur-3').

    Several nodes can carry one name (a projection, its bias add, its RoPE): per
    graph computation the last one of shape [head_dim, heads, tokens] wins, which
    for Qcur/Kcur is the RoPE output that goes into attention and the cache.
    tensors[name][i] is that tensor of the i-th llama_decode, as [tokens, heads, head_dim].
    """

    def __init__(self, names: set[str], head_dim: int = 64, widths: dict[str, int] | None = None):
        self.names = names
        self.head_dim = head_dim
        self.widths = widths or {}  # a name whose rows are not head_dim wide (an attention output [n_embd, tokens])
        self.tensors: dict[str, list[np.ndarray]] = {}
        self._pass: dict[str, np.ndarray] = {}
        self.callback = ll.ggml_backend_sched_eval_callback(self._cb)

    def end_pass(self) -> None:
        """Call after each llama_decode: files this computation's tensors."""
        for name, arr in self._pass.items():
            self.tensors.setdefault(name, []).append(arr)
        self._pass = {}

    def _cb(self, t_ptr, ask, user_data):
        t = ctypes.cast(t_ptr, ctypes.POINTER(GgmlTensor)).contents
        name = t.name.decode(errors="replace")
        if name not in self.names:
            return False if ask else True
        if ask:
            return True
        if t.type != F32:
            return True
        ne = list(t.ne)
        # contiguous float32 [head_dim, heads, tokens] only
        if ne[0] != self.widths.get(name, self.head_dim) or ne[3] != 1 or t.nb[0] != 4 or t.nb[1] != 4 * ne[0] or t.nb[2] != 4 * ne[0] * ne[1]:
            return True
        n = int(np.prod(ne))
        buf = np.empty(n, dtype=np.float32)
        _get()(t_ptr, buf.ctypes.data, 0, n * 4)
        self._pass[name] = buf.reshape(ne[::-1])[0]  # [tokens, heads, head_dim]
        return True
