"""Hostile and random arguments to every llama_localkv_* function: error codes, never a crash.

A crash here takes the whole pytest process down, which fails the run.
"""
import ctypes

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from localkv import capi

pytestmark = pytest.mark.model

N_LAYER, N_HEAD_KV = 24, 2
N_HEADS = N_LAYER * N_HEAD_KV
CODES = {0, -1, -2, -3, -4, -5, -6, -7}


@pytest.fixture(scope="module")
def live(model_path):
    """A compressed context holding 40 tokens (shared by the examples; refilled when a keep empties it)."""
    from conftest import make_engine
    eng = make_engine(model_path, policy="snapkv", budget=64, chunk=64)
    eng._tokens = eng.model.tokenize("The quick brown fox jumps over the lazy dog. " * 8)[:40]
    yield eng
    eng.close()


def _refill(eng):
    from conftest import raw_decode
    eng.reset()
    raw_decode(eng, eng._tokens)


int32 = st.integers(-2**31, 2**31 - 1)
small = st.integers(-3, 60)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(layer=st.one_of(small, int32), slots=st.lists(st.one_of(small, int32), max_size=130),
       n_keep=st.one_of(small, int32), n_keep2=st.one_of(small, int32), stat=st.one_of(st.integers(-2, 8), int32),
       flags=st.one_of(st.integers(0, 1 << 7), int32.map(lambda x: x & 0xFFFFFFFF)),
       window=st.one_of(st.integers(0, 70000), st.just(0xFFFFFFFF)), null=st.booleans(), n_out=st.integers(0, 200))
def test_random_arguments_return_codes(live, layer, slots, n_keep, n_keep2, stat, flags, window, null, n_out):
    lib, ctx = capi.lib, live.ctx
    if capi.layer_state(ctx, 0)[2] == 0:
        _refill(live)

    arr = (ctypes.c_int32 * max(len(slots), 1))(*slots) if slots else None
    # per-head counts (the heads of a layer may keep different numbers); a too-short slots array would make C
    # read past it: the API can't know the length, so pass what the declared counts need or NULL (the caller's
    # side of the contract), with hostile values inside
    counts = (ctypes.c_int32 * N_HEAD_KV)(n_keep, n_keep2)
    if arr is not None and len(slots) < max(n_keep, 0) + max(n_keep2, 0):
        arr = None
    rc = lib.llama_localkv_keep(ctx, layer, None if null else arr, None if null and n_out % 2 else counts)
    assert rc in CODES
    if rc == 0:
        assert capi.head_state(ctx, layer)[2].tolist() == [n_keep, n_keep2]
        pos = capi.positions(ctx, layer)
        for h, n in enumerate((n_keep, n_keep2)):
            assert len(set(pos[h, :n].tolist())) == n

    fbuf = (ctypes.c_float * max(n_out, 1))()
    rc = lib.llama_localkv_get_stat(ctx, layer, stat, bool(n_out % 2), None if null else fbuf, n_out)
    assert rc in CODES or rc > 0
    ibuf = (ctypes.c_int32 * max(n_out, 1))()
    rc = lib.llama_localkv_get_positions(ctx, layer, None if null else ibuf, n_out)
    assert rc in CODES or rc > 0
    ubuf = (ctypes.c_uint32 * max(n_out, 1))()
    rc = lib.llama_localkv_cache_state(ctx, None if null else ubuf, ubuf, None, n_out)
    assert rc in CODES or rc == N_HEADS
    assert lib.llama_localkv_clear_stat(ctx, stat) in CODES
    rc = lib.llama_localkv_set_stats(ctx, flags, window)
    assert rc in CODES
    capi.set_stats(ctx, [capi.STAT_OBS], 32)  # back to a sane setting for the next example
    rc = lib.llama_localkv_read_rows(ctx, layer, stat, None if null else fbuf, n_out)
    assert rc in CODES or rc > 0
    assert lib.llama_localkv_transfer_bytes(ctx) >= 0
    # resize with hostile sizes: refused with a code, or done keeping every token
    # hostile sizes are 0 or past the C limit (2^24 slots, refused); the valid ones stay small, since a valid
    # size just under the limit is a real multi-GB allocation and would exhaust the machine, not test a check
    def size(i, x):
        return abs(x) % 300 if i % 7 else (0, (1 << 24) + 1 + abs(x) % 1000, 0xFFFFFFFF)[abs(x) % 3]
    sizes = (ctypes.c_uint32 * N_HEADS)(*[size(i, x) for i, x in
                                          enumerate((slots * N_HEADS)[:N_HEADS] or [0] * N_HEADS)])
    used = capi.cache_state(ctx)[2].tolist()
    rc = lib.llama_localkv_resize(ctx, None if null else sizes, sizes, N_HEADS if n_out % 3 else n_out)
    assert rc in CODES
    assert capi.cache_state(ctx)[2].tolist() == used


def test_null_context_everywhere():
    lib = capi.lib
    assert lib.llama_localkv_memory_bytes(None) == -1
    assert lib.llama_localkv_compute_bytes(None) == -1
    assert lib.llama_localkv_n_kv_layers(None) == -1
    assert lib.llama_localkv_kv_layer_info(None, 0, None, None, None, None) == -1
    assert lib.llama_localkv_enabled(None) == -1
    assert lib.llama_localkv_set_stats(None, 0, 32) == -1
    assert lib.llama_localkv_cache_state(None, None, None, None, 0) == -1
    assert lib.llama_localkv_get_positions(None, 0, None, 0) == -1
    assert lib.llama_localkv_get_stat(None, 0, 0, False, None, 0) == -1
    assert lib.llama_localkv_keep(None, 0, None, None) == -1
    assert lib.llama_localkv_clear_stat(None, 0) == -1
    assert lib.llama_localkv_stats_bytes(None) == -1
    assert lib.llama_localkv_enable(None, None, None, 0) == -1
    assert lib.llama_localkv_resize(None, None, None, 0) == -1
    assert lib.llama_localkv_transfer_bytes(None) == -1
    assert lib.llama_localkv_read_rows(None, 0, 0, None, 0) == -1
    assert isinstance(lib.llama_localkv_last_error(), bytes)


def test_decoding_after_random_evictions_still_works(live):
    _refill(live)
    rng = np.random.default_rng(3)
    for i in range(N_LAYER):
        n = capi.layer_state(live.ctx, i)[2]
        # ragged: head 0 keeps 10 tokens, head 1 a number of its own per layer
        keep = [np.sort(rng.choice(n, size=k, replace=False)) for k in (10, 3 + i % 9)]
        capi.keep(live.ctx, i, keep)
    live.n_past = 40
    live._decode(live._tokens[:5], True)   # attends the kept tokens + 5 new ones per head (room was left)
    assert capi.head_state(live.ctx, 0)[2].tolist() == [15, 8]
    assert capi.head_state(live.ctx, 5)[2].tolist() == [15, 5 + 3 + 5]
