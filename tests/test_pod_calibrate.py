"""POD's offline layer grouping (`localkv calibrate --policy pod`), against NumPy references.

The references are written from the definitions, apart from the product's vectorised code: the Jensen-Shannon
similarity term by term, the greedy blocks layer by layer, and the calibrated similarity recomputed from the
attention rows the calibration recorded.
"""
import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from localkv import calibrate as cal
from localkv import profiles
from localkv.errors import LocalkvError

N_LAYER, N_HEAD, N_HEAD_KV = 24, 14, 2
PROBES, QUERIES = 1, 2


# ---------------------------------------------------------------- references

def ref_js_similarity(p, q):
    """1 - JS divergence in bits of two rows, one term at a time."""
    p = [x / sum(p) for x in p]
    q = [x / sum(q) for x in q]
    js = 0.0
    for a, b in zip(p, q):
        m = (a + b) / 2
        if a > 0:
            js += 0.5 * a * math.log2(a / m)
        if b > 0:
            js += 0.5 * b * math.log2(b / m)
    return 1.0 - js


def ref_blocks(sim, delta):
    """Greedy per head, one (layer, head) at a time: a layer joins the current block or starts its own."""
    n_layers, n_kv = sim.shape[0] + 1, sim.shape[1]
    leaders = np.zeros((n_layers, n_kv), dtype=int)
    for h in range(n_kv):
        leader = 0
        for layer in range(1, n_layers):
            if not sim[layer - 1, h] >= delta:
                leader = layer
            leaders[layer, h] = leader
    return leaders


def assert_one_line(excinfo, match):
    msg = str(excinfo.value)
    assert "\n" not in msg and match in msg, msg


# ---------------------------------------------------------------- similarity and blocks

def test_js_similarity_matches_the_formula():
    rng = np.random.default_rng(0)
    p, q = rng.gamma(0.3, size=(5, 40)), rng.gamma(0.3, size=(5, 40))
    p[:, :7] = 0  # zeros on one side only: 0 log 0 = 0
    got = cal.js_similarity(p, q)
    assert got.shape == (5,)
    np.testing.assert_allclose(got, [ref_js_similarity(a, b) for a, b in zip(p, q)], rtol=1e-12)
    np.testing.assert_allclose(cal.js_similarity(p, 3 * p), 1.0)        # the same row, scaled: renormalised
    assert cal.js_similarity([1, 1, 0, 0], [0, 0, 2, 5]) == 0.0          # disjoint
    np.testing.assert_allclose(cal.js_similarity([1, 0], [0.5, 0.5]), ref_js_similarity([1, 0], [0.5, 0.5]))
    stack = rng.random((3, 4, 10))  # any leading axes
    np.testing.assert_allclose(cal.js_similarity(stack, stack[::-1])[1], 1.0)


@pytest.mark.parametrize("delta", [0.0, 0.3, 0.5, 0.9, 1.0])
def test_blocks_are_the_greedy_reference_on_random_similarities(delta):
    rng = np.random.default_rng(int(delta * 10))
    for n_layers, n_kv in ((2, 1), (5, 3), (24, 2), (40, 8)):
        sim = rng.random((n_layers - 1, n_kv)).round(2)  # ties with delta happen
        leaders = cal.pod_blocks(sim, delta)
        want = ref_blocks(sim, delta)
        np.testing.assert_array_equal(leaders, want)
        spans = cal.pod_spans(leaders)
        for h in range(n_kv):  # the spans tile the layers, each starting at its leader
            assert spans[h][0][0] == 0 and spans[h][-1][1] == n_layers - 1
            for (a, b), (c, _d) in zip(spans[h], spans[h][1:]):
                assert c == b + 1
            for a, b in spans[h]:
                assert (want[a:b + 1, h] == a).all()
        assert cal.pod_followers(leaders) == sum(want[l, h] != l for l in range(n_layers) for h in range(n_kv))
    assert (cal.pod_blocks(np.ones((3, 2)), 1.0) == 0).all()            # all alike: one block per head
    assert (cal.pod_blocks(np.zeros((3, 2)), 0.5) == np.arange(4)[:, None]).all()


# ---------------------------------------------------------------- calibration

