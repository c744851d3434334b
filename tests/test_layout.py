"""The attention layout shaped for GPUs: a run of heads with equal slots attends in one call whatever each head
holds (each KV head a stream with its own mask: the live mask's view at decode, a gathered template block in a
prefill), the engine pads a layer's heads into at most two such runs, and a compression reads each statistic
once and uploads its indices once.

Checked on the default model against NumPy on the dumped Q/K/V (prefill and single-token decode, flash attention
on and off, hidden positions), and on a random Llama-3-8B-shaped model (8 KV heads) by counting the graph's
kernels per decoded token and per replay batch.
"""
import itertools

import numpy as np
import pytest

from conftest import make_engine, raw_decode
from graph_dump import GraphDump
from localkv import capi
from localkv.cache import group_slots
from localkv.graph_tap import OpCounter
from test_compressed import D, GROUP, N_HEAD, N_HEAD_KV, N_LAYER, TEXT


def _f16(x):
    return x.astype(np.float16).astype(np.float32)


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


# ---------------------------------------------------------------- the layout rule (no model)

def _cost(slots, out):
    return sum(o - s for s, o in zip(slots, out))


@pytest.mark.parametrize("seed", range(40))
def test_group_slots_is_the_cheapest_split_into_runs(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 9))
    slots = [32 * int(x) for x in rng.integers(1, 40, size=n)]
    for parts in (1, 2, 3):
        out = group_slots(slots, parts)
        assert len(out) == n and all(o >= s for s, o in zip(slots, out))
        runs = [len(list(g)) for _k, g in itertools.groupby(out)]
        assert len(runs) <= parts
        # brute force over every split of the heads into at most `parts` consecutive runs
        best = min(_cost(slots, [max(slots[a:b]) for a, b in zip((0,) + cuts, cuts + (n,)) for _ in range(b - a)])
                   for k in range(min(parts, n)) for cuts in itertools.combinations(range(1, n), k))
        assert _cost(slots, out) == best


def test_group_slots_leaves_equal_or_few_heads_alone():
    assert group_slots([64, 64, 64], 2) == [64, 64, 64]
    assert group_slots([96, 32], 2) == [96, 32]
    assert group_slots([96, 32, 64, 32, 128, 32, 32, 64], 2) == [128] * 5 + [64] * 3


# ---------------------------------------------------------------- attention against NumPy (default model)

LAYERS = (0, 13)


def _ref(q, keys, values, n_old, p_hidden=None):
    """Attention of the ubatch's queries q [T, H, d] over each KV head's own keys: keys[hk] [n_old + T, d] (its kept
    tokens, then the ubatch's), causal over the ubatch; `p_hidden[hk]`: a mask of the kept tokens hidden."""
    n_tok = q.shape[0]
    out = np.zeros((n_tok, q.shape[1], values[0].shape[1]))
    for t in range(n_tok):
        for h in range(q.shape[1]):
            hk = h // GROUP
            vis = np.ones(len(keys[hk]), dtype=bool)
            vis[n_old[hk] + t + 1:] = False
            if p_hidden is not None:
                vis[:n_old[hk]] &= ~p_hidden[hk]
            logits = keys[hk][vis] @ q[t, h] / np.sqrt(D)
            out[t, h] = _softmax(logits) @ values[hk][vis]
    return out


