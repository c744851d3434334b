"""Bench plumbing without a model: seeded tasks, scoring, resumable results, the results document."""
import json

import pytest

from localkv.bench import common, tasks


def fake_tokenize(text):
    return text.split()  # one token per word is enough to size documents


@pytest.mark.parametrize("task", tasks.TASKS)
def test_tasks_are_seeded_sized_and_answerable(task):
    a = tasks.make_sample(task, 1500, 0.3, 7, fake_tokenize)
    b = tasks.make_sample(task, 1500, 0.3, 7, fake_tokenize)
    c = tasks.make_sample(task, 1500, 0.3, 8, fake_tokenize)
    assert a == b                                   # same seed, same sample
    assert a.context != c.context                   # another seed, another sample
    n = len(fake_tokenize(a.context))
    assert 1000 <= n <= 1700                        # sized with the tokenizer
    for e in a.expected:
        if task not in ("cwe", "fwe"):
            assert e in a.context                   # the answer is in the document
    assert a.score(" ".join(a.expected)) == 1.0
    assert a.score("nothing useful") == 0.0


def test_needle_depth_is_respected():
    early = tasks.make_sample("niah_single", 2000, 0.05, 1, fake_tokenize)
    late = tasks.make_sample("niah_single", 2000, 0.95, 1, fake_tokenize)
    pos = lambda s: s.context.index(s.expected[0]) / len(s.context)  # noqa: E731
    assert pos(early) < 0.15 and pos(late) > 0.85


def test_frequent_words_answer_is_really_most_frequent():
    s = tasks.make_sample("fwe", 1200, 0.5, 3, fake_tokenize)
    words = s.context.split(". ", 1)[1].split()
    counts = {w: words.count(w) for w in set(words)}
    top = sorted(counts, key=lambda w: -counts[w])[:3]
    assert set(top) == set(s.expected)


def test_results_resume_and_survive_a_torn_line(tmp_path):
    path = tmp_path / "r.jsonl"
    cfg1, cfg2 = {"policy": "a", "budget": 1}, {"policy": "b", "budget": 2}
    common.append_result(path, {"config": cfg1, "result": {"x": 1}})
    with open(path, "a") as f:
        f.write('{"config": {"policy": "b", "bud')  # a crash mid-write
    assert list(common.load_results(path)) == [common.config_key(cfg1)]
    common.append_result(path, {"config": cfg2, "result": {"x": 2}})
    done = common.load_results(path)
    assert set(done) == {common.config_key(cfg1), common.config_key(cfg2)}
    assert done[common.config_key(cfg2)]["result"] == {"x": 2}


def test_grid_runs_full_once_per_length():
    cfgs = common.grid(["full", "snapkv"], [128, 4096], [1024, 8192], {"bench": "x"}, None, budget_below_length=True)
    assert [(c["policy"], c["budget"], c["length"]) for c in cfgs] == [
        ("full", None, 1024), ("snapkv", 128, 1024), ("full", None, 8192), ("snapkv", 128, 8192),
        ("snapkv", 4096, 8192)]


def _kl_record(policy="snapkv", date="2026-11-23", **extra):
    return {"config": {"bench": "kl", "policy": policy, "budget": 128, "length": 2048, "model": None},
            "result": {"kl_mean": 0.01, "kl_p99": 0.2, "ppl": 3.0, "ppl_full": 2.9, "top1_agree": 0.95},
            "date": date, **extra}


def test_results_doc_section_is_regenerated_from_results(tmp_path):
    from localkv.bench import results_doc
    res = tmp_path / "bench" / "results"
    res.mkdir(parents=True)
    (res / "kl.jsonl").write_text(json.dumps(_kl_record()) + "\n")
    (res / "speed.jsonl").write_text(json.dumps({
        "config": {"bench": "speed", "policy": "full", "budget": None, "length": 1024, "model": None},
        "result": {"prefill_tokens_per_s": 200.0, "decode_tokens_per_s": 40.0, "kv_bytes_allocated": 2**20,
                   "kv_bytes_full_f16": 2**20, "kv_stats_bytes": 0, "compute_bytes": 0, "peak_rss_bytes": 2**20,
                   "compress_s_total": 0.0},
        "date": "2026-11-23", "machine": "Some CPU, 2 cores"}) + "\n")
    doc = tmp_path / "docs" / "results.md"
    doc.parent.mkdir()
    doc.write_text(f"# x\n\n{results_doc.BEGIN}\nold\n{results_doc.END}\n\ntail\n")
    results_doc.update_doc(doc, res)
    text = doc.read_text()
    assert "old" not in text and "tail" in text
    assert "| 2048 | snapkv | 128 | 0.0100 |" in text
    assert "_Measured 2026-11-23 (machine not recorded);" in text    # an old result: never today's machine
    assert "_Measured 2026-11-23 on Some CPU, 2 cores;" in text      # a new one: the machine it recorded
    assert "](../bench/results/decode.png)" in text                  # links resolve from the document's folder
    assert (res / "decode.png").exists()


