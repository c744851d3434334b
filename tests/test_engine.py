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