def _check_outputs(dump, kept, n_first, hidden=None):
    """The last pass's attention output of LAYERS against NumPy over each head's kept tokens (of the first
    n_first) and every token written after them."""
    t = dump.tensors
    for il in LAYERS:
        k_all = _f16(np.concatenate(t[f"Kcur-{il}"]))
        v_all = _f16(np.concatenate(t[f"Vcur-{il}"]))
        q = t[f"Qcur-{il}"][-1]
        n_tok = q.shape[0]
        n_total = k_all.shape[0]
        keys, values, n_old, hid = [], [], [], []
        for hk in range(N_HEAD_KV):
            rows = np.concatenate([kept[il][hk], np.arange(n_first, n_total)])
            keys.append(k_all[rows, hk])
            values.append(v_all[rows, hk])
            n_old.append(len(rows) - n_tok)
            if hidden is not None:
                hid.append((rows[:len(rows) - n_tok] >= hidden[0]) & (rows[:len(rows) - n_tok] < hidden[1]))
        want = _ref(q, keys, values, n_old, hid if hidden is not None else None)
        got = t[f"kqv_out-{il}"][-1][0].reshape(n_tok, N_HEAD, D)
        np.testing.assert_allclose(got, want, atol=1e-2, rtol=2e-2, err_msg=f"layer {il}")


@pytest.mark.model
@pytest.mark.parametrize("flash_attn", [True, False])
def test_heads_of_one_run_with_different_fills_attend_their_own_tokens(model_path, flash_attn):
    """Both heads of every layer have the same slots (one attention call) but keep 45 and 12 + layer tokens: a
    prefill ubatch (masks gathered from the template) and single-token decodes (the live mask's view) each see
    exactly their head's tokens."""
    dump = GraphDump({f"{n}cur-{il}" for n in "QKV" for il in LAYERS}, widths={f"kqv_out-{il}": N_HEAD * D for il in LAYERS})
    dump.names |= {f"kqv_out-{il}" for il in LAYERS}
    with make_engine(model_path, policy="snapkv", budget=64, chunk=64, flash_attn=flash_attn,
                     eval_callback=dump.callback) as eng:
        tokens = eng.model.tokenize(TEXT * 2)
        for part in (tokens[:50], tokens[50:100]):
            raw_decode(eng, part)
            dump.end_pass()
        rng = np.random.default_rng(7)
        kept = {}
        for i in range(N_LAYER):
            kept[i] = [np.sort(rng.choice(100, size=c, replace=False)) for c in (45, 12 + i)]
            capi.keep(eng.ctx, i, kept[i])
        alloc = capi.cache_state(eng.ctx)[1]
        assert len(set(alloc.tolist())) == 1  # one run per layer
        raw_decode(eng, tokens[100:108], True)  # a prefill ubatch
        dump.end_pass()
        _check_outputs(dump, kept, 100)
        for j in range(108, 111):  # decode steps
            raw_decode(eng, [tokens[j]], True)
            dump.end_pass()
            _check_outputs(dump, kept, 100)


@pytest.mark.model
def test_hidden_positions_are_masked_per_head_in_one_call(model_path):
    """Positions hidden (a replay's rule) are closed in the live mask of each head: the heads keep different tokens,
    so each hides its own slots, and the layer still attends in one call."""
    dump = GraphDump({f"{n}cur-{il}" for n in "QKV" for il in LAYERS}, widths={f"kqv_out-{il}": N_HEAD * D for il in LAYERS})
    dump.names |= {f"kqv_out-{il}" for il in LAYERS}
    with make_engine(model_path, policy="snapkv", budget=64, chunk=64, eval_callback=dump.callback) as eng:
        tokens = eng.model.tokenize(TEXT * 2)
        for part in (tokens[:40], tokens[40:80]):
            raw_decode(eng, part)
            dump.end_pass()
        rng = np.random.default_rng(3)
        kept = {i: [np.sort(rng.choice(80, size=c, replace=False)) for c in (60, 30)] for i in range(N_LAYER)}
        for i in range(N_LAYER):
            capi.keep(eng.ctx, i, kept[i])
        capi.set_hidden(eng.ctx, 20, 50)
        for n in (6, 1):  # a ubatch, then a single token
            at = 80 if n == 6 else 86
            raw_decode(eng, tokens[at:at + n], True)
            dump.end_pass()
            _check_outputs(dump, kept, 80, hidden=(20, 50))
        capi.set_hidden(eng.ctx, 0, 0)
        raw_decode(eng, [tokens[87]], True)
        dump.end_pass()
        _check_outputs(dump, kept, 80)