@pytest.fixture(scope="module")
def shared_model(model_path):
    from localkv.llama import Model, init_backend
    init_backend()
    model = Model(model_path)
    yield model
    model.close()


@pytest.fixture(scope="module")
def recorded(shared_model):
    rec = []
    prof = cal.calibrate_pod(probes=PROBES, last_queries=QUERIES, seed=5, record=rec, shared_model=shared_model,
                             threads=2)
    return prof, rec


@pytest.mark.model
@pytest.mark.slow  # calibrates
def test_calibrated_similarity_is_recomputed_from_the_recorded_rows(recorded):
    prof, rec = recorded
    rows = {(probe, query, layer): r for probe, query, layer, r in rec}
    assert len(rows) == len(rec) == PROBES * QUERIES * N_LAYER
    group = N_HEAD // N_HEAD_KV
    want = np.zeros((N_LAYER - 1, N_HEAD_KV))
    for probe in range(PROBES):
        for query in range(QUERIES):
            n_slots = rows[(probe, query, 0)].shape[1]
            for layer in range(N_LAYER):
                att = rows[(probe, query, layer)]
                # softmax rows over every token of the probe so far (nothing evicted), one more per query
                assert att.shape == (N_HEAD, n_slots) and (att >= 0).all()
                np.testing.assert_allclose(att.sum(axis=1), 1.0, atol=2e-3)
                if query:
                    assert n_slots == rows[(probe, query - 1, 0)].shape[1] + 1
            for layer in range(N_LAYER - 1):
                a, b = rows[(probe, query, layer)].tolist(), rows[(probe, query, layer + 1)].tolist()
                for h in range(N_HEAD_KV):
                    sims = [ref_js_similarity(a[q], b[q]) for q in range(h * group, (h + 1) * group)]
                    want[layer, h] += sum(sims) / group
    want /= PROBES * QUERIES
    np.testing.assert_allclose(prof["similarity"], want, atol=2e-6)
    assert prof["similarity"].shape == (N_LAYER - 1, N_HEAD_KV)
    # real layers neither attend the same nor apart
    assert 0.05 < prof["similarity"].min() and prof["similarity"].max() < 0.99
    np.testing.assert_array_equal(prof["leaders"], ref_blocks(prof["similarity"], cal.DEFAULT_POD_DELTA))
    assert prof["kind"] == "pod" and prof["delta"] == cal.DEFAULT_POD_DELTA and prof["last_queries"] == QUERIES


@pytest.mark.model
@pytest.mark.slow  # calibrates
def test_blocks_follow_the_reference_on_the_recorded_similarities(recorded):
    sim = recorded[0]["similarity"]
    followers = []
    for delta in np.linspace(0, 1, 21):
        leaders = cal.pod_blocks(sim, delta)
        np.testing.assert_array_equal(leaders, ref_blocks(sim, delta))
        followers.append(cal.pod_followers(leaders))
    # a higher delta never merges more: all follow at 0, none at 1
    assert followers[0] == (N_LAYER - 1) * N_HEAD_KV and followers[-1] == 0
    assert all(a >= b for a, b in zip(followers, followers[1:]))


# ---------------------------------------------------------------- profiles

