"""POD in the compressed cache (patch 0009): followers keep K only for their proximal tokens and use their leader's
logits for the distant ones. Checked against NumPy on the Q, K and V of the same forward pass."""
import json

import numpy as np
import pytest

from conftest import make_engine
from graph_dump import GraphDump
from localkv import capi, policies
from localkv.errors import LocalkvError
from localkv.policies.pod import POD

pytestmark = pytest.mark.model

N_LAYER, N_HEAD, N_HEAD_KV, D = 24, 14, 2, 64
GROUP = N_HEAD // N_HEAD_KV
SINKS, PROXIMAL = 4, 48  # the recent ring holds 44 tokens, so the engine feeds chunks of 44

# layer 0 leads 1 and 2 (both heads); layer 3 leads layer 4's head 0 only (a layer of a follower and a plain
# head); every other layer leads itself
LEADERS = np.array([[0, 0], [0, 0], [0, 0], [3, 3], [3, 4]] + [[l, l] for l in range(5, N_LAYER)])

TEXT = ("The harbour master kept a ledger of every ship. The Albatross came in on Tuesday with salt and rope; "
        "the Heron left at dawn for the islands. The code for the east gate is 5813. ") * 3


class FixedPOD(POD):
    """POD with the blocks above instead of a calibrated profile."""

    def prepare(self, engine):
        self.leaders, self.profile_path = LEADERS, "(test)"
        if self.evict is not None:
            self.evict.prepare(engine)


def _f16(x):
    return x.astype(np.float16).astype(np.float32)


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def ref_pod_attention(q_f, k_f, v_f, q_l, k_l, p0, n_sink, n_recent):
    """The paper's follower attention for the ubatch at positions p0.. (one sequence, position = token index).

    q_*: [T, H, d] queries of the follower and its leader; k_*, v_f: [n, Hkv, d] every token's keys and values.
    After the ubatch is written, the proximal tokens are the first n_sink and the latest n_recent; for any other
    token the follower uses the leader's logit. One softmax over both, applied to the follower's values."""
    n = k_f.shape[0]
    sinks = min(n_sink, n)
    recent = min(n_recent, n - sinks)
    proximal = np.zeros(n, dtype=bool)
    proximal[:sinks] = True
    proximal[n - recent:] = True
    out = np.zeros((q_f.shape[0], q_f.shape[1], v_f.shape[2]))
    for t in range(q_f.shape[0]):
        vis = p0 + t + 1
        for h in range(q_f.shape[1]):
            hk = h // GROUP
            own = k_f[:vis, hk] @ q_f[t, h]
            lead = k_l[:vis, hk] @ q_l[t, h]
            logits = np.where(proximal[:vis], own, lead) / np.sqrt(D)
            out[t, h] = _softmax(logits) @ v_f[:vis, hk]
    return out


