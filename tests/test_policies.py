"""Policies: property tests over random statistics, and each policy against a plain NumPy reference of
its paper's formula computed from the real Q, K and V of the default model (read out of the graph)."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from localkv import capi, policies
from localkv.errors import LocalkvError
from localkv.policies import LayerView
from localkv.policies.base import avg_pool, max_pool

# every evicting policy; pod's --budget is its proximal size and it evicts nothing (pod+<policy> selects per
# block through the cache's state: tests/test_pod.py)
COMPRESSING = [n for n, c in policies.available().items() if c.compresses and n != "pod"]


def fake_view(rng, n_used, capacity, n_head_kv=2, n_head=14, n_seen=None, phase="prefill"):
    """A LayerView whose statistics are random (pre-filled, so no context is needed)."""
    n_seen = n_seen or n_used + int(rng.integers(0, 50))
    # positions: increasing per head, a random subset of [0, n_seen) that always holds the most recent ones
    positions = np.stack([np.sort(rng.choice(n_seen, size=n_used, replace=False)) for _ in range(n_head_kv)])
    view = LayerView(ctx=None, index=0, layer=0, n_layers=1, n_head=n_head, n_head_kv=n_head_kv,
                     capacity=capacity, positions=positions.astype(np.int32), n_seen=n_seen, phase=phase)
    for kind in range(capi.STAT_COUNT):
        view._stats[(kind, True)] = rng.random((n_head_kv, n_used)).astype(np.float32)
    return view


@pytest.mark.parametrize("name", COMPRESSING)
@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), n_used=st.integers(1, 300), slack=st.integers(0, 200),
       phase=st.sampled_from(["prefill", "decode"]))
def test_selection_properties(name, seed, n_used, slack, phase):
    pol = policies.create(name)
    rng = np.random.default_rng(seed)
    capacity = max(pol.min_budget() + 1, n_used - slack)
    view = fake_view(rng, n_used, capacity, phase=phase)
    keep = pol.select(view)
    want = min(n_used, capacity)
    assert keep.shape == (2, want)                                   # budget respected, same count per head
    assert keep.dtype == np.int32
    for h in range(2):
        assert len(set(keep[h].tolist())) == want                    # no duplicates
        assert keep[h].min() >= 0 and keep[h].max() < n_used         # in range
        assert (np.diff(keep[h]) > 0).all()                          # sorted
        # sinks and the recent window, computed here from the hyper-parameters (not by the policy)
        recent = max(pol.window, int(getattr(pol, "recent_ratio", 0) * capacity))
        pos = view.positions[h]
        protected = np.flatnonzero((pos < pol.sinks) | (pos >= view.n_seen - recent))
        if len(protected) <= capacity:
            assert set(protected.tolist()) <= set(keep[h].tolist())  # always kept
    assert (pol.select(view) == keep).all()                          # deterministic


@pytest.mark.parametrize("name", COMPRESSING)
def test_capacities_add_up_to_the_budget(name):
    pol = policies.create(name)
    for budget in (pol.min_budget() + 8, 128, 256, 384, 1024):
        if budget < pol.min_budget() + 1:
            continue
        caps = pol.capacities(budget, 24)
        assert len(caps) == 24
        assert sum(caps) == budget * 24
        assert min(caps) > pol.window


def test_pyramid_capacities_decrease_linearly():
    caps = policies.create("pyramidkv").capacities(256, 24)
    assert caps[0] > caps[12] > caps[-1]
    diffs = np.diff(caps)
    assert diffs.max() - diffs.min() <= 2                             # linear up to rounding
    # beta: the top layer gets about 1/beta of the mean share beyond the window
    assert abs((caps[-1] - 32) - (256 - 32) / 20) <= 2


def test_budget_below_sinks_and_window_is_an_error():
    with pytest.raises(LocalkvError, match="sinks"):
        policies.create("ahakv").validate(16)
    with pytest.raises(LocalkvError, match="unknown policy"):
        policies.create("nope")
    with pytest.raises(LocalkvError, match="no argument"):
        policies.create("snapkv", {"widnow": "8"})
    with pytest.raises(LocalkvError, match="not a valid int"):
        policies.create("snapkv", {"window": "x"})
    assert policies.create("snapkv", {"window": "8", "kernel": "5"}).window == 8


def test_span_selection_keeps_spans_whole():
    pol = policies.create("snapkv", {"span": "4", "window": "0", "kernel": "1"})
    rng = np.random.default_rng(1)
    view = fake_view(rng, 64, 16, n_seen=64)
    view.positions = np.tile(np.arange(64, dtype=np.int32), (2, 1))
    keep = pol.select(view)
    for h in range(2):
        spans = set((view.positions[h][keep[h]] // 4).tolist())
        assert len(spans) == 4                                       # 16 slots = 4 whole spans


def test_whole_words_keep_every_piece_of_a_hit_word():
    assert all(policies.create(n).whole_words for n in COMPRESSING)  # the default everywhere
    pol = policies.create("snapkv", {"window": "0", "kernel": "1"})
    rng = np.random.default_rng(3)
    view = fake_view(rng, 40, 10, n_seen=40)
    view.positions = np.tile(np.arange(40, dtype=np.int32), (2, 1))
    # words of 5 tokens; one token of word 3 and one of word 6 score highest in head 0
    view.words = np.tile(np.arange(40) // 5, (2, 1))
    stat = np.full((2, 40), 0.01, dtype=np.float32)
    stat[0, 17], stat[0, 33] = 5.0, 4.0
    stat[1, 2] = 5.0
    for kind in range(capi.STAT_COUNT):
        view._stats[(kind, True)] = stat
    keep = pol.select(view)
    assert keep[0].tolist() == list(range(15, 20)) + list(range(30, 35))
    assert set(range(0, 5)) <= set(keep[1].tolist())
    exact = policies.create("snapkv", {"window": "0", "kernel": "1", "whole_words": "false"}).select(view)
    assert 17 in exact[0] and not set(range(15, 20)) <= set(exact[0].tolist())  # the paper's top-k breaks the word


def test_top_k_never_cuts_a_word_in_two():
    from localkv.policies.base import top_k_groups
    # words [0 0 0] [1 1] [2] [3 3 3]; scores already word-max; the last slot is protected
    scores = np.array([[5.0, 5.0, 5.0, 4.0, 4.0, 3.0, 2.0, 2.0, np.inf]])
    words = np.array([[0, 0, 0, 1, 1, 2, 3, 3, 3]])
    assert top_k_groups(scores, 5, words).tolist() == [[0, 1, 2, 5, 8]]      # word 1 does not fit: word 2 does
    assert top_k_groups(scores, 6, words).tolist() == [[0, 1, 2, 3, 4, 8]]
    assert top_k_groups(scores, 2, words).tolist() == [[5, 8]]
    assert top_k_groups(scores, 1, words).tolist() == [[8]]
    assert top_k_groups(np.array([[1.0, 1.0, 1.0]]), 2, np.array([[0, 0, 0]])).tolist() == [[0, 1]]  # only singles


def test_policy_select_takes_words_whole_at_the_budget_cut():
    pol = policies.create("snapkv", {"window": "0", "kernel": "1"})
    view = fake_view(np.random.default_rng(4), 40, 8, n_seen=40)
    view.positions = np.tile(np.arange(40, dtype=np.int32), (2, 1))
    words = np.arange(40) // 5
    words[35:38], words[38:] = 20, 21                                # a 3-token and a 2-token word at the end
    view.words = np.tile(words, (2, 1))
    stat = np.full((2, 40), 0.01, dtype=np.float32)
    stat[:, 17], stat[:, 33], stat[:, 36] = 5.0, 4.0, 3.0             # words 3 (5 tokens), 6 (5 tokens), 20 (3)
    for kind in range(capi.STAT_COUNT):
        view._stats[(kind, True)] = stat
    keep = pol.select(view)
    # word 6 no longer fits after word 3 (3 slots left): the 3-token word takes them instead of 3 pieces of word 6
    assert keep.tolist() == [list(range(15, 20)) + [35, 36, 37]] * 2


def test_group_max_and_word_index():
    from localkv.policies.base import group_max
    from localkv.words import MAX_WORD_TOKENS, WordIndex
    s = np.array([[1.0, 3.0, 2.0, 0.0, 5.0]])
    assert group_max(s, np.array([[0, 0, 1, 1, 2]])).tolist() == [[3.0, 3.0, 2.0, 2.0, 5.0]]
    pieces = {1: b" cobalt", 2: b"-", 3: b"7", 4: b"3", 5: b".", 6: b"\n", 7: b"Next", 8: b"", 9: b"x"}
    idx = WordIndex(pieces.__getitem__)
    idx.extend([1, 2, 3, 4, 5])
    idx.extend([6, 7, 8, 1])
    assert idx.of(np.arange(9)).tolist() == [0, 0, 0, 0, 0, 1, 2, 3, 4]
    assert idx.of(np.array([9, 10])).tolist() == [-10, -11]           # not fed yet: ids of their own
    idx.reset()
    idx.extend([9] * (MAX_WORD_TOKENS + 3))                           # a long run without spaces is cut
    ids = idx.of(np.arange(MAX_WORD_TOKENS + 3))
    assert (ids[:MAX_WORD_TOKENS] == 0).all() and (ids[MAX_WORD_TOKENS:] == 1).all()


def test_pooling_helpers():
    x = np.array([[0, 5, 0, 0, 1, 0, 0]], dtype=float)
    assert max_pool(x, 3).tolist() == [[5, 5, 5, 1, 1, 1, 0]]
    np.testing.assert_allclose(avg_pool(x, 3), [[5 / 3, 5 / 3, 5 / 3, 1 / 3, 1 / 3, 1 / 3, 0]])


# ------------------------------------------------------------------ references on the real model

D, N_HEAD, N_HEAD_KV = 64, 14, 2
GROUP = N_HEAD // N_HEAD_KV
LAYERS = (0, 9, 23)
PROMPT = ("Alice keeps the spare key under the blue flower pot next to the garage door. " * 3 +
          "The meeting moved to Thursday at four in the small conference room. " * 3 +
          "Question: where is the spare key?")


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def _attention_rows(q, k, rows, scales=None):
    """[H, n] attention of the given query rows (causal: row i sees keys 0..i), summed over rows."""
    n = k.shape[0]
    out = np.zeros((N_HEAD, n))
    for j, i in enumerate(rows):
        s = (1 / np.sqrt(D)) if scales is None else scales[j]
        for h in range(N_HEAD):
            out[h, :i + 1] += _softmax(k[:i + 1, h // GROUP] @ q[i, h] * s)
    return out


def _reference_scores(name, q, k, v, capacity, n, pool=1, whole_words=False, words=None):
    """[Hkv, n] score of every slot by the paper's formula, protected slots at +inf; then the defaults that keep
    facts whole, when asked: the final score max-pooled over `pool` slots, and each word's best score for all of it.

    One chunk holds the whole prompt, so slot = position; the cache holds f16 keys.
    """
    pos = np.arange(n)
    if name in ("snapkv", "pyramidkv"):
        att = _attention_rows(q, k, range(n - 32, n)).reshape(N_HEAD_KV, GROUP, n).sum(1)
        score, protected = max_pool(att, 7), pos >= n - 32
    elif name == "h2o":
        score = _attention_rows(q, k, range(n)).reshape(N_HEAD_KV, GROUP, n).sum(1)
        protected = pos >= n - int(0.5 * capacity)
    elif name == "ahakv":
        rows = list(range(n - 32, n))
        scales = [np.sqrt(2 * np.log((i + 1) / capacity) / D) if i + 1 > capacity else 1 / np.sqrt(D) for i in rows]
        ra = _attention_rows(q, k, rows, scales).reshape(N_HEAD_KV, GROUP, n).sum(1)
        gamma = avg_pool((v.astype(np.float64) ** 2).sum(-1).T, 7)          # ||v||^2 pooled, [Hkv, n]
        score, protected = gamma / gamma.max(axis=1, keepdims=True) * ra, pos >= n - 32
    else:  # streamingllm
        score, protected = np.tile(pos.astype(float), (N_HEAD_KV, 1)), pos < 4
    score = max_pool(score, pool)
    if whole_words:
        score = _word_max(score, words)
    return np.where(protected, np.inf, score)


def _reference_words(pieces):
    """Word id per token, by the rule written out independently: a word starts at a piece beginning with
    whitespace, after a piece ending with whitespace, at a special token (empty piece), or after 32 pieces."""
    ids, word, run, prev = [], -1, 0, b" "
    for p in pieces:
        if not p or p[:1] in (b" ", b"\n", b"\t", b"\r") or prev[-1:] in (b" ", b"\n", b"\t", b"\r", b"") or run >= 32:
            word, run = word + 1, 0
        ids.append(word)
        run += 1
        prev = p
    return np.array(ids)


def _reference_whole_top_k(score, k, words):
    """Protected slots, then whole words best first, passing over a word that no longer fits; singles last."""
    keep = [int(i) for i in np.flatnonzero(np.isposinf(score))][:k]
    free = [i for i in range(len(score)) if i not in keep]
    best = {}
    for i in free:
        best[words[i]] = max(best.get(words[i], -np.inf), score[i])
    for w in sorted(best, key=lambda w: (-best[w], min(i for i in free if words[i] == w))):
        members = [i for i in free if words[i] == w]
        if len(members) <= k - len(keep):
            keep += members
    keep += sorted((i for i in free if i not in keep), key=lambda i: -score[i])[:k - len(keep)]
    return np.array(sorted(keep))


def _word_max(scores, words):
    out = scores.copy()
    for w in np.unique(words):
        m = words == w
        out[:, m] = scores[:, m].max(axis=1, keepdims=True)
    return out


# (policy, paper-exact): the paper's formula alone, or with the default that keeps words whole
REFERENCE_CASES = [(n, exact) for n in ["streamingllm", "h2o", "snapkv", "pyramidkv", "ahakv"] for exact in (True, False)]
# per-head capacities: calibrated (SurfaceLogicKV) or shared by score within a layer (adaptive=true)
REFERENCE_CASES += [("surfacelogickv", True), ("snapkv:adaptive=true", True), ("ahakv:adaptive=true", True)]


@pytest.mark.model
@pytest.mark.parametrize("name,exact", REFERENCE_CASES)
def test_policy_matches_numpy_reference_on_real_tensors(model_path, name, exact):
    from conftest import make_engine
    from graph_dump import GraphDump

    from localkv.bench.common import split_spec
    from test_surfacelogickv import ref_adaptive

    dump = GraphDump({f"{t}cur-{il}" for t in "QKV" for il in LAYERS})
    budget = 48
    chosen = {}
    name, extra = split_spec(name)
    # the reference selects layer by layer; cross-layer consensus (h2o's default) has its own test
    args = ({k: str(v) for k, v in policies.available()[name].paper_exact().items()} if exact
            else {"consensus": "0"})
    args.update(extra)
    with make_engine(model_path, policy=name, budget=budget, chunk=256, eval_callback=dump.callback,
                     policy_args=args) as eng:
        pol = eng.policy
        orig_keep = capi.keep

        def record(ctx, i, slots):
            chosen.setdefault(i, [np.asarray(s) for s in slots])
            orig_keep(ctx, i, slots)
        capi.keep = record
        try:
            tokens = eng.model.tokenize(PROMPT)
            assert budget < len(tokens) <= 256
            eng.feed(tokens)         # one chunk, then the final (question-aware) compression
            dump.end_pass()
        finally:
            capi.keep = orig_keep
        head_caps = eng.head_capacities.reshape(-1, N_HEAD_KV)
        words = _reference_words([eng.model.piece(t) for t in tokens])
    n = len(tokens)
    adaptive = getattr(pol, "adaptive", False)
    for il in LAYERS:
        q = dump.tensors[f"Qcur-{il}"][0].astype(np.float64)
        k = dump.tensors[f"Kcur-{il}"][0].astype(np.float16).astype(np.float64)   # the cache holds f16 keys
        v = dump.tensors[f"Vcur-{il}"][0]
        ref_name = "snapkv" if name == "surfacelogickv" else name  # SnapKV inside each head
        scores = _reference_scores(ref_name, q, k, v, head_caps[il][0], n, pol.pool, not exact and pol.whole_words,
                                   words)
        counts = list(head_caps[il])
        if adaptive:  # the layer's heads share its budget: AdaKV's counts, within one token of fp noise
            counts = ref_adaptive(scores, [n] * N_HEAD_KV, head_caps[il], pol.adaptive_floor)
            got_counts = [len(chosen[il][h]) for h in range(N_HEAD_KV)]
            assert sum(got_counts) == sum(counts) and max(abs(a - b) for a, b in zip(got_counts, counts)) <= 1
            counts = got_counts
        for h in range(N_HEAD_KV):
            got, cap = chosen[il][h], min(counts[h], n)  # a head whose share exceeds the prompt keeps it all
            assert len(got) == cap and len(set(got.tolist())) == cap
            want = (_reference_whole_top_k(scores[h], cap, words) if not exact and pol.whole_words
                    else np.sort(np.argsort(-scores[h], kind="stable")[:cap]))
            if not np.array_equal(got, want):
                # ties aside: a slot kept instead of the reference's choice must score the same (within fp noise)
                kth = np.sort(scores[h])[::-1][cap - 1]
                for x in set(got.tolist()) ^ set(want.tolist()):
                    assert abs(scores[h][x] - kth) <= 1e-3 * abs(kth) + 1e-6, f"layer {il} head {h} slot {x}"


def test_consensus_keeps_a_word_in_every_layer_when_most_keep_it():
    def views(consensus):
        pol = policies.create("h2o", {"recent_ratio": "0", "consensus": str(consensus)})
        out = []
        for layer in range(4):
            view = fake_view(np.random.default_rng(layer), 20, 4, n_head_kv=1, n_seen=20)
            view.positions = np.arange(20, dtype=np.int32)[None]
            view.words = (np.arange(20) // 2)[None]          # words of two tokens
            stat = np.linspace(0.1, 0.2, 20, dtype=np.float32)[None].copy()
            stat[0, 6] = 5.0 if layer < 3 else 0.0            # word 3 (slots 6-7): top in three layers of four
            view._stats[(capi.STAT_ACC, True)] = stat
            out.append(view)
        return pol, out
    pol, vs = views(0)
    plain = pol.select_layers(vs)
    assert all({6, 7} <= set(k[0].tolist()) for k in plain[:3]) and not {6, 7} & set(plain[3][0].tolist())
    pol, vs = views(0.5)
    agreed = pol.select_layers(vs)
    assert all({6, 7} <= set(k[0].tolist()) and len(k[0]) == 4 for k in agreed)   # kept everywhere, same budget
    pol, vs = views(0.9)
    assert not {6, 7} & set(pol.select_layers(vs)[3][0].tolist())                 # 3 of 4 is below 0.9
    with pytest.raises(LocalkvError, match="consensus"):
        policies.create("h2o", {"consensus": "1.5"}).validate(64)
