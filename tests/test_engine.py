"""The engine on the default model: generation, JSON numbers, upstream equality with compression off."""
import json
import sys
from pathlib import Path

import pytest

from conftest import make_engine

pytestmark = pytest.mark.model

DATA = Path(__file__).parent / "data"


def test_greedy_generation_is_deterministic_and_answers(model_path):
    with make_engine(model_path) as eng:
        a = eng.generate("What is the capital of France?", max_tokens=12, temperature=0)
        b = eng.generate("What is the capital of France?", max_tokens=12, temperature=0)
    assert a.text == b.text
    assert "Paris" in a.text


@pytest.mark.parametrize("policy,budget", [("full", None), ("snapkv", 64)])
def test_a_reply_cut_by_max_tokens_is_all_in_the_cache(model_path, policy, budget):
    """The next turn of a chat continues after the whole reply, its last sampled token included."""
    with make_engine(model_path, policy=policy, budget=budget) as eng:
        msgs = [{"role": "user", "content": "Count from one to twenty in words."}]
        res = eng.generate(messages=msgs, max_tokens=6, temperature=0, keep_history=True)
        assert res.stop_reason == "length" and res.generated_tokens == 6
        assert eng.n_past == res.prompt_tokens + res.generated_tokens
        msgs += [{"role": "assistant", "content": res.text}, {"role": "user", "content": "Go on."}]
        fed_before = eng.n_past
        res2 = eng.generate(messages=msgs, max_tokens=4, temperature=0, keep_history=True)
        assert res2.prompt_tokens < 20            # only the new turn was fed, not the conversation again
        assert eng.n_past == fed_before + res2.prompt_tokens + res2.generated_tokens


@pytest.mark.parametrize("policy,budget", [("full", None), ("snapkv", 64)])
def test_a_new_conversation_after_an_answer_prefix_starts_the_cache_over(model_path, policy, budget):
    """An answer prefix leaves nothing known to continue: the next keep_history call must not feed its
    whole conversation on top of the previous one."""
    with make_engine(model_path, policy=policy, budget=budget) as eng:
        eng.generate(messages=[{"role": "user", "content": "The code is 4412. What is the code?"}], max_tokens=4,
                     temperature=0, keep_history=True, answer_prefix="The code is")
        msgs = [{"role": "user", "content": "Name a colour."}]
        res = eng.generate(messages=msgs, max_tokens=4, temperature=0, keep_history=True)
        assert eng.n_past == res.prompt_tokens + res.generated_tokens  # this conversation alone
        alone = eng.model.tokenize(eng.model.chat_prompt(msgs), parse_special=True)
        assert res.prompt_tokens == len(alone)


def test_seeded_sampling_is_reproducible(model_path):
    with make_engine(model_path) as eng:
        a = eng.generate("Name a colour.", max_tokens=8, temperature=0.9, seed=7)
        b = eng.generate("Name a colour.", max_tokens=8, temperature=0.9, seed=7)
    assert a.text == b.text


def test_json_numbers_are_consistent(model_path):
    with make_engine(model_path, ctx=512) as eng:
        res = eng.generate("Say hi.", max_tokens=4, temperature=0, ignore_eos=True)
        layers = eng.kv_layers
        shape = eng.shape
    assert res.generated_tokens == 4
    # allocated bytes: llama.cpp's breakdown equals the sum of its K and V tensors (f16, 512 cells)
    assert res.kv_bytes_allocated == sum(k + v for _il, k, v in layers)
    assert res.kv_bytes_allocated == shape.n_layer * shape.n_head_kv * shape.head_dim * 2 * 2 * 512
    # full f16 for the tokens of this request: layers x KV heads x head dim x (K+V) x 2 bytes x tokens
    tokens = res.prompt_tokens + res.generated_tokens  # the last sampled token is decoded too (the cache holds it)
    assert res.kv_bytes_full_f16 == 24 * 2 * 64 * 2 * 2 * tokens
    assert res.peak_rss_bytes > 400 * 2**20  # the model itself is ~470 MB
    assert res.prefill_tokens_per_s > 0 and res.decode_tokens_per_s > 0


def test_quantized_cache_types_allocate_less(model_path):
    sizes = {}
    for t in ("f16", "q8_0", "q4_0"):
        with make_engine(model_path, ctx=512, cache_type_k=t, cache_type_v=t, flash_attn=True) as eng:
            sizes[t] = eng.memory_report().kv_bytes_allocated
    assert sizes["f16"] == 24 * 2 * 64 * 2 * 2 * 512
    assert sizes["q8_0"] == sizes["f16"] * 34 // 64
    assert sizes["q4_0"] == sizes["f16"] * 18 // 64


def test_prompt_longer_than_context_is_a_clear_error(model_path):
    from localkv.errors import LocalkvError
    with make_engine(model_path, ctx=64) as eng:
        with pytest.raises(LocalkvError, match="raise --ctx"):
            eng.generate("word " * 200, max_tokens=4)


