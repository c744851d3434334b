"""The compressed KV cache inside llama.cpp (patch 0003), driven through localkv.capi on the default model.

Statistics are checked against NumPy computed from the Q, K and V of the very
same forward pass (read out of the graph with ggml's eval callback).
"""
import ctypes

import numpy as np
import pytest

from conftest import make_engine, raw_decode
from graph_dump import GraphDump, OpCount
from localkv import capi
from localkv.errors import LocalkvError

pytestmark = pytest.mark.model

N_LAYER, N_HEAD, N_HEAD_KV, D = 24, 14, 2, 64
GROUP = N_HEAD // N_HEAD_KV
N_HEADS = N_LAYER * N_HEAD_KV  # length of the C API's per-(layer, KV head) arrays

TEXT = ("The lighthouse keeper wrote in her log every night. The sea was calm, the lamp was bright, "
        "and the ships passed far to the west. On the third night a storm came from the north, "
        "and she counted nine ships sheltering in the bay before dawn. ") * 3


def _f16(x):
    return x.astype(np.float16).astype(np.float32)  # the cache stores K and V as f16


def _softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


def ref_obs(q, k, w, scale):
    """SnapKV's observation attention: softmax of the last w queries over all visible keys, summed over queries.

    q: [n_q, H, d] (the ubatch), k: [n_k, Hkv, d] (kept + ubatch, ubatch last), scale: float or [w] per row.
    Returns [H, n_k].
    """
    n_q, n_k = q.shape[0], k.shape[0]
    n_old = n_k - n_q
    out = np.zeros((q.shape[1], n_k))
    for r in range(w):
        i = n_q - w + r                       # query row in the ubatch
        visible = n_old + i + 1
        s = scale[r] if np.ndim(scale) else scale
        for h in range(q.shape[1]):
            logits = k[:visible, h // GROUP] @ q[i, h] * s
            out[h, :visible] += _softmax(logits)
    return out


def decode_and_check_kept(eng, dump, layers, kept, new_tokens, n_old, w):
    """Decode new_tokens after a keep, then check each of `layers`' observation statistic (per query head)
    against NumPy over each KV head's own keys: the slots kept[il][h] of the first n_old tokens, then the new
    ones, in slot order (the ubatch attends exactly the kept K rows)."""
    raw_decode(eng, new_tokens, True)
    dump.end_pass()
    for il in layers:
        q = dump.tensors[f"Qcur-{il}"][-1]
        k_all = _f16(np.concatenate(dump.tensors[f"Kcur-{il}"]))
        assert_obs_over_kept(capi.get_stat(eng.ctx, il, capi.STAT_OBS, N_HEAD), q, k_all, kept[il], n_old, w)


def assert_obs_over_kept(obs, q, k_all, kept, n_old, w):
    for hk in range(N_HEAD_KV):
        k_head = np.concatenate([k_all[kept[hk], hk], k_all[n_old:, hk]])
        k_rep = np.repeat(k_head[:, None, :], N_HEAD_KV, axis=1)
        want = ref_obs(q, k_rep, w, 1 / np.sqrt(D))[hk * GROUP:(hk + 1) * GROUP]
        np.testing.assert_allclose(obs[hk * GROUP:(hk + 1) * GROUP, :len(k_head)], want, atol=2e-3, rtol=2e-2)


def ref_adaptive_scale(n_visible, budget):
    return np.sqrt(2 * np.log(n_visible / budget) / D) if n_visible > budget else 1 / np.sqrt(D)


@pytest.fixture
def dumped(model_path):
    """An engine with compression on (budget 64, chunks of 64) and a dump of Q/K/V of two layers."""
    layers = (0, 13)
    dump = GraphDump({f"{n}cur-{il}" for n in "QKV" for il in layers})
    eng = make_engine(model_path, policy="snapkv", budget=64, chunk=64, eval_callback=dump.callback)
    yield eng, dump, layers
    eng.close()


def _pad(n):
    return -(-n // 32) * 32


def test_allocated_bytes_follow_capacities(model_path):
    """At rest a layer holds its capacity plus the decode interval (32), padded to 32 slots: nothing idle."""
    for policy, ctk in (("snapkv", "f16"), ("pyramidkv", "f16"), ("snapkv", "q8_0")):
        with make_engine(model_path, policy=policy, budget=256, chunk=128, cache_type_k=ctk, cache_type_v=ctk,
                         flash_attn=True) as eng:
            per_token = N_HEAD_KV * D * 2 * (2 if ctk == "f16" else 34 / 32)   # K + V bytes per slot
            # before any prompt: one decode interval of slots per layer
            assert capi.memory_bytes(eng.ctx) == N_LAYER * 32 * per_token
            eng.feed(eng.model.tokenize(TEXT * 4))                           # ~230 tokens per repeat: compresses
            allocated = capi.memory_bytes(eng.ctx)
            assert allocated == sum(k + v for _il, k, v in capi.kv_layers(eng.ctx))
            used = [capi.layer_state(eng.ctx, i)[2] for i in range(N_LAYER)]
            assert used == [min(c, eng.n_past) for c in eng.capacities]
            assert allocated == sum(_pad(u + 32) for u in used) * per_token
            want = sum(eng.capacities) * per_token
            # at most 10% over the capacities plus the decode interval and padding per layer
            assert want <= allocated <= 1.1 * want + N_LAYER * 64 * per_token
            if policy == "pyramidkv":
                assert eng.capacities[0] > eng.capacities[-1]
                assert sum(eng.capacities) == 256 * N_LAYER


def test_a_short_chat_is_never_bigger_than_what_it_has_seen(model_path):
    """The cache grows with the conversation: never more than the tokens seen plus one chunk (and padding)."""
    with make_engine(model_path, policy="snapkv", budget=384, chunk=128) as eng:
        per_token = N_HEAD_KV * D * 2 * 2
        sizes = []
        eng.generate("Hi! Say one word.", max_tokens=8, temperature=0, keep_history=True,
                     on_text=lambda _s: sizes.append((eng.n_past, capi.memory_bytes(eng.ctx))))
        res = eng.generate("Now count to twenty.", max_tokens=60, temperature=0, keep_history=True, ignore_eos=True,
                           on_text=lambda _s: sizes.append((eng.n_past, capi.memory_bytes(eng.ctx))))
        assert res.kv_bytes_allocated < eng.full_bytes(384, "f16")
        for seen, held in sizes:
            assert held <= N_LAYER * _pad(seen + 128 + 1) * per_token
        assert eng.kv_bytes_peak <= N_LAYER * _pad(eng.n_past + 128) * per_token


def test_statistics_match_numpy_from_the_same_forward_pass(dumped):
    eng, dump, layers = dumped
    w = 16
    capi.set_stats(eng.ctx, [capi.STAT_OBS, capi.STAT_OBS_ADAPTIVE, capi.STAT_ACC, capi.STAT_LAST, capi.STAT_VNORM],
                   w, query_heads=True)
    eng._stats_phase = "manual"
    tokens = eng.model.tokenize(TEXT)[:110]
    raw_decode(eng, tokens[:60])        # chunk 1 (stays below the budget: no compression)
    dump.end_pass()
    raw_decode(eng, tokens[60:110], True)   # chunk 2
    dump.end_pass()
    for li, il in enumerate(layers):
        ikv = il                          # every layer is cached, in order
        q2 = dump.tensors[f"Qcur-{il}"][1]
        k = _f16(np.concatenate([dump.tensors[f"Kcur-{il}"][0], dump.tensors[f"Kcur-{il}"][1]]))
        v = np.concatenate([dump.tensors[f"Vcur-{il}"][0], dump.tensors[f"Vcur-{il}"][1]])
        q1 = dump.tensors[f"Qcur-{il}"][0]
        k1 = k[:60]

        obs = capi.get_stat(eng.ctx, ikv, capi.STAT_OBS, N_HEAD)
        want = ref_obs(q2, k, w, 1 / np.sqrt(D))
        np.testing.assert_allclose(obs, want, atol=2e-3, rtol=2e-2)
        # summed per KV head
        obs_kv = capi.get_stat(eng.ctx, ikv, capi.STAT_OBS, N_HEAD_KV, sum_per_kv_head=True)
        np.testing.assert_allclose(obs_kv, want.reshape(N_HEAD_KV, GROUP, -1).sum(1), atol=1e-2, rtol=2e-2)

        # AhaKV's adaptive scale per row: i visible tokens, k = the layer's capacity (64)
        scales = [ref_adaptive_scale(60 + (50 - w + r) + 1, 64) for r in range(w)]
        ada = capi.get_stat(eng.ctx, ikv, capi.STAT_OBS_ADAPTIVE, N_HEAD)
        np.testing.assert_allclose(ada, ref_obs(q2, k, w, np.array(scales)), atol=2e-3, rtol=2e-2)

        last = capi.get_stat(eng.ctx, ikv, capi.STAT_LAST, N_HEAD)
        want_last = np.zeros_like(want)
        for h in range(N_HEAD):
            want_last[h] = _softmax(k[:, h // GROUP] @ q2[-1, h] / np.sqrt(D))
        np.testing.assert_allclose(last, want_last, atol=2e-3, rtol=2e-2)

        # H2O accumulation: chunk 1's observation plus chunk 2's
        acc = capi.get_stat(eng.ctx, ikv, capi.STAT_ACC, N_HEAD)
        acc_want = want.copy()
        acc_want[:, :60] += ref_obs(q1, k1, w, 1 / np.sqrt(D))
        np.testing.assert_allclose(acc, acc_want, atol=3e-3, rtol=2e-2)

        vnorm = capi.get_stat(eng.ctx, ikv, capi.STAT_VNORM, N_HEAD_KV)
        np.testing.assert_allclose(vnorm, (v ** 2).sum(-1).T, rtol=1e-4, atol=1e-4)
    assert li == len(layers) - 1


def test_statistics_sum_their_queries_in_place(model_path):
    """On the CPU the observed queries' probabilities are summed by one out_prod per layer, read where the softmax
    left them: no transposed copy and sum_rows (the form for a device without out_prod, twice the cost)."""
    ops = {}
    for stats in ([capi.STAT_OBS], []):
        count = OpCount()
        with make_engine(model_path, policy="snapkv", budget=64, chunk=64, eval_callback=count.callback) as eng:
            capi.set_stats(eng.ctx, stats, 16)
            eng._stats_phase = "manual"
            count.ops.clear()
            raw_decode(eng, eng.model.tokenize(TEXT)[:40])
        ops[bool(stats)] = count.ops
    assert ops[True].get("OUT_PROD", 0) == N_LAYER
    assert ops[False].get("OUT_PROD", 0) == 0
    assert ops[True].get("SUM_ROWS", 0) == ops[False].get("SUM_ROWS", 0)
    assert ops[True]["SOFT_MAX"] - ops[False].get("SOFT_MAX", 0) == N_LAYER  # the statistic's own softmax


def test_keep_moves_exactly_the_requested_tokens(dumped):
    eng, dump, layers = dumped
    rng = np.random.default_rng(0)
    w = 8
    capi.set_stats(eng.ctx, [capi.STAT_OBS, capi.STAT_VNORM], w, query_heads=True)
    eng._stats_phase = "manual"
    tokens = eng.model.tokenize(TEXT)[:100]
    for part in (tokens[:50], tokens[50:100]):   # n_batch is 64
        raw_decode(eng, part)
        dump.end_pass()
    kept = {}
    for i in range(N_LAYER):
        before = capi.positions(eng.ctx, i, N_HEAD_KV)
        vn_before = capi.get_stat(eng.ctx, i, capi.STAT_VNORM, N_HEAD_KV)
        slots = np.stack([np.sort(rng.choice(100, size=40, replace=False)) for _ in range(N_HEAD_KV)])
        capi.keep(eng.ctx, i, slots)
        after = capi.positions(eng.ctx, i, N_HEAD_KV)
        assert after.shape == (N_HEAD_KV, 40)
        assert (after == np.take_along_axis(before, slots, 1)).all()   # each head kept its own tokens
        # statistics follow their tokens
        np.testing.assert_array_equal(capi.get_stat(eng.ctx, i, capi.STAT_VNORM, N_HEAD_KV),
                                      np.take_along_axis(vn_before, slots, 1))
        assert capi.layer_state(eng.ctx, i)[2] == 40
        kept[i] = slots
    decode_and_check_kept(eng, dump, layers, kept, tokens[:20], 100, w)
    for il in layers:
        assert (capi.positions(eng.ctx, il, N_HEAD_KV)[:, 40:] == np.arange(100, 120)).all()


def test_chunked_prefill_of_8x_the_budget_stays_inside_and_answers(model_path):
    filler = "The river flows past the old mill and the wind moves the grass on the hills. "
    fact = "Remember this: the password for the vault is BLUE-HERON-42. "
    # prefill_budget = budget: the strict mode, no working set beyond the budget while the prompt goes in
    with make_engine(model_path, policy="snapkv", budget=128, prefill_budget=128, chunk=128) as eng:
        body = filler * 90
        prompt = body + fact + "Question: what is the password for the vault?"
        allocated = capi.memory_bytes(eng.ctx)
        used_max = []
        orig = eng.compress

        def watched(phase, room=0, targets=None):
            did = orig(phase, room, targets)
            used_max.append(max(capi.layer_state(eng.ctx, i)[2] for i in range(N_LAYER)))
            return did
        eng.compress = watched
        res = eng.generate(prompt, max_tokens=16, temperature=0)
        assert res.prompt_tokens >= 8 * 128
        assert res.compressions >= 7
        assert max(used_max) <= 128 + 128                    # never more than budget + one chunk
        per_slot = N_HEAD_KV * D * 2 * 2
        assert allocated == N_LAYER * 32 * per_slot          # one decode interval before the prompt
        assert eng.kv_bytes_peak == N_LAYER * (128 + 128) * per_slot   # the working set: budget + one chunk
        assert res.kv_tokens_kept <= 128 + 32
        assert "BLUE-HERON-42" in res.text.replace(" ", "")


def test_prefill_working_set_then_shrink_to_the_budget(model_path):
    """A larger working set while the prompt goes in, then the buffers shrink to the budget + decode interval."""
    filler = "The river flows past the old mill and the wind moves the grass on the hills. "
    with make_engine(model_path, policy="snapkv", budget=128, prefill_budget=512, chunk=128) as eng:
        per_slot = N_HEAD_KV * D * 2 * 2
        assert capi.memory_bytes(eng.ctx) == N_LAYER * 32 * per_slot  # the working set is not allocated...
        assert eng.memory_report(2048).kv_bytes_prefill == N_LAYER * (512 + 128) * per_slot  # ...before a prompt
        assert capi.memory_bytes(eng.ctx) == N_LAYER * (128 + 32) * per_slot  # the report sizes it as at rest
        prompt = filler * 30 + "The vault password is BLUE-HERON-42. " + filler * 30 + \
            "Question: what is the vault password?"
        res = eng.generate(prompt, max_tokens=16, temperature=0)
        assert res.prompt_tokens > 1024                               # more than the working set: it compressed
        assert res.kv_bytes_prefill == N_LAYER * (512 + 128) * per_slot   # held while the prompt went in
        after = capi.memory_bytes(eng.ctx)
        used = [capi.layer_state(eng.ctx, i)[2] for i in range(N_LAYER)]
        assert all(u <= 128 + 32 for u in used)
        assert after == N_LAYER * _pad(128 + 32) * per_slot           # the budget + one decode interval
        # a new short prompt (the cache is emptied first) holds only what it needs
        res2 = eng.generate("Say OK.", max_tokens=4, temperature=0)
        assert capi.memory_bytes(eng.ctx) == N_LAYER * _pad(eng.n_past + 32) * per_slot and res2.text


def test_resize_refuses_to_drop_tokens(model_path):
    with make_engine(model_path, policy="snapkv", budget=64, prefill_budget=64, chunk=64) as eng:
        tokens = eng.model.tokenize(TEXT * 2)
        capi.set_stats(eng.ctx, [capi.STAT_VNORM], 32)
        eng._stats_phase = "manual"
        raw_decode(eng, tokens[:60])
        raw_decode(eng, tokens[60:120])                                      # 120 of 128 slots in use
        caps = (ctypes.c_uint32 * N_HEADS)(*[64] * N_HEADS)
        small = (ctypes.c_uint32 * N_HEADS)(*[96] * N_HEADS)
        zero = (ctypes.c_uint32 * N_HEADS)(*[0] * N_HEADS)
        assert capi.lib.llama_localkv_resize(eng.ctx, caps, small, N_HEADS) == -3  # 96 slots < 120 in use
        assert capi.lib.llama_localkv_resize(eng.ctx, caps, zero, N_HEADS) == -6   # no slots
        assert capi.lib.llama_localkv_resize(eng.ctx, zero, small, N_HEADS) == -6  # no capacity
        assert capi.lib.llama_localkv_resize(eng.ctx, caps, small, N_LAYER) == -1  # one entry per layer, not head
        assert capi.lib.llama_localkv_resize(eng.ctx, caps, None, N_HEADS) == -1
        assert capi.layer_state(eng.ctx, 0) == (64, 128, 120)                # nothing changed
        before = capi.positions(eng.ctx, 0, N_HEAD_KV)
        vnorm = capi.get_stat(eng.ctx, 0, capi.STAT_VNORM, N_HEAD_KV)
        k_rows = capi.read_rows(eng.ctx, 0, 0)
        moved = capi.transfer_bytes(eng.ctx)
        capi.resize(eng.ctx, [200] * N_HEADS, [264] * N_HEADS)               # grow: tokens and statistics move
        assert capi.transfer_bytes(eng.ctx) == moved                         # backend to backend
        assert capi.layer_state(eng.ctx, 0) == (200, 288, 120)
        assert (capi.positions(eng.ctx, 0, N_HEAD_KV) == before).all()
        np.testing.assert_array_equal(capi.get_stat(eng.ctx, 0, capi.STAT_VNORM, N_HEAD_KV), vnorm)
        np.testing.assert_array_equal(capi.read_rows(eng.ctx, 0, 0), k_rows)
        raw_decode(eng, tokens[120:130], True)                               # still decodes after the move
        assert capi.layer_state(eng.ctx, 0)[2] == 130


@pytest.mark.parametrize("ctype", ["f16", "q8_0", "q4_0"])
def test_compaction_on_the_backend_is_bit_exact(model_path, ctype):
    """keep moves K and V rows byte for byte (no requantization), each head its own rows; only indices go up."""
    with make_engine(model_path, policy="snapkv", budget=64, chunk=64, cache_type_k=ctype, cache_type_v=ctype,
                     flash_attn=True) as eng:
        capi.set_stats(eng.ctx, [capi.STAT_OBS, capi.STAT_VNORM], 16)
        eng._stats_phase = "manual"
        tokens = eng.model.tokenize(TEXT * 2)
        raw_decode(eng, tokens[:64])
        raw_decode(eng, tokens[64:100])
        rng = np.random.default_rng(1)
        layers = (0, 11, 23)
        before = {i: (capi.read_rows(eng.ctx, i, 0), capi.read_rows(eng.ctx, i, 1),
                      capi.get_stat(eng.ctx, i, capi.STAT_OBS, N_HEAD_KV, True),
                      capi.get_stat(eng.ctx, i, capi.STAT_VNORM, N_HEAD_KV)) for i in layers}
        moved, transfers = capi.transfer_bytes(eng.ctx), capi.transfers(eng.ctx)
        alloc = capi.layer_state(eng.ctx, 0)[1]
        keeps = {}
        for i in layers:
            keeps[i] = np.stack([np.sort(rng.choice(100, size=37, replace=False)) for _ in range(N_HEAD_KV)])
            capi.keep(eng.ctx, i, keeps[i])
        # a second keep of one layer before the rows moved composes with the first
        second = np.stack([np.sort(rng.choice(37, size=20, replace=False)) for _ in range(N_HEAD_KV)])
        capi.keep(eng.ctx, 11, second)
        keeps[11] = np.take_along_axis(keeps[11], second, 1)
        for i in layers:
            k0, v0, obs0, vn0 = before[i]
            n = keeps[i].shape[1]
            for rows0, which in ((k0, 0), (v0, 1)):
                got = capi.read_rows(eng.ctx, i, which)       # a row per (KV head, slot), head after head
                assert got.shape == (N_HEAD_KV * n, rows0.shape[1])
                for h in range(N_HEAD_KV):
                    np.testing.assert_array_equal(got[h * n:(h + 1) * n], rows0[h * 100 + keeps[i][h]])
            np.testing.assert_array_equal(capi.get_stat(eng.ctx, i, capi.STAT_OBS, N_HEAD_KV, True),
                                          np.take_along_axis(obs0, keeps[i], 1))
            np.testing.assert_array_equal(capi.get_stat(eng.ctx, i, capi.STAT_VNORM, N_HEAD_KV),
                                          np.take_along_axis(vn0, keeps[i], 1))
        # host <-> backend traffic of the compaction: every layer's int32 indices in one upload, and zeros for the
        # freed slots' statistics (the largest run's) in another; no K or V byte. Each statistic read is one
        # transfer of the layer's block
        read_after = len(layers) * 2 * N_HEAD_KV * alloc * 4
        indices = sum(keeps[i].size * 4 for i in layers)
        zeros = (alloc - min(keeps[i].shape[1] for i in layers)) * N_HEAD_KV * 4
        assert capi.transfer_bytes(eng.ctx) - moved == indices + zeros + read_after
        assert capi.transfers(eng.ctx) - transfers == 2 + 2 * len(layers)
        raw_decode(eng, tokens[100:110], True)   # decoding goes on over the moved rows


def test_statistics_are_allocated_on_demand_per_kv_head(model_path):
    with make_engine(model_path, policy="snapkv", budget=64, chunk=64) as eng:
        live = N_LAYER * N_HEAD_KV * capi.layer_state(eng.ctx, 0)[1] * 2         # the live masks: F16 per slot
        assert capi.stats_bytes(eng.ctx) == live
        raw_decode(eng, eng.model.tokenize(TEXT)[:40])
        slots = capi.layer_state(eng.ctx, 0)[1]
        live = N_LAYER * N_HEAD_KV * slots * 2
        capi.set_stats(eng.ctx, [capi.STAT_OBS], 16)
        assert capi.stats_bytes(eng.ctx) == live + N_LAYER * N_HEAD_KV * slots * 4     # one statistic, per KV head
        capi.set_stats(eng.ctx, [capi.STAT_ACC], 16)                                  # kept, not computed, while off
        assert capi.stats_bytes(eng.ctx) == live + 2 * N_LAYER * N_HEAD_KV * slots * 4
        with pytest.raises(LocalkvError, match="per KV head"):
            capi.get_stat(eng.ctx, 0, capi.STAT_OBS, N_HEAD, sum_per_kv_head=False)
        capi.set_stats(eng.ctx, [capi.STAT_OBS], 16, query_heads=True)               # per query head: started afresh
        assert capi.stats_bytes(eng.ctx) == live + N_LAYER * N_HEAD * slots * 4


@pytest.mark.parametrize("policy", ["streamingllm", "ahakv"])
@pytest.mark.slow  # decodes 200 tokens twice per policy (about 25 s for both on 2 cores)
def test_decoding_reuses_the_graph_between_compressions(model_path, policy, monkeypatch):
    """Writes go through index inputs, so llama.cpp reuses the decode graph between compressions (its own
    n_reused counter), and a reused graph gives exactly what a rebuilt one gives."""
    prompt = "Count from 1 to 300, separated by spaces."
    with make_engine(model_path, policy=policy, budget=64, chunk=64, decode_interval=32) as eng:
        r0 = eng.graphs_reused()
        res = eng.generate(prompt, max_tokens=200, temperature=0, ignore_eos=True)
        steps = res.generated_tokens - 1
        assert res.compressions >= 3
        assert eng.graphs_reused() - r0 >= 0.9 * steps
    monkeypatch.setenv("LLAMA_GRAPH_REUSE_DISABLE", "1")   # read when a context is created
    with make_engine(model_path, policy=policy, budget=64, chunk=64, decode_interval=32) as eng:
        r0 = eng.graphs_reused()
        again = eng.generate(prompt, max_tokens=200, temperature=0, ignore_eos=True)
        assert eng.graphs_reused() == r0 and again.text == res.text


@pytest.mark.parametrize("policy", ["snapkv", "pyramidkv"])
def test_a_prompt_within_the_prefill_budget_is_compressed_once(model_path, policy):
    """Every layer may hold the prefill budget while a prompt goes in, even one whose PyramidKV share is
    smaller: a prompt that fits is compressed once, after its question was read (the bench caught a layer
    limited to its share compressing mid-prompt and losing a needle)."""
    with make_engine(model_path, policy=policy, budget=64, prefill_budget=256, chunk=64) as eng:
        tokens = eng.model.tokenize(TEXT * 2)[:250]
        assert len(tokens) == 250
        eng.feed(tokens)
        assert eng.compressions == 1
        assert eng.kv_bytes_peak <= N_LAYER * (256 + 64) * N_HEAD_KV * D * 2 * 2


def test_every_prompt_compression_reads_the_window_of_the_chunk_before_it(model_path):
    """The observation window is computed only for chunks a compression follows: the engine predicts which,
    and a wrong guess would rank tokens by a stale window. Every compression must come right after a
    chunk decoded with the window on, and most chunks of a long prompt must skip it."""
    with make_engine(model_path, policy="snapkv", budget=64, prefill_budget=128, chunk=64) as eng:
        events = []
        decode, compress = eng._decode, eng.compress

        def watched_decode(tokens, *a, **kw):
            events.append(("decode", eng._stats_phase))
            return decode(tokens, *a, **kw)

        def watched_compress(phase, room=0, targets=None):
            did = compress(phase, room, targets)
            if did:
                events.append(("compress", phase))
            return did
        eng._decode, eng.compress = watched_decode, watched_compress
        eng.feed(eng.model.tokenize(TEXT * 4)[:700])
        compressions = [i for i, e in enumerate(events) if e[0] == "compress"]
        assert len(compressions) >= 5
        for i in compressions:
            last_decode = next(e for e in reversed(events[:i]) if e[0] == "decode")
            assert last_decode[1] == ("prefill", True), events
        decodes = [e for e in events if e[0] == "decode"]
        assert sum(e[1] == ("prefill", False) for e in decodes) >= 1   # the window is skipped where nothing follows


def test_decoding_holds_the_budget(model_path):
    with make_engine(model_path, policy="streamingllm", budget=64, chunk=64, decode_interval=16) as eng:
        seen = []
        res = eng.generate("Count from 1 to 300, separated by spaces.", max_tokens=200, temperature=0,
                           ignore_eos=True, on_text=lambda s: seen.append(eng.kv_tokens_kept()))
        assert res.generated_tokens == 200
        assert max(seen) <= 64 + 16
        assert res.compressions >= 5




def test_c_api_errors_are_codes_not_crashes(model_path):
    lib = capi.lib
    with make_engine(model_path, ctx=256, chunk=64) as plain:          # compression off
        ctx = plain.ctx
        assert lib.llama_localkv_enabled(ctx) == 0
        assert lib.llama_localkv_enabled(None) == -1
        assert lib.llama_localkv_set_stats(ctx, 1, 32) == -3            # not enabled
        assert lib.llama_localkv_keep(ctx, 0, None, None) == -3
        assert lib.llama_localkv_cache_state(ctx, None, None, None, 0) == -3
        assert lib.llama_localkv_get_positions(ctx, 0, None, 0) == -3
        assert lib.llama_localkv_get_stat(ctx, 0, 0, False, None, 0) == -3
        assert lib.llama_localkv_clear_stat(ctx, 0) == -3
        assert lib.llama_localkv_stats_bytes(ctx) == -3
        assert lib.llama_localkv_transfer_bytes(ctx) == -3
        assert lib.llama_localkv_read_rows(ctx, 0, 0, None, 0) == -3
        assert lib.llama_localkv_resize(ctx, None, None, N_LAYER) == -3
        assert lib.llama_localkv_enable(None, None, None, 0) == -1
        caps = (ctypes.c_uint32 * N_HEADS)(*[64] * N_HEADS)
        slots = (ctypes.c_uint32 * N_HEADS)(*[128] * N_HEADS)
        assert lib.llama_localkv_enable(ctx, caps, slots, N_HEADS - 1) == -1   # wrong head count
        assert lib.llama_localkv_enable(ctx, None, slots, N_HEADS) == -1
        assert lib.llama_localkv_enable(ctx, caps, None, N_HEADS) == -1
        zero = (ctypes.c_uint32 * N_HEADS)(*[0] * N_HEADS)
        assert lib.llama_localkv_enable(ctx, zero, slots, N_HEADS) == -6
        assert lib.llama_localkv_enable(ctx, caps, zero, N_HEADS) == -6
        huge = (ctypes.c_uint32 * N_HEADS)(*[1 << 30] * N_HEADS)
        assert lib.llama_localkv_enable(ctx, huge, slots, N_HEADS) == -6
        assert lib.llama_localkv_enable(ctx, caps, huge, N_HEADS) == -6
        plain.generate("hi", max_tokens=1, temperature=0)
        assert lib.llama_localkv_enable(ctx, caps, slots, N_HEADS) == -3       # cache not empty
        assert b"empty" in lib.llama_localkv_last_error()
        plain.reset()
        assert lib.llama_localkv_enable(ctx, caps, slots, N_HEADS) == 0
        assert lib.llama_localkv_enable(ctx, caps, slots, N_HEADS) == -3       # already on
        assert lib.llama_localkv_stats_bytes(ctx) == N_HEADS * 128 * 2             # the live masks; statistics only when asked for
        assert lib.llama_localkv_get_stat(ctx, 0, 0, True, None, 0) == -3      # never switched on

        assert lib.llama_localkv_set_stats(ctx, 1 << 10, 32) == -1
        assert lib.llama_localkv_set_stats(ctx, 1, 0) == -1
        assert lib.llama_localkv_cache_state(ctx, None, None, None, 0) == N_HEADS
        small = (ctypes.c_uint32 * 4)()
        assert lib.llama_localkv_cache_state(ctx, small, None, None, 4) == -1   # arrays too small
        assert lib.llama_localkv_get_positions(ctx, N_LAYER, None, 0) == -4
        assert lib.llama_localkv_get_positions(ctx, -1, None, 0) == -4
        assert lib.llama_localkv_get_stat(ctx, 0, 99, False, None, 0) == -1
        assert lib.llama_localkv_get_stat(ctx, 99, 0, False, None, 0) == -4
        assert lib.llama_localkv_clear_stat(ctx, -1) == -1

        assert lib.llama_localkv_set_stats(ctx, 1 | capi.STATS_QUERY_HEADS, 32) == 0
        plain.n_past = 0
        plain._decode(plain.model.tokenize(TEXT)[:30], False)
        buf = (ctypes.c_float * 10)()
        assert lib.llama_localkv_get_stat(ctx, 0, 0, False, buf, 10) == -1   # buffer too small
        pos = (ctypes.c_int32 * 10)()
        assert lib.llama_localkv_get_positions(ctx, 0, pos, 10) == -1
        two = (ctypes.c_int32 * 2)(2, 2)
        slots = (ctypes.c_int32 * 4)(0, 1, 2, 2)
        assert lib.llama_localkv_keep(ctx, 0, slots, two) == -5              # head 1 repeats slot 2
        slots = (ctypes.c_int32 * 4)(0, 1, 2, 30)
        assert lib.llama_localkv_keep(ctx, 0, slots, two) == -5              # slot out of range
        slots = (ctypes.c_int32 * 4)(0, -1, 2, 3)
        assert lib.llama_localkv_keep(ctx, 0, slots, two) == -5
        assert lib.llama_localkv_keep(ctx, 0, slots, (ctypes.c_int32 * 2)(2, 31)) == -1   # more than in use
        assert lib.llama_localkv_keep(ctx, 0, slots, (ctypes.c_int32 * 2)(-1, 2)) == -1
        assert lib.llama_localkv_keep(ctx, 0, None, two) == -1
        assert lib.llama_localkv_keep(ctx, 0, slots, None) == -1
        assert lib.llama_localkv_keep(ctx, 99, slots, two) == -4
        assert capi.layer_state(ctx, 0)[2] == 30                              # nothing changed
        ok = (ctypes.c_int32 * 3)(0, 29, 28)
        assert lib.llama_localkv_keep(ctx, 0, ok, (ctypes.c_int32 * 2)(2, 1)) == 0   # heads keep different counts
        assert capi.head_state(ctx, 0)[2].tolist() == [2, 1]

        # a batch that does not fit is refused (llama_decode returns 1), not a crash
        tokens = plain.model.tokenize(TEXT * 8)
        with pytest.raises(LocalkvError, match="code 1"):
            for i in range(0, 600, 100):
                plain._decode(tokens[i:i + 100], False)


def test_the_compressed_cache_is_a_memory_module_of_its_own(model_path):
    """enable puts a new llama_memory_i in place of the plain cache (freed), and llama.cpp's own memory API drives it."""
    import llama_cpp as ll
    lib = capi.lib
    with make_engine(model_path, ctx=1024, chunk=64) as plain:          # compression off: upstream's cache
        ctx = plain.ctx
        before = ll.llama_get_memory(ctx)
        full = capi.memory_bytes(ctx)
        assert full == 1024 * N_LAYER * N_HEAD_KV * D * 2 * 2
        caps = (ctypes.c_uint32 * N_HEADS)(*[64] * N_HEADS)
        slots = (ctypes.c_uint32 * N_HEADS)(*[96] * N_HEADS)
        assert lib.llama_localkv_enable(ctx, caps, slots, N_HEADS) == 0
        mem = ll.llama_get_memory(ctx)
        assert mem != before
        # the plain cache is gone: only the compressed rows are allocated, under upstream's tensor names
        assert capi.memory_bytes(ctx) == N_LAYER * N_HEAD_KV * 96 * D * 2 * 2 < full
        assert not ll.llama_memory_can_shift(mem)
        assert ll.llama_memory_seq_pos_max(mem, 0) == -1

        plain._decode(plain.model.tokenize(TEXT)[:40], False)
        assert (ll.llama_memory_seq_pos_min(mem, 0), ll.llama_memory_seq_pos_max(mem, 0)) == (0, 39)
        assert ll.llama_memory_seq_pos_max(mem, 1) == -1                  # one sequence
        assert ll.llama_memory_seq_rm(mem, 0, 30, -1)                     # drop the tail through upstream's API
        assert ll.llama_memory_seq_pos_max(mem, 0) == 29
        assert capi.positions(ctx, 5).tolist() == [list(range(30))] * N_HEAD_KV
        assert ll.llama_state_get_size(ctx) == 0                           # no save: an error, not an abort
        ll.llama_memory_clear(mem, True)
        assert ll.llama_memory_seq_pos_max(mem, 0) == -1
        assert capi.head_state(ctx, 0)[2].tolist() == [0, 0]


@pytest.mark.parametrize("ctype,flash_attn", [("f16", False), ("f16", True), ("q8_0", True), ("q4_0", True)])
def test_before_any_eviction_the_logits_are_upstreams(model_path, ctype, flash_attn):
    """The compressed module holding every token gives the plain cache's logits bit for bit (quantized types
    included: it applies the same Hadamard rotation upstream's cache chooses for them)."""
    logits = []
    for policy in (None, "snapkv"):
        kw = {"policy": policy, "budget": 256} if policy else {}
        with make_engine(model_path, chunk=64, ctx=512, cache_type_k=ctype, cache_type_v=ctype, flash_attn=flash_attn,
                         **kw) as eng:
            tokens = eng.model.tokenize(TEXT)[:90]
            raw_decode(eng, tokens[:60])
            raw_decode(eng, tokens[60:], logits=True)
            logits.append(np.ctypeslib.as_array(capi.llama_cpp.llama_get_logits(eng.ctx),
                                                shape=(eng.shape.n_vocab,)).copy())
    assert np.array_equal(logits[0], logits[1])


def test_a_sliding_window_model_compresses_its_full_attention_layers():
    """Gemma 3 (optional registry model): its 3 global layers are compressed, its 15 windowed layers keep their
    window as upstream keeps them (random-weight models of every shape: test_architectures.py)."""
    from localkv import models
    try:
        path = models.resolve("gemma-3-270m-q4_k_m", progress=False)
    except LocalkvError:
        pytest.skip("gemma-3-270m-q4_k_m is not installed (localkv models pull gemma-3-270m-q4_k_m)")
    with make_engine(str(path), policy="snapkv", budget=128) as eng:
        assert [il for il, _k, _v in eng.kv_layers] == [5, 11, 17]
        assert len(eng.windowed_layers) == 15