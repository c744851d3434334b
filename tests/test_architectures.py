"""The compressed cache on every common attention shape, with small random-weight GGUFs written at test time.

localkv.synthetic writes each model (a few MB) in the shape of a real one: Llama 3 and Mistral (32 query / 8 KV
heads, head dim 128), Qwen2 (14 / 2, biases), Qwen3 (8 KV heads, dim 128, QK-norm), Phi-3 (as many KV heads as
query heads, dim 96, fused qkv). For each: before any eviction the logits are the plain cache's bit for bit and
greedy output equals the full cache's; allocated bytes are the slots' bytes; the tokens SnapKV keeps are those a
NumPy reference picks from the Q and K dumped from the same pass, per KV head, and so are AdaKV-style ragged
counts. Shapes the cache cannot take are refused in one line.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import make_engine, raw_decode
from graph_dump import GraphDump
from localkv import capi
from localkv.policies.base import max_pool
from localkv.synthetic import SHAPES, write_random_model
from test_surfacelogickv import ref_adaptive

pytestmark = pytest.mark.model

COMPRESSED = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3", "gpt-oss"]
TEXT = ("Ships left the harbour at dawn; the keeper logged each one by name. By noon the wind turned, "
        "and nine boats came back to shelter behind the old stone pier before the storm.")


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    made = {}

    def get(name):
        if name not in made:
            made[name] = str(write_random_model(tmp_path_factory.mktemp("models") / f"{name}.gguf", name))
        return made[name]
    return get


def _logits(eng):
    return np.ctypeslib.as_array(capi.llama_cpp.llama_get_logits(eng.ctx), shape=(eng.shape.n_vocab,)).copy()


@pytest.mark.parametrize("name", COMPRESSED)
def test_before_any_eviction_the_logits_and_replies_are_upstreams(model_file, name):
    path = model_file(name)
    logits, texts = [], []
    for kw in ({}, {"policy": "snapkv", "budget": 512}):
        with make_engine(path, chunk=256, ctx=1024, flash_attn=True, **kw) as eng:
            tokens = eng.model.tokenize(TEXT)
            raw_decode(eng, tokens[:64])
            raw_decode(eng, tokens[64:], logits=True)
            logits.append(_logits(eng))
            eng.reset()
            texts.append(eng.generate(TEXT, max_tokens=24, temperature=0, chat=False, ignore_eos=True).text)
    assert np.array_equal(logits[0], logits[1])
    assert texts[0] == texts[1]


@pytest.mark.parametrize("name", COMPRESSED)
def test_allocated_bytes_are_the_slots_bytes(model_file, name):
    s = SHAPES[name]
    with make_engine(model_file(name), policy="pyramidkv", budget=64, chunk=64, prefill_budget=0) as eng:
        eng.feed(eng.model.tokenize(TEXT))
        _cap, alloc, used = capi.cache_state(eng.ctx)
        n_cached = s.n_layer - (s.n_layer - s.n_layer // s.swa_pattern if s.sliding_window else 0)
        assert len(eng.kv_layers) == n_cached and len(alloc) == n_cached * s.n_head_kv
        per_slot = s.head_dim * 2 * 2  # K and V rows of one head, f16
        # a windowed layer holds its window and a ubatch, padded to 256 cells as upstream does
        windowed = capi.windowed_layers(eng.ctx)
        assert len(windowed) == s.n_layer - n_cached
        cells = -(-(s.sliding_window + eng.n_batch) // 256) * 256
        assert all(w[1] == cells and w[2] == w[3] == cells * s.n_head_kv * s.head_dim * 2 for w in windowed)
        assert capi.memory_bytes(eng.ctx) == int(alloc.sum()) * per_slot + sum(w[2] + w[3] for w in windowed)
        assert used.tolist() == [min(c, eng.n_past) for c in eng.head_capacities]
        assert sum(eng.capacities) == 64 * n_cached


# llama.cpp's Phi-3 graph scales Q by 1/sqrt(head_dim) before attention (its last "Qcur") and attends with scale 1
Q_PRESCALED = {"phi3"}


def _snapkv_scores(q, k, group, n, scale, window=32, kernel=7):
    """SnapKV from the paper: softmax attention of the last `window` queries (causal), summed over the queries and
    the KV group's query heads, max-pooled; the window itself is always kept. q [n, H, d], k [n, Hkv, d]."""
    n_head_kv = k.shape[1]
    att = np.zeros((q.shape[1], n))
    for i in range(n - window, n):
        for h in range(q.shape[1]):
            x = k[:i + 1, h // group] @ q[i, h] * scale
            e = np.exp(x - x.max())
            att[h, :i + 1] += e / e.sum()
    score = max_pool(att.reshape(n_head_kv, group, n).sum(1), kernel)
    return np.where(np.arange(n) >= n - window, np.inf, score)


@pytest.mark.parametrize("name,adaptive", [(n, False) for n in COMPRESSED] + [("llama", True), ("qwen3", True)])
def test_kept_tokens_are_the_numpy_references(model_file, name, adaptive):
    s = SHAPES[name]
    group = s.n_head // s.n_head_kv
    dump = GraphDump({f"{t}cur-{il}" for t in "QK" for il in range(s.n_layer)}, head_dim=s.head_dim)
    chosen = {}
    budget = 48
    args = {"whole_words": "false", "adaptive": str(adaptive).lower()}
    with make_engine(model_file(name), policy="snapkv", budget=budget, chunk=256, eval_callback=dump.callback,
                     policy_args=args) as eng:
        orig_keep = capi.keep

        def record(ctx, i, slots):
            chosen.setdefault(i, [np.asarray(x) for x in slots])
            orig_keep(ctx, i, slots)
        capi.keep = record
        try:
            tokens = eng.model.tokenize(TEXT)
            assert budget < len(tokens) <= 256
            eng.feed(tokens)  # one chunk, then the compression
            dump.end_pass()
        finally:
            capi.keep = orig_keep
        n = len(tokens)
        cached = [il for il, _k, _v in eng.kv_layers]  # the full-attention layers (all but a windowed model's)
        for i, il in [(0, cached[0]), (len(cached) - 1, cached[-1])]:
            q = dump.tensors[f"Qcur-{il}"][0].astype(np.float64)
            k = dump.tensors[f"Kcur-{il}"][0].astype(np.float16).astype(np.float64)  # the cache holds f16 keys
            assert q.shape == (n, s.n_head, s.head_dim) and k.shape == (n, s.n_head_kv, s.head_dim)
            scores = _snapkv_scores(q, k, group, n, 1.0 if name in Q_PRESCALED else 1 / np.sqrt(s.head_dim))
            counts = [budget] * s.n_head_kv
            if adaptive:
                counts = ref_adaptive(scores, [n] * s.n_head_kv, counts, eng.policy.adaptive_floor)
                got_counts = [len(chosen[i][h]) for h in range(s.n_head_kv)]
                assert sum(got_counts) == budget * s.n_head_kv
                assert max(abs(a - b) for a, b in zip(got_counts, counts)) <= 1  # fp noise at the cut
                counts = got_counts
            for h in range(s.n_head_kv):
                got = chosen[i][h]
                want = np.sort(np.argsort(-scores[h], kind="stable")[:counts[h]])
                if not np.array_equal(got, want):  # ties aside: a swapped slot scores as the cut (fp noise)
                    kth = np.sort(scores[h])[::-1][counts[h] - 1]
                    for x in set(got.tolist()) ^ set(want.tolist()):
                        assert abs(scores[h][x] - kth) <= 1e-3 * abs(kth) + 1e-6, f"layer {il} head {h} slot {x}"
        # and the cache holds exactly those slots' positions, per head
        for i in range(len(cached)):
            pos = capi.positions(eng.ctx, i, used=capi.head_state(eng.ctx, i)[2])
            for h in range(s.n_head_kv):
                held = pos[h][pos[h] >= 0]
                assert np.array_equal(np.sort(held), np.sort(chosen[i][h]))  # one chunk: slot = position


@pytest.mark.parametrize("name,why", [("qwen2vl", "multi-position RoPE"), ("mamba", "not a transformer")])
def test_unsupported_shapes_are_refused_in_one_line(model_file, name, why):
    p = subprocess.run([sys.executable, "-m", "localkv.cli", "generate", "hi", "--model", model_file(name),
                        "--policy", "snapkv", "--budget", "64"], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, COLUMNS="300"))
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert len(lines) == 1 and lines[0].startswith("error:") and why in lines[0], p.stderr