def test_uncompressed_path_matches_unpatched_llama_cpp(model_path):
    """Greedy tokens and logits equal those recorded from a stock llama-cpp-python 0.3.36 build."""
    sys.path.insert(0, str(Path(__file__).parent))
    import upstream_ref
    ref = json.loads((DATA / "upstream_reference.json").read_text())
    got = upstream_ref.run(model_path)
    assert got["prompt_tokens"] == ref["prompt_tokens"]
    assert [s["token"] for s in got["steps"]] == [s["token"] for s in ref["steps"]]
    for g, r in zip(got["steps"], ref["steps"]):
        assert g["top_ids"][:8] == r["top_ids"][:8]
        assert g["top_logits"] == pytest.approx(r["top_logits"], abs=1e-3)
    if upstream_ref.cpu_signature() == ref["cpu"]:
        # same CPU as the recording: bit-identical logits
        assert [s["sha256"] for s in got["steps"]] == [s["sha256"] for s in ref["steps"]]


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.slow  # the soak test
def test_soak_long_chat_memory_stays_flat(model_path):
    """A scripted chat of 150 turns with a small budget: every turn answers, KV and RSS stay flat."""
    with make_engine(model_path, policy="snapkv", budget=96, chunk=64, decode_interval=16) as eng:
        msgs = []
        rss, kv = [], []
        for turn in range(150):
            msgs.append({"role": "user", "content": f"Turn {turn}: repeat the number {turn * 7}."})
            res = eng.generate(messages=msgs, max_tokens=8, temperature=0, keep_history=True)
            assert res.text.strip(), f"turn {turn} gave no answer"
            msgs.append({"role": "assistant", "content": res.text})
            if turn in (20, 149):
                rss.append(_rss_bytes())
                kv.append(res.kv_bytes_allocated)
        assert eng.n_past > 3000                      # far past the budget (and past chunk + working set)
        assert eng.kv_tokens_kept() <= 96 + 16
        assert kv[0] == kv[1]
        assert rss[1] - rss[0] < 24 * 2**20, rss      # no growth beyond noise
        assert str(149 * 7) in res.text               # the latest turn still answers about itself


@pytest.mark.parametrize("policy,budget,args,prefill", [
    ("full", None, {}, None), ("snapkv", 64, {}, None), ("snapkv", 64, {"replay": "true"}, None),
    ("snapkv", 64, {}, 0), ("kvzip", 64, {"replay_chunk": "64"}, 0)])
def test_an_interrupted_or_failed_turn_is_rolled_back(model_path, policy, budget, args, prefill):
    """Stopping (or failing) while a prompt is read leaves the cache and the conversation as before the turn:
    the turn is cut from the cache when nothing was compressed meanwhile (a turn inside the prefill working
    set); with prefill budget 0 (a compression after every chunk, which may drop earlier tokens for the turn's
    sake) the cache is emptied instead and the next turn reads the conversation again. Either way the next turn
    knows what the earlier one said."""
    from localkv.errors import Interrupted
    kw = {} if prefill is None else {"prefill_budget": prefill}
    with make_engine(model_path, policy=policy, budget=budget, policy_args=args, chunk=32, **kw) as eng:
        msgs = [{"role": "user", "content": "Remember this: the locker code is 4417. Reply OK."}]
        first = eng.generate(messages=msgs, max_tokens=6, temperature=0, keep_history=True)
        msgs.append({"role": "assistant", "content": first.text})
        before = (eng.n_past, eng.history_text, eng.kv_tokens_per_head().tolist())
        cut = prefill is None  # nothing compressed during the turn: cut out exactly
        after = before[:2] if cut else (0, "")
        long_turn = msgs + [{"role": "user", "content": " ".join(f"Note {i}: the tide was low." for i in range(40))}]
        asked = []
        with pytest.raises(Interrupted):
            eng.generate(messages=long_turn, max_tokens=4, temperature=0, keep_history=True,
                         should_stop=lambda: len(asked) > 5 or asked.append(1))
        assert len(asked) == 6  # it stopped at the sixth check, between chunks, not at the end
        assert (eng.n_past, eng.history_text) == after
        if cut:
            assert eng.kv_tokens_per_head().tolist() == before[2]
        else:
            assert eng.kv_tokens_per_head().max() == 0

        def broken():
            raise RuntimeError("a failure half-way")
        with pytest.raises(RuntimeError):
            eng.generate(messages=long_turn, max_tokens=4, temperature=0, keep_history=True, should_stop=broken)
        assert (eng.n_past, eng.history_text) == after
        # a reply stopped while decoding is forgotten on request
        shown = []
        res = eng.generate(messages=msgs + [{"role": "user", "content": "Count to ten."}], max_tokens=30,
                           temperature=0, keep_history=True, on_text=shown.append, should_stop=lambda: len(shown) >= 3)
        assert res.stop_reason == "interrupted"
        eng.rollback_turn()
        assert (eng.n_past, eng.history_text) == after
        res = eng.generate(messages=msgs + [{"role": "user", "content": "What is the locker code?"}], max_tokens=12,
                           temperature=0, keep_history=True)
        assert (res.prompt_tokens < 30) == cut  # only the new turn was fed, or the conversation was read again
        assert "4417" in res.text
