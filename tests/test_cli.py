"""The `localkv` command as a user runs it: answers, JSON, and bad input as one line with a non-zero exit."""
import json
import os
import subprocess
import sys

import pytest


def run(*args, stdin=None, timeout=300):
    env = dict(os.environ, COLUMNS="200")
    p = subprocess.run([sys.executable, "-m", "localkv.cli", *args], input=stdin, capture_output=True,
                       text=True, timeout=timeout, env=env)
    return p.returncode, p.stdout, p.stderr


def assert_one_line_error(rc, out, err, match):
    assert rc != 0
    assert "Traceback" not in err and "Traceback" not in out
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error:"), err
    assert match in lines[0], err


@pytest.fixture
def tmpfile(tmp_path):
    def make(name, data: bytes):
        p = tmp_path / name
        p.write_bytes(data)
        return str(p)
    return make


@pytest.mark.model  # no model, but the command loads the patched library before it checks
def test_missing_model_file():
    assert_one_line_error(*run("generate", "hi", "--model", "/nonexistent/model.gguf"), "does not exist")


@pytest.mark.model
def test_empty_and_non_gguf_and_truncated_model_files(tmpfile, model_path):
    assert_one_line_error(*run("generate", "hi", "--model", tmpfile("empty.gguf", b"")), "empty")
    assert_one_line_error(*run("generate", "hi", "--model", tmpfile("text.gguf", b"hello world" * 100)), "GGUF")
    with open(model_path, "rb") as f:
        head = f.read(4 << 20)
    assert_one_line_error(*run("generate", "hi", "--model", tmpfile("cut.gguf", head)), "truncated")


def test_unknown_registry_model():
    rc, out, err = run("models", "path", "no-such-model")
    assert_one_line_error(rc, out, err, "qwen2.5-coder-0.5b-instruct-q4_k_m")


@pytest.mark.model
def test_unknown_policy_and_arguments():
    assert_one_line_error(*run("generate", "hi", "--policy", "magic", "--budget", "64"), "unknown policy")
    assert_one_line_error(*run("generate", "hi", "--policy", "snapkv", "--budget", "64", "--policy-arg", "nope=1"),
                          "no argument 'nope'")
    assert_one_line_error(*run("generate", "hi", "--policy", "snapkv", "--budget", "64", "--policy-arg", "window"),
                          "NAME=VALUE")
    assert_one_line_error(*run("generate", "hi", "--policy", "snapkv"), "needs --budget")
    assert_one_line_error(*run("generate", "hi", "--budget", "64"), "compressing policy")


@pytest.mark.model
def test_budget_out_of_range():
    assert_one_line_error(*run("generate", "hi", "--policy", "ahakv", "--budget", "8"), "smaller than")
    assert_one_line_error(*run("generate", "hi", "--policy", "snapkv", "--budget", "100000"), "larger than the context")


@pytest.mark.model
def test_prompt_longer_than_context_with_full():
    assert_one_line_error(*run("generate", "word " * 300, "--ctx", "128", "--max-tokens", "2"), "raise --ctx")


def test_non_utf8_prompt_file(tmpfile):
    assert_one_line_error(*run("generate", "--prompt-file", tmpfile("p.txt", b"caf\xe9 \xff\xfe")), "not UTF-8")
    assert_one_line_error(*run("generate", "--prompt-file", "/nonexistent.txt"), "cannot read")


@pytest.mark.model  # no model, but the command loads the patched library before it checks
def test_unknown_cache_type():
    assert_one_line_error(*run("generate", "hi", "--cache-type-k", "q3_9"), "unknown KV cache type")


@pytest.mark.model
def test_memory_plot_needs_png(tmp_path):
    assert_one_line_error(*run("memory", "--ctx", "256", "--plot", str(tmp_path / "x.txt")), ".png")


@pytest.mark.model
def test_generate_answers_and_json_is_complete():
    rc, out, err = run("generate", "What is the capital of France?", "--temperature", "0", "--max-tokens", "16")
    assert rc == 0 and "Paris" in out
    rc, out, err = run("generate", "What is the capital of France?", "--temperature", "0", "--max-tokens", "8",
                       "--policy", "snapkv", "--budget", "64", "--json")
    assert rc == 0, err
    data = json.loads(out)
    for key in ("text", "policy", "budget", "prompt_tokens", "generated_tokens", "prefill_tokens_per_s",
                "decode_tokens_per_s", "kv_bytes_allocated", "kv_bytes_full_f16", "peak_rss_bytes"):
        assert key in data
    assert data["policy"] == "snapkv" and data["budget"] == 64