def test_windowed_layers_wrap_their_window_as_upstreams_do(model_file):
    """A prompt several windows long (the windowed layers' ring of cells wraps) gives upstream's logits bit for
    bit before any eviction (the same ubatches), and its greedy reply; compressed to a budget, the reply still
    comes, the full-attention layer holds the budget and the windowed layers their window."""
    path = model_file("gemma3")
    text = " ".join(f"Entry {i}: the tide was low and the boats stayed in." for i in range(14))
    logits, replies = [], []
    for kw in ({}, {"policy": "snapkv", "budget": 2048}):
        with make_engine(path, chunk=64, ctx=2048, **kw) as eng:
            tokens = eng.model.tokenize(text)
            assert len(tokens) > 4 * SHAPES["gemma3"].sliding_window
            for i in range(0, len(tokens), 64):
                raw_decode(eng, tokens[i:i + 64], logits=True)
            logits.append(_logits(eng))
            eng.reset()
            replies.append(eng.generate(text, max_tokens=16, temperature=0, chat=False, ignore_eos=True).text)
    assert np.array_equal(logits[0], logits[1])
    assert replies[0] == replies[1]
    with make_engine(path, chunk=64, policy="snapkv", budget=96) as eng:
        res = eng.generate(text, max_tokens=16, temperature=0, chat=False, ignore_eos=True)
        assert res.generated_tokens == 16
        assert eng.kv_tokens_per_head().max() <= 96 + eng.decode_interval
        cells = capi.windowed_layers(eng.ctx)[0][1]
        assert cells == 256  # the window (128) and a ubatch (64), padded as upstream pads it
        assert res.kv_bytes_allocated < eng.full_bytes(eng.n_past, "f16")


