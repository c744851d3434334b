"""SurfaceLogicKV (calibrated per-head budgets) and head-adaptive budgets, against NumPy references.

The references here are written from the formulas (shared/research/policies.md), loop by loop, apart from the
product's vectorised code: head scores on the attention rows a real calibration recorded, the floor + pool
capacities, SnapKV selection inside each head, and AdaKV's sharing of a layer's budget.
"""
import json
import os

import numpy as np
import pytest

from conftest import make_engine
from localkv import calibrate as cal
from localkv import capi, profiles
from localkv.errors import LocalkvError
from localkv.policies import DECODE, PREFILL, LayerView, create
from localkv.policies.surfacelogickv import surface_logic_capacities

N_LAYER, N_HEAD, N_HEAD_KV = 24, 14, 2


# ---------------------------------------------------------------- references

def ref_step(att, positions, needle, tokens, generated):
    """Surface and logic of each query head for one step, one head at a time."""
    k = len(needle)
    surf, logic = np.zeros(att.shape[0]), np.zeros(att.shape[0])
    for h in range(att.shape[0]):
        j = int(np.argmax(att[h]))
        p = int(positions[h, j])
        if p in set(needle.tolist()) and tokens[p] == generated:
            surf[h] = 1.0 / k
        for j in sorted(range(att.shape[1]), key=lambda s: -att[h, s])[:k]:
            if int(positions[h, j]) in set(needle.tolist()):
                logic[h] += att[h, j] / k
    return surf, logic


def ref_capacities(scores, budget, window, beta):
    """Floor + pool, exactly as real numbers."""
    free = budget - window
    n = len(scores)
    return np.array([window + (free - free / beta) + (free / beta) * n * s for s in scores])


