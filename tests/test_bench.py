"""Bench plumbing without a model: seeded tasks, scoring, resumable results, the README section."""
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


def test_readme_section_is_regenerated_from_results(tmp_path):
    from localkv.bench import readme
    res = tmp_path / "results"
    res.mkdir()
    rec = {"config": {"bench": "kl", "policy": "snapkv", "budget": 128, "length": 2048, "model": None},
           "result": {"kl_mean": 0.01, "kl_p99": 0.2, "ppl": 3.0, "ppl_full": 2.9, "top1_agree": 0.95},
           "date": "2026-11-23"}
    (res / "kl.jsonl").write_text(json.dumps(rec) + "\n")
    md = tmp_path / "README.md"
    md.write_text(f"# x\n\n{readme.BEGIN}\nold\n{readme.END}\n\ntail\n")
    readme.update_readme(md, res)
    text = md.read_text()
    assert "old" not in text and "tail" in text
    assert "| 2048 | snapkv | 128 | 0.0100 |" in text
    assert "2026-11-23" in text