def test_a_replay_leaves_the_windowed_layers_as_they_were(model_file):
    """KVzip replays every span of the prompt after reading it: on a sliding-window model its windowed layers are
    set aside for the replay and given back, so with a budget holding the whole prompt the logits stay upstream's
    (within the rounding of other ubatch boundaries) and the greedy reply is the same. Were the replay's tokens
    left in the window, the logits would be another model's."""
    path = model_file("gemma3")
    text = " ".join(f"Entry {i}: the tide was low and the boats stayed in." for i in range(8))
    out = []
    for kw in ({}, {"policy": "kvzip", "budget": 2048, "policy_args": {"replay_chunk": "128"}},
               {"policy": "snapkv", "budget": 2048, "policy_args": {"replay": "true"}}):
        with make_engine(path, chunk=64, ctx=2048, **kw) as eng:
            res = eng.generate(text, max_tokens=12, temperature=0, chat=False, ignore_eos=True)
            assert eng.replays >= (1 if kw else 0) and (kw.get("policy") != "kvzip" or eng.replays >= 2)
            out.append((res.text, _logits(eng)))
    for text_, logits in out[1:]:
        assert text_ == out[0][0]
        np.testing.assert_allclose(logits, out[0][1], atol=2e-2)


def test_a_base_model_completes_text_and_refuses_chat(tmp_path):
    """A model without a chat template (Gemma 3 270M is one): generate completes plain text with a note, the chat
    and the server's chat endpoint refuse it in one line, the server's completions serve it."""
    path = str(write_random_model(tmp_path / "base.gguf", "llama", chat_template=False))
    env = dict(os.environ, COLUMNS="300")
    cli = [sys.executable, "-m", "localkv.cli"]
    p = subprocess.run(cli + ["generate", "hello", "--model", path, "-n", "4", "--temperature", "0"],
                       capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 0 and "no chat template" in p.stderr and "Traceback" not in p.stderr
    p = subprocess.run(cli + ["chat", "--model", path], input="hello\n", capture_output=True, text=True, timeout=120,
                       env=env)
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert p.returncode != 0 and len(lines) == 1 and "no chat template" in lines[0], p.stderr
    from localkv import serve
    srv = serve.Server(path, policy="snapkv", budget=64)
    try:
        srv.warm()
        chat = serve.parse_request({"messages": [{"role": "user", "content": "hi"}]}, "chat", srv.default_key,
                                   srv.model_id, 8)
        with pytest.raises(serve.RequestError, match="no chat template.*completions") as e:
            srv.prepare(chat)
        assert e.value.status == 400
        srv.prepare(serve.parse_request({"prompt": "hi"}, "completion", srv.default_key, srv.model_id, 8))
    finally:
        srv.close()