def test_rows_from_different_machines_get_a_table_each():
    from localkv.bench import results_doc
    from localkv.bench.report import kl_table
    recs = [_kl_record("snapkv", machine="A, 2 cores"), _kl_record("h2o", "2026-11-24", machine="B, 16 cores"),
            _kl_record("full", "2026-11-25")]
    parts = results_doc._tables(kl_table, recs)
    assert [p.splitlines()[0] for p in parts[::2]] == [
        "_Measured 2026-11-23 on A, 2 cores; model: default model (qwen2.5-coder-0.5b-instruct-q4_k_m)._",
        "_Measured 2026-11-24 on B, 16 cores; model: default model (qwen2.5-coder-0.5b-instruct-q4_k_m)._",
        "_Measured 2026-11-25 (machine not recorded); model: default model (qwen2.5-coder-0.5b-instruct-q4_k_m)._"]
    assert ["| 2048 | snapkv |" in parts[1], "| 2048 | h2o |" in parts[3], "| 2048 | full |" in parts[5]] == [True] * 3


def test_each_result_records_the_machine_it_ran_on(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "run_worker", lambda module, cfg: {"x": 1})
    monkeypatch.setattr(common, "machine_note", lambda: "Some CPU, 2 cores")
    out = tmp_path / "r.jsonl"
    common.run_grid("speed", [{"policy": "a", "budget": 1}], out, progress=False)
    (rec,) = common.load_results(out).values()
    assert rec["machine"] == "Some CPU, 2 cores" and rec["result"] == {"x": 1}


def test_quality_grid_adds_quantized_and_kvpress_anchors():
    from localkv.bench.quality import quality_configs
    base = {"bench": "quality", "model": None, "samples": 2, "seed": 0, "chunk": 256, "ctk": "f16", "ctv": "f16"}
    cfgs = quality_configs(["full", "snapkv"], ["passkey"], ["aware", "twoturn"], [1024, 2048], [128, 512], base,
                           {"span": 8}, None, ["q8_0"], ["full", "snapkv"])
    ours = [c for c in cfgs if "worker" not in c]
    theirs = [c for c in cfgs if "worker" in c]
    # per setting: full once per length, snapkv per budget and length, one q8_0 full per length
    assert len(ours) == 2 * (2 + 4 + 2)
    assert {(c["ctk"], c["length"]) for c in ours if c["ctk"] == "q8_0"} == {("q8_0", 1024), ("q8_0", 2048)}
    assert all(c["policy_args"] == ({} if c["policy"] == "full" else {"span": 8}) for c in ours)
    # kvpress: the aware setting only (its pipeline has no second turn), full once per length
    assert {c["setting"] for c in theirs} == {"aware"}
    assert sorted((c["policy"], c["budget"], c["length"]) for c in theirs) == [
        ("kvpress:full", None, 1024), ("kvpress:full", None, 2048), ("kvpress:snapkv", 128, 1024),
        ("kvpress:snapkv", 128, 2048), ("kvpress:snapkv", 512, 1024), ("kvpress:snapkv", 512, 2048)]
    assert len({common.config_key(c) for c in cfgs}) == len(cfgs)


@pytest.mark.parametrize("n", [129, 200, 1024, 1976, 8191, 16384])
def test_kvpress_ratio_keeps_exactly_the_budget(n):
    from localkv.bench.kvpress_anchor import compression_ratio
    for budget in (1, 64, 128, 512, 1024, 2048):
        r = compression_ratio(budget, n)
        assert 0.0 <= r < 1.0
        assert int(n * (1 - r)) == min(budget, n)  # kvpress's own rounding of the tokens it keeps


def test_kvpress_table_pairs_each_press_with_our_policy():
    from rich.console import Console
    import io
    from localkv.bench.report import kvpress_table

    def rec(policy, budget, acc, kv):
        return {"config": {"task": "passkey", "length": 2048, "setting": "aware", "policy": policy,
                           "budget": budget, "ctk": "f16"},
                "result": {"accuracy": acc, "samples": [{"kv_bytes_allocated": kv}]}}
    buf = io.StringIO()
    kvpress_table([rec("snapkv", 128, 1.0, 2**20), rec("kvpress:snapkv", 128, 0.5, 3 * 2**20),
                   rec("ahakv", 128, 1.0, 2**20)], Console(file=buf, width=300), markdown=True)
    rows = [l for l in buf.getvalue().splitlines() if l.startswith("| passkey")]
    assert rows == ["| passkey | 2048 | aware | snapkv | 128 | 1.00 | 0.50 | 1.0 | 3.0 |"]


