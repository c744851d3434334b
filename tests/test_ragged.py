"""Ragged storage (patch 0006): every (layer, KV head) has its own capacity, slots and kept count.

Checked on the default model: the bytes llama.cpp allocates follow the per-head slots, heads keep different
numbers of tokens and read them back exactly, a ragged layer attends exactly each head's own tokens (checked
against NumPy through the observation statistic), and the per-part attention gives the same logits as the
one-call path of a uniform layer.
"""
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import make_engine, raw_decode
from graph_dump import GraphDump
from localkv import capi

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from test_compressed import D, GROUP, N_HEAD, N_HEAD_KV, N_LAYER, TEXT, decode_and_check_kept

pytestmark = pytest.mark.model

N_HEADS = N_LAYER * N_HEAD_KV


def _pad(n):
    return max(32, -(-n // 32) * 32)


def test_allocated_bytes_follow_the_per_head_slots(model_path):
    """A 10:1 spread of head slots: llama.cpp's own memory breakdown holds exactly the sum over (layer, KV head)
    of slots x head dim x (K + V bytes), for f16 and q8_0."""
    for ctype, elem in (("f16", 2.0), ("q8_0", 34 / 32)):
        with make_engine(model_path, policy="snapkv", budget=64, chunk=64, cache_type_k=ctype, cache_type_v=ctype,
                         flash_attn=True) as eng:
            slots = [400 if k % 2 == 0 else 40 for k in range(N_HEADS)]     # 10:1 between the heads of a layer
            caps = [s // 2 for s in slots]
            capi.resize(eng.ctx, caps, slots)
            cap, alloc, used = capi.cache_state(eng.ctx)
            assert cap.tolist() == caps and alloc.tolist() == [_pad(s) for s in slots] and not used.any()
            want = sum(_pad(s) for s in slots) * D * elem * 2
            assert capi.memory_bytes(eng.ctx) == want
            assert capi.memory_bytes(eng.ctx) == sum(k + v for _il, k, v in capi.kv_layers(eng.ctx))
            uniform = N_HEADS * _pad(max(slots)) * D * elem * 2
            assert capi.memory_bytes(eng.ctx) < 0.6 * uniform   # a padded (uniform) layout would hold this


def test_heads_keep_different_counts_and_read_them_back_exactly(model_path):
    with make_engine(model_path, policy="snapkv", budget=64, chunk=64) as eng:
        capi.set_stats(eng.ctx, [capi.STAT_OBS, capi.STAT_VNORM], 16, query_heads=True)
        eng._stats_phase = "manual"
        tokens = eng.model.tokenize(TEXT * 2)
        raw_decode(eng, tokens[:64])
        raw_decode(eng, tokens[64:100])
        rng = np.random.default_rng(2)
        for i in (0, 7, 23):
            pos0 = capi.positions(eng.ctx, i)
            obs0 = capi.get_stat(eng.ctx, i, capi.STAT_OBS, N_HEAD)
            vn0 = capi.get_stat(eng.ctx, i, capi.STAT_VNORM, N_HEAD_KV)
            k0 = capi.read_rows(eng.ctx, i, 0)
            counts = (50, 9 + i)
            keep = [np.sort(rng.choice(100, size=c, replace=False)) for c in counts]
            capi.keep(eng.ctx, i, keep)
            assert capi.head_state(eng.ctx, i)[2].tolist() == list(counts)
            pos = capi.positions(eng.ctx, i)
            obs = capi.get_stat(eng.ctx, i, capi.STAT_OBS, N_HEAD)
            vn = capi.get_stat(eng.ctx, i, capi.STAT_VNORM, N_HEAD_KV)
            k = capi.read_rows(eng.ctx, i, 0)
            assert k.shape[0] == sum(counts)
            at = 0
            for h, c in enumerate(counts):
                np.testing.assert_array_equal(pos[h, :c], pos0[h, keep[h]])
                assert (pos[h, c:] == -1).all()                       # past the head's own count
                np.testing.assert_array_equal(vn[h, :c], vn0[h, keep[h]])
                for g in range(GROUP):                                # a query head follows its KV head
                    np.testing.assert_array_equal(obs[h * GROUP + g, :c], obs0[h * GROUP + g, keep[h]])
                np.testing.assert_array_equal(k[at:at + c], k0[h * 100 + keep[h]])
                at += c


def test_a_ragged_layer_attends_exactly_each_heads_own_tokens(model_path):
    """After a keep with different counts per head, the next ubatch's attention (observation statistic, per
    query head) matches NumPy over each head's own kept keys plus the new ones."""
    layers = (0, 13)
    dump = GraphDump({f"{n}cur-{il}" for n in "QK" for il in layers})
    with make_engine(model_path, policy="snapkv", budget=64, chunk=64, eval_callback=dump.callback) as eng:
        w = 8
        capi.set_stats(eng.ctx, [capi.STAT_OBS], w, query_heads=True)
        eng._stats_phase = "manual"
        tokens = eng.model.tokenize(TEXT)[:100]
        for part in (tokens[:50], tokens[50:100]):
            raw_decode(eng, part)
            dump.end_pass()
        rng = np.random.default_rng(5)
        kept = {}
        for i in range(N_LAYER):
            kept[i] = [np.sort(rng.choice(100, size=c, replace=False)) for c in (45, 12 + i)]
            capi.keep(eng.ctx, i, kept[i])
        decode_and_check_kept(eng, dump, layers, kept, tokens[:20], 100, w)
        for il in layers:
            used = capi.head_state(eng.ctx, il)[2].tolist()
            assert used == [45 + 20, 12 + il + 20]


@pytest.mark.parametrize("flash_attn", [True, False])
def test_per_head_attention_gives_the_logits_of_one_call(model_path, flash_attn):
    """The same tokens in every head, once with equal slots (one attention call per layer) and once with a 10:1
    spread of slots (one call per head, concatenated): the logits agree."""
    tokens = None
    logits = []
    for spread in (False, True):
        with make_engine(model_path, policy="snapkv", budget=64, chunk=64, flash_attn=flash_attn) as eng:
            tokens = tokens or eng.model.tokenize(TEXT)[:90]
            slots = [320 if (spread and k % 2) else 128 for k in range(N_HEADS)]
            capi.resize(eng.ctx, [64] * N_HEADS, slots)
            eng._decode(tokens[:60], False)
            eng._decode(tokens[60:90], True)
            logits.append(np.ctypeslib.as_array(capi.llama_cpp.llama_get_logits(eng.ctx),
                                                shape=(eng.shape.n_vocab,)).copy())
    np.testing.assert_allclose(logits[1], logits[0], atol=1e-3, rtol=1e-3)
    assert int(logits[1].argmax()) == int(logits[0].argmax())


def test_an_engine_with_per_head_budgets_holds_them_and_answers(model_path):
    """A policy's per-head budgets (3:1 between the heads of a layer) reach the C side: after a long prompt each
    head holds its own budget, the memory follows, and the answer is still read from what was kept. (At 10:1 the
    small heads keep 35 tokens, little beyond SnapKV's window of 32, and this uncalibrated split loses the fact.)"""
    filler = "The river flows past the old mill and the wind moves the grass on the hills. "
    prompt = filler * 12 + "The vault password is BLUE-HERON-42. " + filler * 12 + \
        "Question: what is the vault password?"
    from ragged_spread import SpreadSnapKV  # the policy docs/results.md's spread numbers use (its script loads the engine)
    spread = SpreadSnapKV()
    spread.spread = 3
    with make_engine(model_path, policy=spread, budget=192, chunk=128) as eng:
        res = eng.generate(prompt, max_tokens=12, temperature=0)
        assert res.prompt_tokens > 400 and res.compressions >= 1
        cap, alloc, used = capi.cache_state(eng.ctx)
        assert cap.tolist() == [288, 96] * N_LAYER
        assert (used <= cap + 32).all() and used[1::2].max() <= 96 + 32 < used[0::2].min()
        assert capi.memory_bytes(eng.ctx) == sum(alloc) * D * 2 * 2
        assert (alloc <= [_pad(c + 32) for c in cap]).all()
        assert "BLUE-HERON-42" in res.text.replace(" ", "")


def test_the_default_policies_stay_uniform(model_path):
    """Every shipped policy gives all KV heads of a layer one capacity (one attention call per layer)."""
    from localkv import policies
    for name in ("snapkv", "pyramidkv", "h2o", "ahakv", "streamingllm"):
        pol = policies.create(name, None)
        caps = pol.head_capacities(256, [N_HEAD_KV] * N_LAYER)
        assert caps[0::2] == caps[1::2] == pol.capacities(256, N_LAYER)