def ref_snapkv_keep(obs, positions, n_seen, cap, window, kernel):
    """SnapKV inside one head: max-pool the observed attention, protect the window, best `cap` slots."""
    n = len(obs)
    pooled = np.array([max(obs[max(0, j - kernel // 2):j + kernel - kernel // 2]) for j in range(n)])
    score = np.where(positions >= n_seen - window, np.inf, pooled)
    if n <= cap:
        return np.arange(n)
    return np.sort(np.argsort(-score, kind="stable")[:cap])


def ref_adaptive(scores, used, caps, floor):
    """AdaKV's split of a layer's budget, one slot at a time: floors first, then the best remaining anywhere."""
    total = min(int(sum(caps)), int(sum(used)))
    take = [min(u, max(int(np.isposinf(s[:u]).sum()), int(np.ceil(floor * c)))) for s, u, c in zip(scores, used, caps)]
    pool = sorted(((-float(scores[h][j]), h, r) for h in range(len(used))
                   for r, j in enumerate(np.argsort(-scores[h][:used[h]], kind="stable")) if r >= take[h]))
    for _neg, h, _r in pool[:total - sum(take)]:
        take[h] += 1
    return take


# ---------------------------------------------------------------- calibration

@pytest.fixture(scope="module")
def recorded(model_path):
    rec = []
    prof = cal.calibrate(model_path, probes=2, seed=3, record=rec, threads=2)
    return prof, rec


@pytest.mark.model
@pytest.mark.slow  # calibrates
def test_head_scores_match_numpy_on_the_recorded_attention(recorded):
    prof, rec = recorded
    surf, logic = np.zeros((N_LAYER, N_HEAD)), np.zeros((N_LAYER, N_HEAD))
    steps = set()
    for probe, step, layer, att, pos, needle, tokens, greedy in rec:
        # the rows are softmax attention over what the head's KV slots hold
        np.testing.assert_allclose(att.sum(axis=1), 1.0, atol=2e-3)
        s, lg = ref_step(att, pos, needle, tokens, greedy)
        surf[layer] += s
        logic[layer] += lg
        steps.add((probe, step))
    assert prof["probes"] == 2 and len(steps) >= 4
    np.testing.assert_allclose(prof["surface"], surf / 2, atol=1e-9)
    np.testing.assert_allclose(prof["logic"], logic / 2, atol=1e-6)
    # real heads of a real model copy the needle: some score, most do not
    assert 0 < (prof["surface"] > 0).mean() < 0.5 and prof["logic"].max() > 0.3


@pytest.mark.model
@pytest.mark.slow  # calibrates
def test_inference_scores_are_the_weighted_group_sums_normalised(recorded):
    prof, _rec = recorded
    for ws, wl in ((1.0, 1.0), (2.0, 0.5), (0.0, 1.0)):
        got = profiles.inference_scores(prof["surface"], prof["logic"], [N_HEAD_KV] * N_LAYER, ws, wl)
        want = []
        for layer in range(N_LAYER):
            for g in range(N_HEAD_KV):
                qs = range(g * N_HEAD // N_HEAD_KV, (g + 1) * N_HEAD // N_HEAD_KV)
                want.append(sum(ws * prof["surface"][layer, q] + wl * prof["logic"][layer, q] for q in qs))
        np.testing.assert_allclose(got, np.array(want) / sum(want), rtol=1e-12)
    flat = profiles.inference_scores(np.zeros((2, 4)), np.zeros((2, 4)), [2, 2], 1, 1)
    np.testing.assert_allclose(flat, 0.25)


def test_step_scores_on_a_hand_made_row():
    att = np.array([[0.1, 0.6, 0.3, 0.0], [0.5, 0.1, 0.1, 0.3]])
    pos = np.array([[0, 1, 2, 3], [0, 1, 2, 3]])
    tokens = np.array([7, 42, 43, 9])
    s, lg = cal.step_scores(att, pos, np.array([1, 2]), tokens, 42)
    np.testing.assert_allclose(s, [0.5, 0.0])            # head 0 copies token 42 from the needle; head 1 looks away
    np.testing.assert_allclose(lg, [(0.6 + 0.3) / 2, 0.0])  # head 1's top-2 are positions 0 and 3


# ---------------------------------------------------------------- capacities

@pytest.mark.parametrize("budget", [64, 128, 256])
@pytest.mark.parametrize("beta", [1.0, 1.5, 4.0])
def test_capacities_are_floor_plus_pool_and_add_up_exactly(budget, beta):
    rng = np.random.default_rng(budget)
    scores = rng.gamma(0.3, size=N_LAYER * N_HEAD_KV)
    scores /= scores.sum()
    caps = np.array(surface_logic_capacities(scores, budget, 32, beta))
    exact = ref_capacities(scores, budget, 32, beta)
    assert caps.sum() == budget * len(scores)
    assert (np.abs(caps - exact) < 1).all()
    assert caps.min() >= int(32 + (budget - 32) * (1 - 1 / beta))


def test_the_shipped_profile_gives_uneven_budgets_for_the_default_model():
    from localkv.models import load_registry
    sha = next(e["sha256"] for e in load_registry() if e.get("default"))
    path = profiles.shipped_profile_path(sha)
    prof = profiles.read_profile(path, sha, (N_LAYER, N_HEAD))
    caps = surface_logic_capacities(profiles.kv_scores(prof).reshape(-1), 128, 32, 1.5)
    assert sum(caps) == 128 * N_LAYER * N_HEAD_KV and max(caps) > 2 * min(caps)


# ---------------------------------------------------------------- selection inside each head

def _view(rng, caps, used, n_seen=400, stat=capi.STAT_OBS):
    used = np.asarray(used)
    n = int(used.max())
    positions = np.full((len(used), n), -1)
    for h, u in enumerate(used):
        positions[h, :u] = np.sort(rng.choice(n_seen, size=u, replace=False))
    obs = rng.gamma(0.5, size=(len(used), n)).astype(np.float32) * (positions >= 0)
    view = LayerView(ctx=None, index=0, layer=0, n_layers=1, n_head=N_HEAD, n_head_kv=len(used),
                     capacity=np.asarray(caps), positions=positions, n_seen=n_seen, phase=PREFILL, used=used)
    view._stats[(stat, True)] = obs
    return view, obs


def test_selection_inside_each_head_is_snapkv_up_to_its_own_capacity():
    pol = create("surfacelogickv", {"whole_words": "false"})
    rng = np.random.default_rng(0)
    for caps, used in (([50, 140], [300, 300]), ([90, 33], [250, 120]), ([200, 40], [150, 180])):
        view, obs = _view(rng, caps, used)
        keep = pol.select(view)
        for h in range(2):
            u = used[h]
            want = ref_snapkv_keep(obs[h, :u], view.positions[h, :u], view.n_seen, caps[h], pol.window, pol.kernel)
            np.testing.assert_array_equal(keep[h], want)


# ---------------------------------------------------------------- head-adaptive budgets

@pytest.mark.parametrize("floor", [0.0, 0.2, 0.5])
def test_adaptive_counts_match_the_reference_and_keep_the_layer_total(floor):
    from localkv.policies.base import adaptive_counts
    rng = np.random.default_rng(7)
    for _ in range(20):
        h = int(rng.integers(1, 5))
        used = rng.integers(20, 200, size=h)
        caps = rng.integers(10, 150, size=h)
        scores = np.full((h, used.max()), -np.inf)
        for i, u in enumerate(used):
            scores[i, :u] = rng.gamma(rng.uniform(0.2, 3.0), size=u)
            scores[i, u - 5:u] = np.inf  # a protected window
        got = adaptive_counts(scores, used, caps, floor, used)
        assert got.tolist() == ref_adaptive(scores, used, caps, floor)
        assert got.sum() == min(caps.sum(), used.sum()) and (got <= used).all()


def test_adaptive_selection_follows_the_scores_across_heads():
    """A head whose attention is concentrated gives its share to one whose attention is spread."""
    pol = create("snapkv", {"adaptive": "true", "whole_words": "false", "kernel": "1"})
    rng = np.random.default_rng(1)
    view, obs = _view(rng, [100, 100], [300, 300])
    view._stats[(capi.STAT_OBS, True)][0] = np.where(np.arange(300) < 20, 1.0, 1e-4)  # head 0: 20 hot tokens
    keep = pol.select(view)
    assert len(keep[0]) + len(keep[1]) == 200
    assert len(keep[0]) < 100 < len(keep[1])
    uniform = create("snapkv", {"whole_words": "false", "kernel": "1"}).select(view)
    assert [len(k) for k in uniform] == [100, 100]


def test_adaptive_and_surfacelogickv_arguments_are_checked():
    with pytest.raises(LocalkvError, match="no argument 'adaptive'"):
        create("surfacelogickv", {"adaptive": "true"})
    with pytest.raises(LocalkvError, match="beta"):
        create("surfacelogickv", {"beta": "0.5"}).validate(128)
    with pytest.raises(LocalkvError, match="adaptive_floor"):
        create("ahakv", {"adaptive": "true", "adaptive_floor": "1.5"}).validate(128)
    with pytest.raises(LocalkvError, match="no argument 'adaptive'"):
        create("streamingllm", {"adaptive": "true"})


def test_a_layer_whose_heads_share_its_budget_is_over_only_as_a_whole():
    from types import SimpleNamespace

    from localkv.cache import CompressedCache
    used = np.array([200, 40, 100, 100, 150, 150])
    targets = np.full(6, 128)
    limits = np.array([300, 300, 300, 300, 300, 140])

    def over(args, lim=None):
        cache = SimpleNamespace(head0=np.array([0, 2, 4, 6]), policy=create("snapkv", args))
        return CompressedCache.layers_over(cache, used, targets, lim)
    assert over({}) == [0, 2]                          # a head over its own target
    assert over({"adaptive": "true"}) == [2]           # only the layer whose total is over (300 > 256)
    assert over({"adaptive": "true"}, limits) == [2]
    limits[1] = 30                                     # a head past its slots less the room asked for
    assert over({"adaptive": "true"}, limits) == [0, 2]


@pytest.mark.model
@pytest.mark.parametrize("policy", ["snapkv", "ahakv", "h2o", "pyramidkv"])
def test_adaptive_engine_holds_each_layers_total_and_answers(model_path, policy):
    from localkv.bench.tasks import make_sample
    # H2O's half-recent split misses this needle at 96 uniform or adaptive alike
    budget = 160 if policy == "h2o" else 96
    with make_engine(model_path, policy=policy, budget=budget, policy_args={"adaptive": "true"}) as eng:
        s = make_sample("niah_single", 700, 0.4, 11, eng.model.tokenize)
        res = eng.generate(s.context + "\n\n" + s.question, max_tokens=24, temperature=0,
                           answer_prefix=s.answer_prefix)
        _cap, _alloc, used = capi.cache_state(eng.ctx)
        per_layer = used.reshape(N_LAYER, N_HEAD_KV)
        # the layer's heads share its budget: uneven heads, the layer total within one decode interval of it
        caps = eng.head_capacities.reshape(N_LAYER, N_HEAD_KV)
        assert (per_layer.sum(1) <= caps.sum(1) + N_HEAD_KV * eng.decode_interval).all()
        assert (per_layer[:, 0] != per_layer[:, 1]).any()
        assert res.kv_bytes_allocated < eng.full_bytes(res.prompt_tokens, "f16") / 2
        assert s.score(res.text) == 1.0, res.text


# ---------------------------------------------------------------- the engine and profiles

@pytest.mark.model
def test_surfacelogickv_memory_follows_the_calibrated_capacities(model_path):
    with make_engine(model_path, policy="surfacelogickv", budget=128) as eng:
        caps = eng.head_capacities
        assert caps.sum() == 128 * N_LAYER * N_HEAD_KV and len(set(caps.tolist())) > 5
        rep = eng.memory_report(tokens=4096)
        heads = [c for lm in rep.layers for c in lm.head_capacities]
        assert heads == caps.tolist()
        # the slots each head holds at rest follow its own capacity (ragged storage)
        _cap, alloc, _used = capi.cache_state(eng.ctx)
        assert (alloc >= np.minimum(caps, 4096)).all() and (alloc < np.minimum(caps, 4096) + 32 + 32).all()
        uniform = make_engine(model_path, policy="snapkv", budget=128)
        try:
            ref = uniform.memory_report(tokens=4096).kv_bytes_allocated
        finally:
            uniform.close()
        # the same tokens in all; each head's slots are padded to a multiple of 32, uneven heads pad more
        assert 1.0 <= rep.kv_bytes_allocated / ref < 1.15


@pytest.mark.model
@pytest.mark.slow  # calibrates
def test_a_missing_profile_is_calibrated_on_first_use_and_saved(model_path, tmp_path, monkeypatch):
    monkeypatch.setenv("LOCALKV_CACHE", str(tmp_path))
    monkeypatch.setattr(profiles, "SHIPPED_DIR", tmp_path / "none")
    monkeypatch.setattr(cal, "DEFAULT_PROBES", 1)
    with make_engine(model_path, policy="surfacelogickv", budget=64) as eng:
        path = eng.policy.profile_path
        assert path.startswith(str(tmp_path)) and os.path.isfile(path)
        assert eng.head_capacities.sum() == 64 * N_LAYER * N_HEAD_KV
    stamp = os.stat(path).st_mtime_ns
    with make_engine(model_path, policy="surfacelogickv", budget=64) as eng:  # read back, not calibrated again
        assert eng.policy.profile_path == path
    assert os.stat(path).st_mtime_ns == stamp


@pytest.mark.model
def test_a_bad_profile_is_one_clear_error(model_path, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(LocalkvError, match="unreadable"):
        make_engine(model_path, policy="surfacelogickv", budget=64, policy_args={"profile": str(bad)})
    bad.write_text(json.dumps({"format": 1, "kind": "surfacelogickv", "surface": [[1, 2]], "logic": [[1, 2]]}))
    with pytest.raises(LocalkvError, match="layers x"):
        make_engine(model_path, policy="surfacelogickv", budget=64, policy_args={"profile": str(bad)})


def _profile_and_change(kind):
    """A small profile of `kind`, a changed copy of it, and how to read it back (for the write tests)."""
    if kind == "pod":
        sim = np.array([[0.9, 0.1], [0.2, 0.7]])
        prof = {"format": 1, "kind": "pod", "model_sha256": "ab" * 32, "n_layer": 3, "kv_heads": [2, 2, 2],
                "delta": 0.5, "similarity": sim, "leaders": profiles.pod_blocks(sim, 0.5)}
        return prof, {**prof, "similarity": sim / 2, "leaders": profiles.pod_blocks(sim / 2, 0.5)}, ((3, 2), "pod")
    prof = {"format": 1, "kind": "surfacelogickv", "model_sha256": "ab" * 32, "kv_heads": [1],
            "surface": np.zeros((1, 2)), "logic": np.ones((1, 2))}
    return prof, {**prof, "logic": np.full((1, 2), 2.0)}, ((1, 2), "surfacelogickv")


@pytest.mark.parametrize("kind", ["surfacelogickv", "pod"])
def test_profiles_are_written_atomically(tmp_path, monkeypatch, kind):
    target = tmp_path / "p.json"
    prof, changed, (shape, read_kind) = _profile_and_change(kind)
    profiles.write_profile(prof, target)
    before = target.read_bytes()

    def boom(*_a, **_k):
        raise OSError("disk full")
    monkeypatch.setattr(json, "dump", boom)
    with pytest.raises(OSError):
        profiles.write_profile(changed, target)
    assert target.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["p.json"]
    back = profiles.read_profile(target, "ab" * 32, shape, kind=read_kind)
    if kind == "pod":
        assert back["similarity"].tolist() == prof["similarity"].tolist()
        assert back["leaders"].tolist() == [[0, 0], [0, 1], [2, 1]]
    else:
        assert back["logic"].tolist() == [[1.0, 1.0]]
    with pytest.raises(LocalkvError, match="another model"):
        profiles.read_profile(target, "cd" * 32, kind=read_kind)
