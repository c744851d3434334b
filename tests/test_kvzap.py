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


class _Tap:
    """The calibration's tap (HiddenTap's interface) that also keeps Q, K, V and the hidden states of every pass."""

    def __init__(self, layers):
        import ctypes

        from localkv.capi import llama_cpp as ll
        from localkv.graph_tap import GgmlTensor, read_f32
        self.names = {f"{n}cur-{il}" for n in "QKV" for il in layers} | {f"attn_norm-{il}" for il in range(N_LAYER)}
        self.armed, self.states, self.passes = False, {}, []
        self._ctypes, self._tensor, self._read = ctypes, GgmlTensor, read_f32
        self.callback = ll.ggml_backend_sched_eval_callback(self._cb)

    def clear(self):
        self.states = {}

    def _cb(self, t_ptr, ask, user_data):
        t = self._ctypes.cast(t_ptr, self._ctypes.POINTER(self._tensor)).contents
        name = t.name.decode(errors="replace")
        if name not in self.names:
            return False if ask else True
        if ask:
            return True
        x = self._read(t_ptr, t)
        if x is None or (name[0] in "QKV" and t.ne[0] != D):
            return True
        if name == "attn_norm-0" or not self.passes:
            self.passes.append({})  # layer 0's input opens every decode
        self.passes[-1][name] = x[0] if name[0] in "QKV" else x.reshape(-1, N_EMBD)  # [tokens, heads, d] or [tokens, n_embd]
        if self.armed and name.startswith("attn_norm-"):
            self.states.setdefault(int(name.split("-")[1]), []).append(x.reshape(-1, N_EMBD))
        return True