def ref_attention(q, k, v, p0):
    out = np.zeros((q.shape[0], q.shape[1], v.shape[2]))
    for t in range(q.shape[0]):
        vis = p0 + t + 1
        for h in range(q.shape[1]):
            out[t, h] = _softmax(k[:vis, h // GROUP] @ q[t, h] / np.sqrt(D)) @ v[:vis, h // GROUP]
    return out


@pytest.fixture(scope="module")
def pod_run(model_path):
    """A POD engine that read TEXT chunk by chunk, with every layer's Q, K, V and attention output recorded."""
    layers = range(6)
    dump = GraphDump({f"{n}cur-{il}" for n in "QKV" for il in layers}, widths={f"kqv_out-{il}": N_HEAD * D for il in layers})
    dump.names |= {f"kqv_out-{il}" for il in layers}
    eng = make_engine(model_path, policy=FixedPOD(sinks=SINKS), budget=PROXIMAL, eval_callback=dump.callback)
    tokens = eng.model.tokenize(TEXT, add_special=True)
    batches = []
    run = eng._run_batch

    def recorded(toks, pos0, *a, **kw):
        run(toks, pos0, *a, **kw)
        dump.end_pass()
        batches.append((pos0, len(toks)))
    eng._run_batch = recorded
    eng.feed(tokens)
    yield eng, dump, batches, tokens
    eng.close()


def test_followers_match_numpy(pod_run):
    eng, dump, batches, tokens = pod_run
    assert eng.chunk == PROXIMAL - SINKS and len(batches) >= 3  # distant tokens exist in the last chunks
    p0, n = batches[-1]
    assert p0 + n == len(tokens) and p0 > PROXIMAL  # the last ubatch sees distant tokens
    t = dump.tensors
    kv = {il: (_f16(np.concatenate(t[f"Kcur-{il}"])), _f16(np.concatenate(t[f"Vcur-{il}"]))) for il in range(6)}
    for il in range(6):
        got = t[f"kqv_out-{il}"][-1][0].reshape(n, N_HEAD, D)
        q = t[f"Qcur-{il}"][-1]
        k, v = kv[il]
        want = ref_attention(q, k, v, p0)
        for hk in range(N_HEAD_KV):
            lead = LEADERS[il, hk]
            if lead != il:
                pod = ref_pod_attention(q, k, v, t[f"Qcur-{lead}"][-1], kv[lead][0], p0, SINKS, PROXIMAL - SINKS)
                want[:, hk * GROUP:(hk + 1) * GROUP] = pod[:, hk * GROUP:(hk + 1) * GROUP]
                # and sharing matters here: the follower's own keys would give another output
                plain = ref_attention(q, k, v, p0)[:, hk * GROUP:(hk + 1) * GROUP]
                assert np.abs(plain - pod[:, hk * GROUP:(hk + 1) * GROUP]).max() > 1e-2
            # followers attend in f32 (ggml ops); other heads through flash attention, with f16 queries
            tol = 3e-3 if lead != il else 1e-2
            cols = slice(hk * GROUP, (hk + 1) * GROUP)
            np.testing.assert_allclose(got[:, cols], want[:, cols], atol=tol, rtol=2e-2, err_msg=f"layer {il} head {hk}")


def test_followers_match_numpy_while_decoding(model_path):
    """Single-token decodes past the recent ring: the distant slots a decode adds are opened on the device (the
    layer's distant row), and each follower's output still matches the paper's attention."""
    layers = range(5)
    dump = GraphDump({f"{n}cur-{il}" for n in "QKV" for il in layers}, widths={f"kqv_out-{il}": N_HEAD * D for il in layers})
    dump.names |= {f"kqv_out-{il}" for il in layers}
    with make_engine(model_path, policy=FixedPOD(sinks=SINKS), budget=PROXIMAL, eval_callback=dump.callback) as eng:
        run = eng._run_batch

        def recorded(toks, pos0, *a, **kw):
            run(toks, pos0, *a, **kw)
            dump.end_pass()
        eng._run_batch = recorded
        tokens = eng.model.tokenize(TEXT, add_special=True)
        eng.feed(tokens[:-3])
        for j in range(3):  # each decode moves one recent token to the distant ones
            p0 = len(tokens) - 3 + j
            eng._decode([tokens[p0]], True)
            t = dump.tensors
            kv = {il: (_f16(np.concatenate(t[f"Kcur-{il}"])), _f16(np.concatenate(t[f"Vcur-{il}"]))) for il in layers}
            for il in (1, 2, 4):
                q = t[f"Qcur-{il}"][-1]
                k, v = kv[il]
                got = t[f"kqv_out-{il}"][-1][0].reshape(1, N_HEAD, D)
                for hk in range(N_HEAD_KV):
                    lead = LEADERS[il, hk]
                    if lead == il:
                        continue
                    want = ref_pod_attention(q, k, v, t[f"Qcur-{lead}"][-1], kv[lead][0], p0, SINKS, PROXIMAL - SINKS)
                    cols = slice(hk * GROUP, (hk + 1) * GROUP)
                    np.testing.assert_allclose(got[:, cols], want[:, cols], atol=3e-3, rtol=2e-2,
                                               err_msg=f"layer {il} head {hk} step {j}")


def test_state_and_bytes(pod_run):
    eng = pod_run[0]
    lead, k_slots, n_sink, first = capi.pod_state(eng.ctx)
    cap, alloc, used = capi.cache_state(eng.ctx)
    expect_lead = np.where(LEADERS == np.arange(N_LAYER)[:, None], -1, LEADERS).reshape(-1)
    assert lead.tolist() == expect_lead.tolist()
    follower = lead >= 0
    assert (k_slots[follower] == 64).all() and (k_slots[~follower] == alloc[~follower]).all()  # pad32(4 + 44)
    assert (n_sink[follower] == SINKS).all() and (first[follower] == used[follower] - (PROXIMAL - SINKS)).all()
    # the K buffer of a layer is its heads' K slots, a follower's ring instead of its slots
    row = D * 2  # f16
    for i, (_il, kb, vb) in enumerate(capi.kv_layers(eng.ctx)):
        heads = slice(i * N_HEAD_KV, (i + 1) * N_HEAD_KV)
        assert kb == k_slots[heads].sum() * row and vb == alloc[heads].sum() * row
    assert capi.kv_layers(eng.ctx)[1][1] < capi.kv_layers(eng.ctx)[0][1]
    # read_rows gives a follower's proximal keys and zeros for the distant ones it does not have
    n = int(used[2])
    k1 = capi.read_rows(eng.ctx, 1, 0).view(np.float16).reshape(N_HEAD_KV, n, D)
    want = np.concatenate(pod_run[1].tensors["Kcur-1"]).astype(np.float16).transpose(1, 0, 2)
    s, r = int(n_sink[2]), int(first[2])
    assert (k1[:, s:r] == 0).all()
    np.testing.assert_array_equal(k1[:, :s], want[:, :s])
    np.testing.assert_array_equal(k1[:, r:], want[:, r:n])


def test_keep_rules(model_path):
    eng = make_engine(model_path, policy=FixedPOD(sinks=SINKS), budget=PROXIMAL)
    try:
        with pytest.raises(capi.CapiError, match="empty cache"):
            eng.feed(eng.model.tokenize("one two three four five six", add_special=True))
            capi.set_pod(eng.ctx, POD.pod_leaders(eng.policy), SINKS, 44)
        eng.feed(eng.model.tokenize(TEXT, add_special=True))
        _cap, _alloc, used = capi.cache_state(eng.ctx)
        n = int(used[0])
        drop_distant = [np.delete(np.arange(n, dtype=np.int32), [SINKS + 1])] * N_HEAD_KV
        # a proximal token cannot go: the followers have no other copy of its key
        with pytest.raises(capi.CapiError, match="proximal"):
            capi.keep(eng.ctx, 0, [np.delete(np.arange(n, dtype=np.int32), [n - 1])] * N_HEAD_KV)
        # a follower keeps what its leader holds: keeping it first, alone, is refused
        with pytest.raises(capi.CapiError, match="leader"):
            capi.keep(eng.ctx, 1, drop_distant)
        capi.keep(eng.ctx, 0, drop_distant)
        capi.keep(eng.ctx, 1, drop_distant)
        # layer 2 still holds the dropped token: the next decode refuses to run, and says why
        with pytest.raises(LocalkvError, match="decode failed"):
            eng.step(int(np.argmax(eng.last_logits())))
        capi.keep(eng.ctx, 2, drop_distant)
        eng.step(int(np.argmax(eng.last_logits())))  # the group agrees again
        assert capi.cache_state(eng.ctx)[2][:6].tolist() == [n] * 6
    finally:
        eng.close()


def test_bad_leaders(model_path):
    eng = make_engine(model_path, policy="snapkv", budget=64)
    try:
        n = N_LAYER * N_HEAD_KV
        with pytest.raises(capi.CapiError, match="earlier layer"):
            capi.set_pod(eng.ctx, [5] + [-1] * (n - 1), 4, 44)  # layer 0 cannot follow layer 5
        chain = [-1] * n
        chain[2], chain[4] = 0, 2  # layer 2 follows 0, layer 4 follows 2: a follower cannot lead
        with pytest.raises(capi.CapiError, match="follows no one"):
            capi.set_pod(eng.ctx, chain, 4, 44)
        with pytest.raises(capi.CapiError, match="leaders"):
            capi.set_pod(eng.ctx, [-1] * 3, 4, 44)
        with pytest.raises(capi.CapiError, match="n_recent"):
            capi.set_pod(eng.ctx, [0 if k == 2 else -1 for k in range(n)], 4, 0)
        capi.set_pod(eng.ctx, [-1] * n, 4, 44)  # all -1: off, and the engine runs as before
    finally:
        eng.close()


def test_pod_plus_snapkv_groups_keep_one_set(model_path):
    pol = policies.create("pod+snapkv", {"proximal": "48", "sinks": "4"})
    pol.__class__ = FixedPOD
    eng = make_engine(model_path, policy=pol, budget=96)
    try:
        assert pol.name == "pod+snapkv" and eng.chunk == 44
        eng.feed(eng.model.tokenize(TEXT + "\nWhat is the code for the east gate?", add_special=True))
        assert eng.compressions >= 1
        _cap, _alloc, used = capi.cache_state(eng.ctx)
        assert used.max() <= 96
        lead, _k, n_sink, first = capi.pod_state(eng.ctx)
        for i in range(N_LAYER):
            pos = capi.positions(eng.ctx, i)
            for h in range(N_HEAD_KV):
                k = i * N_HEAD_KV + h
                if lead[k] >= 0:  # a follower holds exactly its leader's tokens
                    assert (pos[h] == capi.positions(eng.ctx, int(lead[k]))[h]).all()
        # the proximal tokens were kept: the first SINKS positions and the latest ones
        p0 = capi.positions(eng.ctx, 0)[0]
        assert p0[:SINKS].tolist() == list(range(SINKS)) and p0[-1] == eng.n_past - 1
        for _ in range(40):  # decoding compresses again, group by group
            eng.step(int(np.argmax(eng.last_logits())))
        assert capi.cache_state(eng.ctx)[2].max() <= 96 + eng.decode_interval
    finally:
        eng.close()


def test_policy_arguments():
    with pytest.raises(LocalkvError, match="composes with one evicting policy"):
        policies.create("pod+full")
    with pytest.raises(LocalkvError, match="composes with one evicting policy"):
        policies.create("pod+nope")
    with pytest.raises(LocalkvError, match="does not compose with kvzip"):
        policies.create("pod+kvzip")
    p = policies.create("pod+snapkv", {"delta": "0.7", "kernel": "5", "proximal": "64"})
    assert p.delta == 0.7 and p.proximal == 64 and p.evict.kernel == 5
    with pytest.raises(LocalkvError, match="adaptive"):
        policies.create("pod+snapkv", {"adaptive": "true"}).validate(256)
    with pytest.raises(LocalkvError, match="proximal size"):
        policies.create("pod").validate(16)
    with pytest.raises(LocalkvError, match="delta"):
        policies.create("pod", {"delta": "1.5"}).validate(256)
    with pytest.raises(LocalkvError, match="proximal size 300"):
        policies.create("pod+snapkv", {"proximal": "300"}).validate(256)


def test_cli_pod_memory_generate_and_errors(model_path):
    from test_cli import assert_one_line_error, run
    rc, out, err = run("memory", "--policy", "pod", "--budget", "256", "--ctx", "4096", "--json")
    assert rc == 0, err
    rep = json.loads(out)
    roles = [x for lm in rep["layers"] for x in lm["head_leaders"]]
    assert sum(x >= 0 for x in roles) == 6  # the shipped profile at its default delta (0.6)
    full = rep["kv_bytes_full_f16"]
    assert rep["kv_bytes_allocated"] < full  # followers hold 256 K slots, not 4096
    rc, out, err = run("memory", "--policy", "pod", "--budget", "256", "--ctx", "4096")
    assert rc == 0 and "follows L" in out and "leads" in out, err
    rc, out, err = run("generate", "The capital of France is", "--policy", "pod+snapkv", "--budget", "128",
                       "--policy-arg", "proximal=64", "--max-tokens", "4", "--temperature", "0", "--json")
    assert rc == 0, err
    assert json.loads(out)["policy"] == "pod+snapkv"
    assert_one_line_error(*run("generate", "hi", "--policy", "pod", "--budget", "8"), "proximal size")
    assert_one_line_error(*run("generate", "hi", "--policy", "pod+kvzip", "--budget", "256"), "does not compose")
    assert_one_line_error(*run("generate", "hi", "--policy", "pod", "--budget", "256", "--policy-arg", "delta=2"),
                          "delta")


def test_protect_keeps_retrieval_heads_out_of_blocks(model_path):
    from localkv.calibrate import kv_scores, load_or_calibrate
    eng = make_engine(model_path, policy=policies.create("pod", {"delta": "0.4", "protect": "6"}), budget=64)
    try:
        base = make_engine(model_path, policy=policies.create("pod", {"delta": "0.4"}), budget=64,
                           shared_model=eng.model)
        lead, plain = np.asarray(eng.policy.leaders), np.asarray(base.policy.leaders)
        base.close()
        top = np.argsort(-kv_scores(load_or_calibrate(eng)[0]).reshape(-1), kind="stable")[:6]
        own = np.arange(N_LAYER)[:, None].repeat(N_HEAD_KV, 1)
        assert (lead.reshape(-1)[top] == own.reshape(-1)[top]).all()  # the protected heads lead
        other = np.setdiff1d(np.arange(lead.size), top)
        assert (lead.reshape(-1)[other] == plain.reshape(-1)[other]).all()  # the rest as calibrated
        assert (plain.reshape(-1)[top] != own.reshape(-1)[top]).any()  # some did follow before
    finally:
        eng.close()