@pytest.mark.model
@pytest.mark.slow  # calibrates
def test_profile_round_trip_and_where_it_is_found(recorded, tmp_path, monkeypatch):
    prof = recorded[0]
    sha = prof["model_sha256"]
    monkeypatch.setenv("LOCALKV_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(profiles, "SHIPPED_DIR", tmp_path / "shipped")
    assert profiles.find_profile(sha, profiles.POD_KIND) is None
    profiles.write_profile(prof, profiles.shipped_profile_path(sha, profiles.POD_KIND))
    assert profiles.find_profile(sha, profiles.POD_KIND).name == f"pod-{sha[:16]}.json"
    user = profiles.user_profile_path(sha, profiles.POD_KIND)
    profiles.write_profile(prof, user)
    assert profiles.find_profile(sha, profiles.POD_KIND) == user  # the user's own first
    assert profiles.find_profile(sha) is None                     # and it is no surfacelogickv profile
    back = profiles.read_profile(user, sha, (N_LAYER, N_HEAD_KV), kind=profiles.POD_KIND)
    np.testing.assert_array_equal(profiles.read_pod_profile(user, sha, (N_LAYER, N_HEAD_KV))["leaders"],
                                  prof["leaders"])
    np.testing.assert_array_equal(back["similarity"], prof["similarity"])
    np.testing.assert_array_equal(back["leaders"], prof["leaders"])
    assert back["leaders"].dtype == np.int64
    assert {k: v for k, v in back.items() if k not in ("similarity", "leaders")} == \
        {k: v for k, v in prof.items() if k not in ("similarity", "leaders")}


def _pod_file(tmp_path, prof, **changes):
    path = tmp_path / "p.json"
    data = json.loads(json.dumps({**prof, "similarity": np.asarray(prof["similarity"]).tolist(),
                                  "leaders": np.asarray(prof["leaders"]).tolist()}))
    path.write_text(json.dumps({**data, **changes}))
    return path


@pytest.mark.model
@pytest.mark.slow  # calibrates
def test_a_bad_pod_profile_is_one_clear_error(recorded, tmp_path):
    prof = recorded[0]
    sha, sim, leaders = prof["model_sha256"], prof["similarity"], prof["leaders"]
    read = lambda path, **kw: cal.read_profile(path, sha, (N_LAYER, N_HEAD_KV), kind=cal.POD_KIND, **kw)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(LocalkvError) as e:
        read(bad)
    assert_one_line(e, "unreadable")
    assert "--policy pod" in str(e.value)
    with pytest.raises(LocalkvError) as e:
        read(tmp_path / "none.json")
    assert_one_line(e, "no profile")
    invalid = [
        {"kind": "surfacelogickv"},
        {"format": 2},
        {"similarity": sim[:-1].tolist()},                                   # not n_layer - 1 rows
        {"similarity": np.where(sim == sim.max(), 1.5, sim).tolist()},       # not a similarity
        {"similarity": [[float("nan")] * 2] + sim[1:].tolist()},
        {"leaders": np.zeros_like(leaders).tolist()},                        # not the blocks at its delta
        {"leaders": leaders.astype(float).tolist()},
        {"delta": 2.0},
        {"kv_heads": [2] * 23 + [3]},
        {"leaders": None},
    ]
    for change in invalid:
        with pytest.raises(LocalkvError) as e:
            read(_pod_file(tmp_path, prof, **change))
        assert_one_line(e, "not a valid pod profile")
    with pytest.raises(LocalkvError) as e:
        read(_pod_file(tmp_path, prof, model_sha256="cd" * 32))
    assert_one_line(e, "another model")
    small = {"n_layer": 3, "kv_heads": [2] * 3, "similarity": sim[:2].tolist(), "leaders": leaders[:3].tolist()}
    with pytest.raises(LocalkvError) as e:
        read(_pod_file(tmp_path, prof, **small))
    assert_one_line(e, "has 3 layers x 2 KV heads, the model 24 x 2")
    with pytest.raises(LocalkvError) as e:  # a POD profile is no SurfaceLogicKV profile
        cal.read_profile(_pod_file(tmp_path, prof), sha)
    assert_one_line(e, "not a valid surfacelogickv profile")


def test_delta_and_arguments_are_checked():
    for bad in (-0.1, 1.01, 2, float("nan")):
        with pytest.raises(LocalkvError) as e:
            cal.check_pod_delta(bad)
        assert_one_line(e, "--delta must be between 0 and 1")
    with pytest.raises(LocalkvError, match="at least 1"):
        cal.calibrate_pod(probes=0)
    with pytest.raises(LocalkvError, match="last_queries"):
        cal.calibrate_pod(last_queries=0)
    with pytest.raises(LocalkvError, match="--delta"):
        cal.calibrate_pod(delta=1.5)


def test_the_shipped_pod_profile_reads_for_the_default_model():
    from localkv.models import load_registry
    sha = next(e["sha256"] for e in load_registry() if e.get("default"))
    path = profiles.shipped_profile_path(sha, profiles.POD_KIND)
    prof = profiles.read_profile(path, sha, (N_LAYER, N_HEAD_KV), kind="pod")
    assert prof["probes"] == cal.DEFAULT_POD_PROBES and prof["delta"] == cal.DEFAULT_POD_DELTA
    assert 0 < cal.pod_followers(prof["leaders"]) < (N_LAYER - 1) * N_HEAD_KV


@pytest.mark.model
@pytest.mark.slow  # calibrates
def test_load_or_calibrate_pod_reads_else_calibrates_once(shared_model, model_path, tmp_path, monkeypatch, capsys):
    engine = SimpleNamespace(model_path=model_path, kv_layers=[None] * N_LAYER, shape=shared_model.shape,
                             model=shared_model)
    prof, path = cal.load_or_calibrate_pod(engine)  # the shipped one (or the user's own)
    assert path.name == profiles.profile_name(prof["model_sha256"], "pod") and prof["leaders"].shape == (N_LAYER, 2)
    monkeypatch.setenv("LOCALKV_CACHE", str(tmp_path))
    monkeypatch.setattr(profiles, "SHIPPED_DIR", tmp_path / "none")
    monkeypatch.setattr(cal, "DEFAULT_POD_PROBES", 1)
    prof, path = cal.load_or_calibrate_pod(engine)
    assert str(path).startswith(str(tmp_path)) and prof["probes"] == 1
    assert "no pod profile" in capsys.readouterr().err
    stamp = os.stat(path).st_mtime_ns
    assert cal.load_or_calibrate_pod(engine)[1] == path and os.stat(path).st_mtime_ns == stamp


# ---------------------------------------------------------------- the command

def run_cli(*args, env=None):
    env = dict(os.environ, COLUMNS="200", **(env or {}))
    p = subprocess.run([sys.executable, "-m", "localkv.cli", "calibrate", *args], capture_output=True, text=True,
                       timeout=300, env=env)
    return p.returncode, p.stdout, p.stderr


def assert_one_line_error(rc, out, err, match):
    assert rc != 0 and "Traceback" not in err + out
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and match in lines[0], err


@pytest.mark.model
@pytest.mark.slow  # calibrates
def test_calibrate_pod_shows_plots_and_prints_json(recorded, model_path, tmp_path):
    prof = recorded[0]
    env = {"LOCALKV_CACHE": str(tmp_path)}
    saved = cal.user_profile_path(prof["model_sha256"], "pod").name
    cal.write_profile({**prof, "delta": 0.45, "leaders": cal.pod_blocks(prof["similarity"], 0.45)},
                      tmp_path / "profiles" / saved)
    png = tmp_path / "pod.png"
    rc, out, err = run_cli("--policy", "pod", "--show", "--model", model_path, "--plot", str(png), env=env)
    assert rc == 0, err
    n = cal.pod_followers(cal.pod_blocks(prof["similarity"], 0.45))
    assert "delta 0.45" in out and f"{n} of 48 (layer, KV head)s follow" in out and str(tmp_path) in out
    assert "leader" in out and ("follows L" in out) == (n > 0)
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rc, out, err = run_cli("-p", "pod", "--show", "--model", model_path, "--delta", "0.9", "--json", env=env)
    assert rc == 0, err
    got = json.loads(out)
    assert got["kind"] == "pod" and got["delta"] == 0.9 and len(got["similarity"]) == N_LAYER - 1
    assert got["leaders"] == ref_blocks(prof["similarity"], 0.9).tolist()


def test_calibrate_bad_input_is_one_line():
    rc, out, err = run_cli("--policy", "nope")
    assert_one_line_error(rc, out, err, "not 'nope'")
    assert "pod" in err and "surfacelogickv" in err
    assert_one_line_error(*run_cli("--policy", "pod", "--delta", "2"), "--delta must be between 0 and 1")
    assert_one_line_error(*run_cli("--policy", "pod", "--delta", "nan"), "--delta must be between 0 and 1")
    assert_one_line_error(*run_cli("--delta", "0.5"), "--policy pod only")
    assert_one_line_error(*run_cli("--policy", "pod", "--probes", "0"), "at least 1")
    assert_one_line_error(*run_cli("--policy", "pod", "--show", "--plot", "pod.txt"), "PNG")