def test_calibration_targets_match_numpy_kvzip_plus(model_path):
    """read_and_replay's targets: log max over the replay's queries and each group's query heads of
    softmax(q k / sqrt d) / ||x_query|| * ||W_o^h v||, from the Q, K, V and hidden states of the same passes and the
    GGUF's W_o; its inputs are the tokens' own hidden states."""
    from localkv import surrogate
    layers = (2, 17)
    tap = _Tap(layers)
    eng = surrogate._replaying_engine(model_path, None, 2, tap)
    try:
        grams = surrogate.wo_gram(eng.model_path, [il for il, _k, _v in eng.kv_layers], N_HEAD)
        tokens = eng.model.tokenize(TEXT)[:120]
        xs, ys = surrogate.read_and_replay(eng, tap, tokens, grams)
    finally:
        eng.close()
    read, replay = tap.passes[0], tap.passes[1]  # one ubatch each
    import gguf
    reader = gguf.GGUFReader(model_path)
    for il in layers:
        np.testing.assert_array_equal(xs[il], read[f"attn_norm-{il}"])
        q = replay[f"Qcur-{il}"].astype(np.float64)                         # [m, heads, d]
        k = _f16(np.concatenate([read[f"Kcur-{il}"], replay[f"Kcur-{il}"]]))  # context, then the replay's own
        v = _f16(read[f"Vcur-{il}"])
        norm = np.linalg.norm(replay[f"attn_norm-{il}"].astype(np.float64), axis=1)
        t = next(t for t in reader.tensors if t.name == f"blk.{il}.attn_output.weight")
        wo = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float64)  # [n_embd, heads * d]
        n = len(tokens)
        best = np.zeros((N_HEAD, n))
        for j in range(len(q)):
            for h in range(N_HEAD):
                p = _softmax(k[:n + j + 1, h // GROUP] @ q[j, h] / np.sqrt(D))
                best[h] = np.maximum(best[h], p[:n] / norm[j])
        wov = np.stack([np.linalg.norm(v[:, h // GROUP] @ wo[:, h * D:(h + 1) * D].T, axis=1) for h in range(N_HEAD)])
        want = np.log((best * wov).reshape(N_HEAD_KV, GROUP, n).max(axis=1)).T  # [n, n_head_kv]
        np.testing.assert_allclose(ys[il], want, atol=0.03)


def _profile_weights(eng):
    from localkv.profiles import KVZAP_KIND
    profile, _path = eng.profile(KVZAP_KIND)
    return profile["weights"].astype(np.float64), profile["bias"].astype(np.float64)


def _recorded_keeps(eng):
    chosen = {}
    orig = capi.keep

    def record(ctx, i, slots):
        chosen[i] = [np.asarray(s) for s in slots]
        orig(ctx, i, slots)
    return chosen, record


def test_kvzap_keeps_the_numpy_selection(model_path, monkeypatch):
    """One compression after the prompt (a working set that holds it): the kept tokens are one threshold over every
    (layer, KV head) of the surrogate's scores computed in NumPy from the same pass's hidden states."""
    dump = GraphDump({f"attn_norm-{il}" for il in range(N_LAYER)}, widths={f"attn_norm-{il}": N_EMBD
                                                                          for il in range(N_LAYER)})
    budget, n = 48, 150
    args = {"whole_words": "false", "head_floor": "0"}
    with make_engine(model_path, policy="kvzap", budget=budget, prefill_budget=256, chunk=256, policy_args=args,
                     eval_callback=dump.callback) as eng:
        w, b = _profile_weights(eng)
        chosen, record = _recorded_keeps(eng)
        monkeypatch.setattr(capi, "keep", record)
        tokens = eng.model.tokenize(TEXT * 2)[:n]
        eng.feed(tokens)
        dump.end_pass()
        assert eng.replays == 0 and eng.compressions == 1
    pos = np.arange(n)
    protected = (pos < 4) | (pos >= n - 32)
    scores = np.stack([np.where(protected[:, None], np.inf, _x(dump, il, 0) @ w[il].T + b[il]).T
                       for il in range(N_LAYER)]).reshape(N_LAYER * N_HEAD_KV, n)
    n_free = (budget - int(protected.sum())) * N_LAYER * N_HEAD_KV
    threshold = np.sort(scores[np.isfinite(scores)])[::-1][n_free - 1]
    for i in range(N_LAYER):
        for h in range(N_HEAD_KV):
            sc = scores[i * N_HEAD_KV + h]
            got, want = set(chosen[i][h].tolist()), set(np.flatnonzero(sc >= threshold).tolist())
            for x in got ^ want:  # only ties at the threshold (float32 against float64) may differ
                assert abs(sc[x] - threshold) <= 1e-3 * max(1.0, abs(threshold)), f"layer {i} head {h} slot {x}"


def test_chunk_by_chunk_keeps_what_one_pass_keeps(model_path):
    """Scores that need no question: a prompt compressed chunk by chunk in a working set of the budget plus a chunk
    keeps mostly the tokens that one compression after the whole prompt keeps, at a fraction of the memory. Not
    all: once the first tokens are compressed, the later ones are read over a compressed past, so their hidden
    states (and scores) move a little. (A head capped at its share of the working set kept 66% of them.)"""
    from localkv.bench.tasks import make_sample
    kept, peak = {}, {}
    for working_set in (None, 4096):
        with make_engine(model_path, policy="kvzap", budget=64, prefill_budget=working_set, chunk=64) as eng:
            sample = make_sample("fact_code", 820, 0.5, 3, eng.model.tokenize)
            tokens = eng.model.tokenize(sample.context)[:700]
            eng.feed(tokens)
            peak[working_set] = eng.kv_bytes_peak
            kept[working_set] = [set(p[p >= 0].tolist()) for v in eng.layer_views("decode") for p in v.positions]
            assert eng.replays == 0
    assert eng.plan.prefill_budget == 4096
    same = sum(len(a & b) for a, b in zip(kept[None], kept[4096])) / sum(len(b) for b in kept[4096])
    assert same >= 0.8, same
    assert peak[None] < peak[4096] / 3


def test_threshold_mode_follows_the_content_and_holds_the_budget(model_path):
    """threshold=T: each head keeps what scores at least T (and its sinks and window), bounded by the budget, at
    every compression point, prefill and decode alike."""
    with make_engine(model_path, policy="kvzap", budget=200, chunk=64,
                     policy_args={"threshold": "-3", "whole_words": "false"}) as eng:
        w, b = _profile_weights(eng)
        res = eng.generate("Summarize: " + TEXT * 2, max_tokens=80, temperature=0, ignore_eos=True)
        assert res.generated_tokens == 80
        cap, alloc, used = capi.cache_state(eng.ctx)
        assert (used <= 200 + eng.decode_interval).all()
        for v in eng.layer_views("decode"):
            score = v.stat(capi.STAT_SCORE)
            for h in range(v.n_head_kv):
                p = v.positions[h, :v.head_used[h]]
                s = score[h, :v.head_used[h]]
                recent = p >= eng.n_past - 32 - eng.decode_interval  # the window, and what was decoded since
                assert ((s >= -3 - 1e-4) | recent | (p < 4)).all()
        assert used.mean() < 200  # the threshold dropped more than the budget asks


@pytest.mark.parametrize("name", ["llama", "qwen3", "phi3", "gemma3", "gpt-oss"])
def test_the_scorer_finds_the_attention_input_of_every_architecture(tmp_path, name):
    """The graph walk from K back to the attention's input works for separate and fused QKV projections, QK-norm,
    attention sinks and sliding-window models (their compressed layers): STAT_SCORE equals NumPy on attn_norm."""
    from localkv.synthetic import SHAPES, write_random_model
    shape = SHAPES[name]
    path = str(write_random_model(tmp_path / f"{name}.gguf", name))
    rng = np.random.default_rng(1)
    with make_engine(path, policy="snapkv", budget=256, chunk=64, ctx=1024) as eng:
        layers = [il for il, _k, _v in eng.kv_layers]
        dump = GraphDump({f"attn_norm-{il}" for il in layers}, widths={f"attn_norm-{il}": shape.n_embd for il in layers})
    with make_engine(path, policy="snapkv", budget=256, chunk=64, ctx=1024, eval_callback=dump.callback) as eng:
        weights = [(rng.standard_normal((shape.n_head_kv, shape.n_embd)), rng.standard_normal(shape.n_head_kv))
                   for _ in layers]
        for i, (w, b) in enumerate(weights):
            capi.set_scorer(eng.ctx, i, w, b)
        capi.set_stats(eng.ctx, [capi.STAT_SCORE], 16)
        eng._stats_phase = "manual"
        raw_decode(eng, eng.model.tokenize(TEXT)[:40])
        dump.end_pass()
        for i, il in enumerate(layers):
            w, b = weights[i]
            want = (dump.tensors[f"attn_norm-{il}"][0][0].astype(np.float64) @ w.T + b).T
            got = capi.get_stat(eng.ctx, i, capi.STAT_SCORE, shape.n_head_kv)
            np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * np.abs(want).max())


def test_scorer_arguments_are_checked(model_path):
    with make_engine(model_path, policy="snapkv", budget=64) as eng:
        with pytest.raises(capi.CapiError, match="embedding width"):
            capi.set_scorer(eng.ctx, 0, np.zeros((2, 100)), np.zeros(2))
        with pytest.raises(capi.CapiError, match="no cached layer"):
            capi.set_scorer(eng.ctx, 24, np.zeros((2, N_EMBD)), np.zeros(2))
        capi.set_scorer(eng.ctx, 0, np.zeros((2, N_EMBD)), np.zeros(2))
        capi.set_scorer(eng.ctx, 0)  # removed


def test_kvzap_refuses_what_it_cannot_do():
    from localkv import policies
    from localkv.errors import LocalkvError
    for args in ({}, {"threshold": "-3"}):
        with pytest.raises(LocalkvError, match="one set of tokens"):
            policies.create("pod+kvzap", args).validate(256)
    for bad in ("inf", "nan", "x"):
        with pytest.raises(policies.PolicyArgError, match="threshold"):
            policies.create("kvzap", {"threshold": bad})


def test_calibration_end_to_end_writes_a_profile_the_policy_reads(model_path, tmp_path, monkeypatch):
    """A small fit (7 short documents): train, validation and test pieces, a profile written atomically and read
    back by the policy through the user cache, and a fit that predicts something (positive rank correlation)."""
    from localkv import profiles, surrogate
    from localkv.models import file_sha256
    docs = []
    for k in range(7):
        p = tmp_path / f"doc{k}.txt"
        p.write_text(" ".join(f"Line {k}.{j}: the {['pump', 'valve', 'gauge'][j % 3]} reads {j * 7 + k} units "
                              f"at station {chr(65 + k)}." for j in range(60)))
        docs.append(p)
    sha = file_sha256(model_path)
    prof = surrogate.calibrate_kvzap(model_path, pieces=7, files=docs, piece=120, threads=2, sha256=sha)
    assert prof["weights"].shape == (N_LAYER, N_HEAD_KV, N_EMBD) and prof["bias"].shape == (N_LAYER, N_HEAD_KV)
    assert sorted(prof["documents"]) == [f"files:doc{k}.txt" for k in range(7)]
    assert np.isfinite(prof["test_r2"]) and prof["test_spearman"] > 0.2
    monkeypatch.setenv("LOCALKV_CACHE", str(tmp_path / "cache"))
    path = profiles.user_profile_path(sha, "kvzap")
    profiles.write_profile(prof, path)
    back = profiles.read_profile(path, sha, (N_LAYER, N_HEAD_KV), kind="kvzap")
    np.testing.assert_allclose(back["weights"], prof["weights"], rtol=1e-5, atol=1e-12)
    with make_engine(model_path, policy="kvzap", budget=64) as eng:
        assert eng.profile("kvzap")[1] == path  # the user's own fit wins over the shipped one
        res = eng.generate("Say hi.", max_tokens=4, temperature=0)
        assert res.generated_tokens > 0