@pytest.mark.model
def test_memory_report_and_plot(tmp_path):
    png = tmp_path / "mem.png"
    rc, out, err = run("memory", "--policy", "pyramidkv", "--budget", "128", "--ctx", "2048", "--json",
                       "--plot", str(png))
    assert rc == 0, err
    rep = json.loads(out)
    assert rep["kv_bytes_allocated"] == sum(l["k_bytes"] + l["v_bytes"] for l in rep["layers"])
    assert rep["kv_bytes_full_f16"] == 24 * 2 * 64 * 2 * 2 * 2048
    assert rep["layers"][0]["capacity"] > rep["layers"][-1]["capacity"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rc, out, err = run("memory", "--compare", "--budget", "128", "--ctx", "2048", "--json")
    assert rc == 0, err
    reports = {r["policy"]: r for r in json.loads(out)}
    assert set(reports) >= {"full", "snapkv", "ahakv", "pyramidkv", "h2o", "streamingllm"}
    assert reports["snapkv"]["kv_bytes_allocated"] < reports["full"]["kv_bytes_allocated"] / 3


@pytest.mark.model
def test_piped_chat_keeps_history_and_saves(tmp_path):
    save = tmp_path / "chat.json"
    script = f"My name is Ada.\nWhat is my name?\n/save {save}\n/exit\n"
    rc, out, err = run("chat", "--temperature", "0", "--max-tokens", "24", stdin=script)
    assert rc == 0, err
    assert "Ada" in out.split("\n", 1)[-1]
    msgs = json.loads(save.read_text())["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant"]


@pytest.mark.model
def test_piped_chat_joins_a_quoted_block_and_reads_files(tmp_path):
    note = tmp_path / "note.txt"
    note.write_text("Meeting moved to room 42.\nBring the slides.\n")
    save = tmp_path / "chat.json"
    script = ('"""\nMy cat is called Miso.\nShe is four years old.\n"""\n'
              f"/file {note} Which room?\n/save {save}\n")
    rc, out, err = run("chat", "--temperature", "0", "--max-tokens", "16", stdin=script)
    assert rc == 0, err
    msgs = json.loads(save.read_text())["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant"] * 2
    assert msgs[0]["content"] == "My cat is called Miso.\nShe is four years old."
    assert msgs[2]["content"].startswith("Meeting moved to room 42.") and msgs[2]["content"].endswith("Which room?")
    assert "42" in msgs[3]["content"]
    assert "reading the prompt" not in err  # no progress line in a pipe


@pytest.mark.model
def test_corrupted_saved_chat_is_refused(tmpfile):
    bad = tmpfile("bad.json", b"{not json")
    rc, out, err = run("chat", stdin=f"/load {bad}\n")
    assert_one_line_error(rc, out, err, "not a saved conversation")


@pytest.mark.model  # no model, but the command loads the patched library before it checks
def test_bench_commands_resume_from_finished_results(tmp_path):
    """With every configuration already in the results file, the commands only render (no model needed)."""
    from localkv.bench import common
    base_q = {"bench": "quality", "model": None, "task": "passkey", "setting": "aware", "samples": 1, "seed": 0,
              "chunk": 256, "ctk": "f16", "ctv": "f16"}
    for cfg in common.grid(["full", "snapkv"], [128], [1024], base_q):
        cfg["policy_args"] = {}
        common.append_result(tmp_path / "quality.jsonl", {"config": cfg, "result": {"accuracy": 0.5}})
    rc, out, err = run("bench", "quality", "--policies", "full,snapkv", "--budgets", "128", "--lengths", "1024",
                       "--tasks", "passkey", "--settings", "aware", "--samples", "1", "--anchors", "",
                       "--out", str(tmp_path), "--markdown")
    assert rc == 0, err
    assert "| passkey | 1024 | aware | snapkv | 0.50 |" in out
    base_s = {"bench": "speed", "model": None, "decode": 64, "chunk": 256, "ctk": "f16", "ctv": "f16"}
    x = {"prefill_tokens_per_s": 100.0, "decode_tokens_per_s": 20.0, "kv_bytes_allocated": 2**20,
         "kv_bytes_full_f16": 2**21, "kv_stats_bytes": 0, "compute_bytes": 0, "peak_rss_bytes": 2**29,
         "compress_s_total": 0.1}
    for cfg in common.grid(["full", "snapkv"], [128], [1024], base_s, None, True):
        common.append_result(tmp_path / "speed.jsonl", {"config": cfg, "result": x})
    rc, out, err = run("bench", "speed", "--policies", "full,snapkv", "--budgets", "128", "--lengths", "1024",
                       "--out", str(tmp_path), "--markdown")
    assert rc == 0, err
    assert "| 1024 | snapkv | 128 | 100 | 20.0 |" in out
    # a variant is its own run, with its replay seconds
    cfg = {**base_s, "policy": "snapkv", "budget": 128, "length": 1024, "prefill_budget": None,
           "policy_args": {"replay": "true"}}
    common.append_result(tmp_path / "speed.jsonl", {"config": cfg, "result": {**x, "replay_s": 4.25,
                                                                              "replay_tokens": 1100}})
    rc, out, err = run("bench", "speed", "--policies", "snapkv:replay=true", "--budgets", "128", "--lengths", "1024",
                       "--out", str(tmp_path), "--markdown")
    assert rc == 0, err
    row = next(l for l in out.splitlines() if l.startswith("| 1024 | snapkv (replay=true) | 128 |"))
    assert row.rstrip().endswith("| 4.2 |")
    rc, out, err = run("bench", "quality", "--tasks", "nope")
    assert_one_line_error(rc, out, err, "unknown task")
    # refused before anything runs: no worker starts, no results file appears
    fresh = str(tmp_path / "untouched")
    assert_one_line_error(*run("bench", "quality", "--grid", "huge", "--out", fresh), "unknown grid")
    assert_one_line_error(*run("bench", "quality", "--anchors", "q3_x", "--out", fresh), "unknown KV cache type")
    assert_one_line_error(*run("bench", "kl", "--anchors", "q3_x", "--out", fresh), "unknown KV cache type")
    assert_one_line_error(*run("bench", "quality", "--kvpress", "ahakv", "--out", fresh),
                          "kvpress has no press for 'ahakv'")
    assert_one_line_error(*run("bench", "kl", "--policies", "snapkv,nope", "--out", fresh), "unknown policy 'nope'")
    assert not (tmp_path / "untouched").exists()


@pytest.mark.model
def test_gpu_layers_option():
    """--gpu-layers on every command that loads a model: a bad count is one line; 0 (none) runs on the CPU."""
    assert_one_line_error(*run("generate", "hi", "--gpu-layers", "-3"), "--gpu-layers")
    assert_one_line_error(*run("memory", "--gpu-layers", "-2"), "--gpu-layers")
    assert_one_line_error(*run("bench", "speed", "--gpu-layers", "-2", "--lengths", "64"), "--gpu-layers")
    for cmd in ("generate", "chat", "serve", "memory"):
        rc, out, _err = run(cmd, "--help")
        assert rc == 0 and "--gpu-layers" in out
    rc, out, err = run("generate", "What is 2+2? Answer with a number.", "--gpu-layers", "0", "--policy", "snapkv",
                       "--budget", "64", "--max-tokens", "8", "--temperature", "0", "--json")
    assert rc == 0, err
    assert "4" in json.loads(out)["text"]


@pytest.mark.model
def test_calibrate_show_reads_the_shipped_profile_and_plots(tmp_path):
    png = tmp_path / "heads.png"
    rc, out, err = run("calibrate", "--show", "--budget", "128", "--plot", str(png))
    assert rc == 0, err
    assert "INFsc" in out and "profile" in out and png.stat().st_size > 10_000
    rc, out, err = run("calibrate", "--show", "--json")
    prof = json.loads(out)
    assert prof["kind"] == "surfacelogickv" and len(prof["surface"]) == 24 and len(prof["surface"][0]) == 14
    rc, out, err = run("calibrate", "--policy", "kvzap", "--show")
    assert rc == 0, err
    assert "test R" in out and "rank correlation" in out and "kvzap-" in out
    rc, out, err = run("calibrate", "--policy", "kvzap", "--show", "--json")
    prof = json.loads(out)
    assert prof["kind"] == "kvzap" and prof["n_layer"] == 24 and "weights" not in prof and prof["test_r2"] > 0.5


@pytest.mark.model  # no model, but the command loads the patched library before it checks
def test_calibrate_bad_input():
    assert_one_line_error(*run("calibrate", "--policy", "snapkv"), "kvzap only")
    assert_one_line_error(*run("calibrate", "--policy", "kvzap", "--probes", "3"), "at least 7")
    assert_one_line_error(*run("calibrate", "--policy", "kvzap", "--plot", "fit.png"), "kvzap's fit is a table")
    assert_one_line_error(*run("calibrate", "--show", "--plot", "heads.txt"), "PNG")
    assert_one_line_error(*run("calibrate", "--probes", "0"), "at least 1")
    assert_one_line_error(*run("generate", "hi", "-p", "snapkv", "-b", "64", "--policy-arg", "adaptive=maybe"),
                          "not a valid bool")


@pytest.mark.model
def test_memory_shows_uneven_heads_for_surfacelogickv(tmp_path):
    png = tmp_path / "mem.png"
    rc, out, err = run("memory", "--policy", "surfacelogickv", "--budget", "128", "--json")
    rep = json.loads(out)
    heads = [c for lm in rep["layers"] for c in lm["head_capacities"]]
    assert sum(heads) == 128 * 48 and len(set(heads)) > 5
    rc, out, err = run("memory", "--policy", "surfacelogickv", "--budget", "128", "--plot", str(png))
    assert rc == 0, err
    assert "tokens per KV head" in out and "6144 in all = 128 per KV head" in out
    for lm in rep["layers"]:  # every layer's row lists its heads' capacities
        assert " ".join(map(str, lm["head_capacities"])) in out
    assert png.stat().st_size > 10_000



def test_a_conversation_compresses_with_kvzap_given_a_budget_alone():
    from localkv.cli import CONVERSATION_POLICY, conversation_policy
    assert CONVERSATION_POLICY == "kvzap"
    assert conversation_policy(None, 512) == "kvzap"
    assert conversation_policy(None, None) == "full"
    assert conversation_policy("snapkv", 512) == "snapkv"
