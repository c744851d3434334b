"""KVzap: the learned scorer computed in the graph against NumPy on the hidden states of the same pass, KVzip+'s
normed maximum (STAT_MAX_NORMED) against NumPy on the replay's Q, K and hidden states, and the calibration's
targets against a NumPy KVzip+ of the same replay."""
import numpy as np
import pytest

from conftest import make_engine, raw_decode
from graph_dump import GraphDump
from localkv import capi

pytestmark = pytest.mark.model

N_LAYER, N_HEAD, N_HEAD_KV, D, N_EMBD = 24, 14, 2, 64, 896
GROUP = N_HEAD // N_HEAD_KV
LAYERS = (0, 13, 23)

TEXT = ("Mira keeps bees on the roof of the old cinema. Each hive has a name: Saffron, Tuesday and the Colonel. "
        "In June the Colonel swarmed twice, and she caught the second swarm in a cardboard box. ") * 3


def _f16(x):
    return x.astype(np.float16).astype(np.float64)


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def _dump(layers):
    names = {f"attn_norm-{il}" for il in layers} | {f"{n}cur-{il}" for n in "QK" for il in layers}
    return GraphDump(names, widths={f"attn_norm-{il}": N_EMBD for il in layers})


def _x(dump, il, i):
    return dump.tensors[f"attn_norm-{il}"][i][0].astype(np.float64)  # [tokens, n_embd]


@pytest.mark.parametrize("hidden", [0, 16])
def test_scorer_in_the_graph_matches_numpy(model_path, hidden):
    """Linear and MLP scorers: STAT_SCORE of every slot equals the weights applied to that token's attention input,
    across two ubatches and a compaction (scores follow their tokens)."""
    rng = np.random.default_rng(hidden)
    weights = {}
    dump = _dump(LAYERS)
    with make_engine(model_path, policy="snapkv", budget=256, chunk=64, eval_callback=dump.callback) as eng:
        for i in range(N_LAYER):
            if hidden:
                w = (rng.standard_normal((hidden, N_EMBD)) * 0.05, rng.standard_normal(hidden),
                     rng.standard_normal((N_HEAD_KV, hidden)) * 0.3, rng.standard_normal(N_HEAD_KV))
            else:
                w = (rng.standard_normal((N_HEAD_KV, N_EMBD)) * 0.05, rng.standard_normal(N_HEAD_KV), None, None)
            weights[i] = w
            capi.set_scorer(eng.ctx, i, *w)
        capi.set_stats(eng.ctx, [capi.STAT_SCORE], 16)
        eng._stats_phase = "manual"
        tokens = eng.model.tokenize(TEXT)[:90]
        raw_decode(eng, tokens[:50])
        dump.end_pass()
        raw_decode(eng, tokens[50:90])
        dump.end_pass()
        keep = np.array([np.arange(0, 90, 3), np.arange(1, 90, 3)])  # each head its own tokens
        for i in range(N_LAYER):
            capi.keep(eng.ctx, i, keep)
        for il in LAYERS:
            x = np.concatenate([_x(dump, il, 0), _x(dump, il, 1)])
            w1, b1, w2, b2 = weights[il]
            h = x @ w1.T + b1
            if hidden:
                h = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h ** 3)))  # ggml's gelu
                h = h @ w2.T + b2
            want = np.stack([h[keep[k], k] for k in range(N_HEAD_KV)])
            got = capi.get_stat(eng.ctx, il, capi.STAT_SCORE, N_HEAD_KV)
            np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3 * np.abs(want).max())


def test_max_normed_matches_numpy(model_path):
    """STAT_MAX_NORMED per query head: the running max over the observed queries of softmax attention divided by
    the query's hidden-state norm, with positions hidden as a replay hides them."""
    dump = _dump(LAYERS)
    with make_engine(model_path, policy="snapkv", budget=256, chunk=64, eval_callback=dump.callback) as eng:
        tokens = eng.model.tokenize(TEXT)[:100]
        raw_decode(eng, tokens[:60])
        dump.end_pass()
        capi.set_stats(eng.ctx, [capi.STAT_MAX_NORMED], 64, query_heads=True)
        eng._stats_phase = "manual"
        capi.set_hidden(eng.ctx, 4, 30)
        raw_decode(eng, tokens[60:100])
        dump.end_pass()
        capi.set_hidden(eng.ctx, 0, 0)
        for il in LAYERS:
            q = dump.tensors[f"Qcur-{il}"][1].astype(np.float64)
            k = _f16(np.concatenate([dump.tensors[f"Kcur-{il}"][0], dump.tensors[f"Kcur-{il}"][1]]))
            norm = np.linalg.norm(_x(dump, il, 1), axis=1)
            visible = np.r_[0:4, 30:60]
            want = np.zeros((N_HEAD, 100))
            for j in range(40):
                cols = np.concatenate([visible, np.arange(60, 61 + j)])
                for h in range(N_HEAD):
                    p = _softmax(k[cols, h // GROUP] @ q[j, h] / np.sqrt(D)) / norm[j]
                    want[h, cols] = np.maximum(want[h, cols], p)
            got = capi.get_stat(eng.ctx, il, capi.STAT_MAX_NORMED, N_HEAD)
            np.testing.assert_allclose(got, want, atol=3e-3 * want.max(), rtol=2e-2)
            assert (got[:, 4:30] == 0).all()
