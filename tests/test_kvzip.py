"""KVzip: reconstruction scores (STAT_MAX over a replay with hidden positions) against NumPy on the Q and K
of the same passes, the replay leaving no trace, bounded memory, and the global-threshold selection."""
import numpy as np
import pytest

from conftest import make_engine, raw_decode
from graph_dump import GraphDump
from localkv import capi
from localkv.errors import LocalkvError

pytestmark = pytest.mark.model

N_LAYER, N_HEAD, N_HEAD_KV, D = 24, 14, 2, 64
GROUP = N_HEAD // N_HEAD_KV

TEXT = ("The lighthouse keeper wrote in her log every night. The sea was calm, the lamp was bright, "
        "and the ships passed far to the west. On the third night a storm came from the north, "
        "and she counted nine ships sheltering in the bay before dawn. The cargo ship Marigold carried "
        "copper wire, the ferry Saint Agnes carried forty passengers, and a fishing boat lost its nets. ") * 3


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def _f16(x):
    return x.astype(np.float16).astype(np.float64)


def replay_max(q, k_seen, k_replay, group_max=True):
    """Reference KVzip score: for each key of k_seen ([n, Hkv, d], what the replay may see besides itself), the
    largest softmax attention any replay query gives it; query j sees k_seen and replay keys 0..j.
    Returns [Hkv, n] (max over the GQA group too) or [H, n]."""
    n = k_seen.shape[0]
    out = np.zeros((N_HEAD, n))
    for j in range(q.shape[0]):
        for h in range(N_HEAD):
            keys = np.concatenate([k_seen[:, h // GROUP], k_replay[:j + 1, h // GROUP]])
            p = _softmax(keys @ q[j, h] / np.sqrt(D))
            out[h] = np.maximum(out[h], p[:n])
    return out.reshape(N_HEAD_KV, GROUP, n).max(1) if group_max else out


@pytest.mark.parametrize("flash_attn", [False, True])
def test_max_statistic_with_hidden_positions_matches_numpy(model_path, flash_attn):
    """STAT_MAX over a ubatch whose queries cannot see positions [4, 30): per query head and per KV head."""
    layers = (0, 13)
    dump = GraphDump({f"{n}cur-{il}" for n in "QK" for il in layers})
    with make_engine(model_path, policy="snapkv", budget=256, chunk=64, eval_callback=dump.callback,
                     flash_attn=flash_attn) as eng:
        tokens = eng.model.tokenize(TEXT)[:100]
        raw_decode(eng, tokens[:60])
        dump.end_pass()
        capi.set_stats(eng.ctx, [capi.STAT_MAX], 64, query_heads=True)
        eng._stats_phase = "manual"
        capi.set_hidden(eng.ctx, 4, 30)
        raw_decode(eng, tokens[60:100], True)
        dump.end_pass()
        capi.set_hidden(eng.ctx, 0, 0)
        for il in layers:
            q = dump.tensors[f"Qcur-{il}"][1].astype(np.float64)
            k = _f16(np.concatenate([dump.tensors[f"Kcur-{il}"][0], dump.tensors[f"Kcur-{il}"][1]]))
            visible = np.r_[0:4, 30:60]
            want = np.zeros((N_HEAD, 100))
            want[:, visible] = replay_max(q, k[visible], k[60:], group_max=False)[:, :len(visible)]
            # the replay's own keys: causal among themselves, and they see the same visible prefix
            for j in range(40):
                for h in range(N_HEAD):
                    keys = np.concatenate([k[visible, h // GROUP], k[60:61 + j, h // GROUP]])
                    p = _softmax(keys @ q[j, h] / np.sqrt(D))
                    want[h, 60:61 + j] = np.maximum(want[h, 60:61 + j], p[len(visible):])
            got = capi.get_stat(eng.ctx, il, capi.STAT_MAX, N_HEAD)
            np.testing.assert_allclose(got, want, atol=3e-3, rtol=2e-2)
            assert (got[:, 4:30] == 0).all()  # hidden: no attention at all


def test_kvzip_selection_matches_numpy_reference_on_real_tensors(model_path):
    """Two spans, each replayed; then one threshold over all heads and layers (no floor, token level)."""
    dump = GraphDump({f"{n}cur-{il}" for n in "QK" for il in range(N_LAYER)})
    budget, span = 100, 80
    chosen = {}
    args = {"replay_chunk": str(span), "head_floor": "0", "whole_words": "false"}
    with make_engine(model_path, policy="kvzip", budget=budget, chunk=256, eval_callback=dump.callback,
                     policy_args=args) as eng:
        orig_keep = capi.keep

        def record(ctx, i, slots):
            chosen[i] = [np.asarray(s) for s in slots]
            orig_keep(ctx, i, slots)
        capi.keep = record
        try:
            tokens = eng.model.tokenize(TEXT)[:161]
            assert len(tokens) == 161
            batches = []
            run_batch = eng._run_batch

            def run_and_file(toks, *a, **kw):  # one dump pass per llama_decode
                run_batch(toks, *a, **kw)
                dump.end_pass()
                batches.append(len(toks))
            eng._run_batch = run_and_file
            eng.feed(tokens)
        finally:
            capi.keep = orig_keep
        assert eng.replays == 2 and eng.n_past == 161
    # passes: span 1 (80 tokens), its replay, span 2 (80), its replay, the last token
    assert batches[0] == 80 and batches[2] == 80 and batches[4] == 1 and len(batches) == 5
    assert 80 < batches[1] < batches[3] < 80 + 64  # the later replay's instruction quotes the span before
    n = 161
    pos = np.arange(n)
    protected = (pos < 4) | (pos >= n - 16)
    all_scores = []
    for il in range(N_LAYER):
        Q, K = dump.tensors[f"Qcur-{il}"], dump.tensors[f"Kcur-{il}"]
        k = _f16(np.concatenate([K[0], K[2], K[4]]))
        score = np.zeros((N_HEAD_KV, n))
        # span 1 from 0: its replay sees it all; span 2: the sinks and itself
        s1 = replay_max(Q[1].astype(np.float64), k[:80], _f16(K[1]))
        seen2 = np.r_[0:4, 80:160]
        s2 = replay_max(Q[3].astype(np.float64), k[seen2], _f16(K[3]))
        score[:, :80] = s1
        score[:, seen2] = np.maximum(score[:, seen2], s2)
        all_scores.append(np.where(protected, np.inf, score))
    flat = np.concatenate(all_scores)                      # [layers * Hkv, n]
    n_free = budget * N_LAYER * N_HEAD_KV - int(protected.sum()) * N_LAYER * N_HEAD_KV
    free = np.sort(flat[np.isfinite(flat)])[::-1]
    threshold = free[n_free - 1]
    got_total = sum(len(chosen[i][h]) for i in range(N_LAYER) for h in range(N_HEAD_KV))
    assert got_total == budget * N_LAYER * N_HEAD_KV
    assert len({len(chosen[i][h]) for i in range(N_LAYER) for h in range(N_HEAD_KV)}) > 1  # heads differ
    for i in range(N_LAYER):
        for h in range(N_HEAD_KV):
            sc = all_scores[i][h]
            got = set(chosen[i][h].tolist())
            want = set(np.flatnonzero(sc >= threshold).tolist())
            for x in got ^ want:  # only ties at the threshold (within fp noise) may differ
                assert abs(sc[x] - threshold) <= 2e-3 * threshold + 1e-6, f"layer {i} head {h} slot {x}"


def test_the_replay_leaves_no_trace(model_path):
    """After a replay the cache holds the prompt's positions only, and the next token's output is what an
    engine that never replayed computes from the same cache (same splits, nothing evicted)."""
    tokens = None
    with make_engine(model_path, policy="kvzip", budget=512, chunk=64,
                     policy_args={"replay_chunk": "100"}) as eng:
        tokens = eng.model.tokenize(TEXT)[:150]
        eng.feed(tokens)
        assert eng.replays == 2 and eng.n_past == 150
        for i in range(N_LAYER):
            pos = capi.positions(eng.ctx, i)
            assert sorted(pos[0].tolist()) == list(range(150)) and (pos == pos[0]).all()
        eng.step(tokens[0])
        got = eng.last_logits()
    with make_engine(model_path, policy="snapkv", budget=512, chunk=64) as ref:
        ref._set_phase("decode")
        for chunk in (tokens[:36], tokens[36:100], tokens[100:149], tokens[149:], [tokens[0]]):  # kvzip's splits
            raw_decode(ref, chunk, True)
        want = ref.last_logits()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)
    assert int(np.argmax(got)) == int(np.argmax(want))


def test_memory_stays_bounded_for_a_prompt_8x_the_budget(model_path):
    budget, span = 64, 64
    with make_engine(model_path, policy="kvzip", budget=budget, chunk=64,
                     policy_args={"replay_chunk": str(span)}) as eng:
        tokens = (eng.model.tokenize(TEXT) * 8)[:8 * budget]
        eng.feed(tokens)
        assert eng.replays == 8
        slot = eng.full_bytes(1, "f16") // N_LAYER // N_HEAD_KV
        # budget + one span + its replay (prefix < 64 tokens), padded to 32 slots, per head
        bound = N_LAYER * N_HEAD_KV * (-(-(budget + 32 + 2 * span + 64) // 32) * 32) * slot
        assert eng.kv_bytes_peak <= bound < eng.full_bytes(len(tokens), "f16")
        _cap, _alloc, used = capi.cache_state(eng.ctx)
        assert used.sum() == budget * N_LAYER * N_HEAD_KV  # one threshold: the uniform split's total


def test_decoding_holds_each_head_at_what_it_kept_plus_one_interval(model_path):
    """One threshold over all heads moves tokens between heads at every decode compression: at rest each head
    holds its own count plus one decode interval (padded), not the largest count it ever had."""
    from localkv.engine import pad_slots
    with make_engine(model_path, policy="kvzip", budget=64, chunk=64, policy_args={"replay_chunk": "64"}) as eng:
        eng.feed(eng.model.tokenize(TEXT)[:150])
        shares = []
        for _ in range(100):  # three decode compressions
            eng.step(int(np.argmax(eng.last_logits())))
            _cap, alloc, used = capi.cache_state(eng.ctx)
            assert (alloc <= np.array([pad_slots(u + eng.decode_interval) for u in used]) + 32).all()
            shares.append(used.copy())
        assert eng.compressions >= 3 and any((a != b).any() for a, b in zip(shares, shares[1:]))
        _cap, alloc, used = capi.cache_state(eng.ctx)
        slot = eng.full_bytes(1, "f16") // N_LAYER // N_HEAD_KV
        assert capi.memory_bytes(eng.ctx) <= sum(pad_slots(u + eng.decode_interval) for u in used) * slot * 1.02


def test_freed_slots_start_from_zero_statistics(model_path):
    """A token written where an evicted one was does not inherit its accumulated attention."""
    with make_engine(model_path, policy="snapkv", budget=256, chunk=64) as eng:
        tokens = eng.model.tokenize(TEXT)[:90]
        capi.set_stats(eng.ctx, [capi.STAT_ACC, capi.STAT_MAX], 64)
        eng._stats_phase = "manual"
        raw_decode(eng, tokens[:60])
        for i in range(N_LAYER):
            capi.keep(eng.ctx, i, np.tile(np.arange(30, dtype=np.int32), (N_HEAD_KV, 1)))
        capi.set_stats(eng.ctx, [capi.STAT_VNORM], 64)
        raw_decode(eng, tokens[60:90])
        for i in (0, 11, 23):
            for stat in (capi.STAT_ACC, capi.STAT_MAX):
                s = capi.get_stat(eng.ctx, i, stat, N_HEAD_KV, True)
                assert (s[:, :30] > 0).any() and (s[:, 30:60] == 0).all()


def test_bad_kvzip_arguments_are_errors(model_path):
    for args, msg in (({"replay_chunk": "4"}, "replay_chunk"), ({"head_floor": "2"}, "head_floor"),
                      ({"layerwise": "maybe"}, "layerwise")):
        with pytest.raises(LocalkvError, match=msg):
            make_engine(model_path, policy="kvzip", budget=64, policy_args=args)
    with make_engine(model_path, policy="kvzip", budget=64) as eng:
        with pytest.raises(capi.CapiError, match="negative"):
            capi.set_hidden(eng.ctx, -1, 5)


def test_replay_true_ranks_by_the_larger_of_own_and_reconstruction_scores():
    """snapkv replay=true: a token is kept if either its own score or the replay needs it (each over its
    head's largest)."""
    from localkv import policies
    from localkv.policies import LayerView
    own = np.array([[4.0, 1.0, 0.0, 2.0]])
    rebuilt = np.array([[0.1, 0.0, 0.5, 0.25]])
    view = LayerView(ctx=None, index=0, layer=0, n_layers=1, n_head=7, n_head_kv=1, capacity=2,
                     positions=np.arange(4, dtype=np.int32)[None], n_seen=4, phase="prefill")
    view._stats[(capi.STAT_OBS, True)] = own.astype(np.float32)
    view._stats[(capi.STAT_MAX, True)] = rebuilt.astype(np.float32)
    pol = policies.create("snapkv", {"replay": "true", "kernel": "1"})
    assert pol.reconstructs and not policies.create("snapkv").reconstructs
    np.testing.assert_allclose(pol.ranked_score(view), [[1.0, 0.25, 1.0, 0.5]])


def test_chat_replays_earlier_turns_unless_told_not_to():
    from localkv import policies
    args = policies.conversation_args
    assert args("snapkv", {}) == {"replay": "true"}
    assert args("ahakv", {"replay": "false"}) == {"replay": "false"}
    assert args("kvzip", {"window": "8"}) == {"window": "8"}  # replays by itself
    assert args("streamingllm", {}) == {} and args("full", {}) == {}
    assert args("h2o", {"window": "8"}) == {"window": "8", "replay": "true"}


def test_global_threshold_keeps_each_heads_floor(model_path):
    """head_floor: no head falls under that fraction of its capacity, at the same total (and without the
    floor some head does, so the floor is what holds them up)."""
    budget = 100
    kept = {}
    for floor in ("0", "0.6"):
        args = {"replay_chunk": "80", "head_floor": floor, "whole_words": "false"}
        with make_engine(model_path, policy="kvzip", budget=budget, chunk=256, policy_args=args) as eng:
            eng.feed(eng.model.tokenize(TEXT)[:161])
            kept[floor] = capi.cache_state(eng.ctx)[2]
    n_heads = N_LAYER * N_HEAD_KV
    assert kept["0"].sum() == kept["0.6"].sum() == budget * n_heads
    assert kept["0"].min() < 60 <= kept["0.6"].min()