# ---------------------------------------------------------------- reads and uploads per compression

@pytest.mark.model
def test_a_compression_reads_each_statistic_once(model_path):
    """Every layer's statistic comes back in one transfer (the per-layer call reads the same values), and a
    compression and the decode after it move a few blocks, whatever the number of layers."""
    with make_engine(model_path, policy="snapkv", budget=64, chunk=64) as eng:
        tokens = eng.model.tokenize(TEXT * 2)
        eng._stats_phase = "manual"
        capi.set_stats(eng.ctx, [capi.STAT_OBS, capi.STAT_VNORM], 16)
        raw_decode(eng, tokens[:60])
        raw_decode(eng, tokens[60:120])
        used = capi.cache_state(eng.ctx)[2]
        t0 = capi.transfers(eng.ctx)
        every = capi.get_stats(eng.ctx, capi.STAT_OBS, [N_HEAD_KV] * N_LAYER, used, True)
        assert capi.transfers(eng.ctx) - t0 == 1
        for i in range(N_LAYER):
            np.testing.assert_array_equal(every[i], capi.get_stat(eng.ctx, i, capi.STAT_OBS, N_HEAD_KV, True))
        t0 = capi.transfers(eng.ctx)
        assert eng.compress("prefill", targets=np.full(N_LAYER * N_HEAD_KV, 64))
        raw_decode(eng, tokens[120:121])
        # for all 24 layers: each statistic SnapKV reads comes back once and each it clears is cleared once (at
        # most 2 x 2), the compaction's indices and zeros go up once each, and the live masks once
        assert 3 <= capi.transfers(eng.ctx) - t0 <= 2 * 2 + 3


# ---------------------------------------------------------------- kernels per token (random 8-KV-head model)

@pytest.fixture(scope="module")
def llama_shaped(tmp_path_factory):
    from localkv.synthetic import write_random_model
    return str(write_random_model(tmp_path_factory.mktemp("layout") / "llama.gguf", "llama"))


def test_ragged_layers_cost_at_most_a_quarter_more_kernels(llama_shaped):
    from localkv.bench.graph import run
    res = run(llama_shaped, prompt=512, budget=128, decode=4, threads=2)
    n_layers = 4
    full, uniform, ragged = res["full"], res["uniform"], res["ragged"]
    assert ragged["heads_kept_min"] < ragged["heads_kept_max"]  # the heads really are ragged
    assert uniform["ops_per_token"]["FLASH_ATTN_EXT"] == n_layers
    assert ragged["ops_per_token"]["FLASH_ATTN_EXT"] <= 2 * n_layers
    assert ragged["parts_per_layer_max"] <= 2
    assert ragged["kernels_per_token"] <= 1.25 * full["kernels_per_token"]
    assert uniform["kernels_per_token"] <= 1.1 * full["kernels_per_token"]


def test_a_replay_attends_in_at_most_two_calls_per_layer(llama_shaped):
    """KVzip's replay hides positions while the heads hold different counts (one threshold over all heads): every
    batch, replays included, still attends a layer in at most two calls."""
    from localkv.bench.speed import filler_tokens
    counter = OpCounter()
    with make_engine(llama_shaped, policy="kvzip", budget=96, chunk=128, eval_callback=counter.callback) as eng:
        per_batch = []
        run = eng._run_batch

        def counted(*a, **kw):
            counter.reset()
            run(*a, **kw)
            per_batch.append(counter.ops.get("FLASH_ATTN_EXT", 0))
        eng._run_batch = counted
        eng.feed(filler_tokens(eng.model, 600))
        assert eng.compressions >= 1
        used = capi.cache_state(eng.ctx)[2]
        assert used.min() < used.max()
    assert len(per_batch) > 5 and max(per_batch) <= 2 * 4