def test_kvpress_table_counts_what_a_masking_press_keeps_and_lists_presses_without_a_policy():
    from rich.console import Console
    import io
    from localkv.bench.report import kvpress_table

    def rec(policy, acc, sample):
        return {"config": {"task": "passkey", "length": 2048, "setting": "agnostic", "policy": policy,
                           "budget": 256, "ctk": "f16"}, "result": {"accuracy": acc, "samples": [sample]}}
    buf = io.StringIO()
    kvpress_table([rec("kvzip", 1.0, {"kv_bytes_allocated": 2**20}),
                   rec("kvpress:kvzip", 0.5, {"kv_bytes_allocated": 8 * 2**20, "kv_bytes_kept": 2 * 2**20}),
                   rec("kvpress:keydiff", 0.0, {"kv_bytes_allocated": 2**21})], Console(file=buf, width=300),
                  markdown=True)
    rows = [l for l in buf.getvalue().splitlines() if l.startswith("| passkey")]
    assert rows == ["| passkey | 2048 | agnostic | keydiff | 256 | - | 0.00 | - | 2.0 |",
                    "| passkey | 2048 | agnostic | kvzip | 256 | 1.00 | 0.50 | 1.0 | 2.0 |"]


def test_kvpress_presses_wrap_and_masked_entries_are_not_counted():
    from types import SimpleNamespace as NS
    import numpy as np
    from localkv.bench.kvpress_anchor import PRESSES, _entries, make_press

    class Press:
        def __init__(self, inner=None, compression_ratio=None):
            self.inner, self.compression_ratio = inner, compression_ratio
    fake = NS(KVzipPress=Press, KeyDiffPress=Press, AdaKVPress=Press, ExpectedAttentionPress=Press)
    ada = make_press(fake, "adakv-expected", 0.75)
    assert ada.inner.compression_ratio == 0.75 and ada.compression_ratio is None  # AdaKV wraps the scorer
    assert make_press(fake, "kvzip", 0.5).compression_ratio == 0.5
    assert set(PRESSES) >= {"kvzip", "keydiff", "adakv-expected"}
    # two layers of [batch 1, 2 KV heads, 10 tokens]; the second masks 3 entries
    cache = NS(layers=[NS(keys=np.zeros((1, 2, 10, 4))), NS(keys=np.zeros((1, 2, 10, 4)))])
    model = NS(model=NS(layers=[NS(self_attn=NS()),
                                NS(self_attn=NS(masked_key_indices=([0, 0, 0], [0, 1, 1], [3, 4, 5])))]))
    assert _entries(model, cache) == (40 - 3, 40)


@pytest.mark.parametrize("task", ["niah_multikey", "passkey", "fact_code"])
def test_chat_setting_tells_the_whole_document_over_turns(task):
    from localkv.bench.quality import CHAT_OPENERS, CHAT_TURNS, chat_turns
    s = tasks.make_sample(task, 1500, 0.3, 7, fake_tokenize)
    turns = chat_turns(s.context)
    assert len(turns) == CHAT_TURNS
    bodies = []
    for turn, opener in zip(turns, CHAT_OPENERS):
        assert turn.startswith(opener + " ")
        bodies.append(turn[len(opener) + 1:])
    assert " ".join(bodies).split() == s.context.split()  # all of it, in order, nothing added
    for fact in s.expected:  # every needle is told, in exactly one turn
        assert sum(fact in t for t in turns) == 1
    assert max(map(len, bodies)) < 2 * min(map(len, bodies))  # about equal parts


def test_fact_family_expands_and_detects_broken_facts():
    assert tasks.expand_tasks(["facts", "fact_code", "passkey"]) == list(tasks.FACT_TASKS) + ["passkey"]
    with pytest.raises(ValueError, match="unknown task 'fact_zip'"):
        tasks.expand_tasks(["fact_zip"])
    kinds = set()
    for task in tasks.FACT_TASKS:
        for seed in range(3):
            s = tasks.make_sample(task, 1500, 0.5, seed, fake_tokenize)
            fact = s.expected[0]
            kinds.add(s.meta["kind"])
            assert s.context.count(fact) == 1 and s.answer_prefix == ""
            assert s.meta["people"] >= 3
            # the asked person's fact is told once; the other people have different facts
            assert s.score(f"It is {fact}.") == 1.0 and not s.partial(f"It is {fact}.")
            cut = fact[:-2]                      # a fact that lost its tail comes back broken
            assert s.score(cut) == 0.0 and s.partial(cut)
            other = s.meta["facts"][1]           # another person's fact is wrong, not broken
            assert s.score(other) == 0.0 and not s.partial(other)
    assert kinds == {"code", "date", "version", "uuid", "path", "ident"}
    code = tasks.Sample("fact_code", "", "", "", ["cobalt-7391"])
    assert code.partial("Maria's code is cobalt-71.") and not code.partial("I do not know.")
    version = tasks.Sample("fact_version", "", "", "", ["v8.40.49"])
    assert version.partial("It is v8.") and not version.partial("It is v1.0.0.")
