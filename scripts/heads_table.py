"""Markdown table of a quality bench: accuracy and KV MiB at rest per policy, budget and length (and setting,
when the file holds more than one: the KVzip table).

    localkv bench quality --policies snapkv,snapkv:adaptive=true,pyramidkv,pyramidkv:adaptive=true,\
surfacelogickv,full --budgets 64,128,256 --lengths 2048,4096 --tasks niah_multikey --settings aware \
--samples 5 --anchors '' --out bench/results/heads
    python scripts/heads_table.py bench/results/heads/quality.jsonl
    python scripts/heads_table.py bench/results/kvzip/quality.jsonl --long

--long prints one row per run instead (task, setting, length, policy, budget, the share of the context that
budget is, accuracy, KV MiB): for files whose budgets differ from one length or setting to the next. A
masking press of kvpress (KVzipPress, AdaKVPress) counts the bytes of the entries it kept.
"""
import json
import sys
from collections import defaultdict

from localkv.bench.report import kept_bytes, label


def _mib(x: dict) -> float:
    return sum(kept_bytes(s) for s in x["samples"]) / len(x["samples"]) / 2**20


def long_table(records: list[dict]) -> None:
    """One row per run, in order of task, setting, length, budget, policy."""
    print("| task | setting | length | budget | share of the context | policy | accuracy | KV MiB |")
    print("|---|---|---|---|---|---|---|---|")
    rows = {}
    for rec in records:  # a rerun of the same configuration replaces the earlier one
        c, x = rec["config"], rec["result"]
        # the context: every position seen (earlier results: the prompt, or the length for several turns)
        seen = [s.get("context_tokens") or (s["prompt_tokens"] if c["setting"] in ("aware", "agnostic")
                                            else c["length"]) for s in x["samples"]]
        share = f"1/{sum(seen) / len(seen) / c['budget']:.1f}" if c["budget"] else "all"
        key = (c["task"], c["setting"], c["length"], c["budget"] or 0, c["policy"] != "full", label(c))
        rows[key] = f"| {c['task']} | {c['setting']} | {c['length']} | {c['budget'] or '-'} | {share} | " \
                    f"{label(c)} | {x['accuracy']:.2f} | {_mib(x):.2f} |"
    for key in sorted(rows):
        print(rows[key])


def main(path: str, long: bool = False) -> None:
    cells: dict[tuple, dict] = defaultdict(dict)
    budgets: set[int] = set()
    records = [json.loads(line) for line in open(path, encoding="utf-8")]
    if long:
        return long_table(records)
    settings = len({r["config"].get("setting") for r in records}) > 1
    for rec in records:
        c, x = rec["config"], rec["result"]
        mib = _mib(x)
        task = f"{c['task']} | {c['setting']}" if settings else c["task"]
        cells[(task, c["length"], c["policy"] != "full", label(c))][c["budget"]] = (x["accuracy"], mib)
        if c["budget"] is not None:
            budgets.add(c["budget"])
    order = sorted(budgets)
    head = "| task | setting |" if settings else "| task |"
    print(f"{head} length | policy | " + " | ".join(f"budget {b}: accuracy (KV MiB)" for b in order) + " |")
    print("|---|" + "---|" * (3 if settings else 2) + "---|" * len(order))
    for (task, length, _ours, name), row in sorted(cells.items()):
        vals = [row.get(b, row.get(None)) for b in order]
        text = [f"{v[0]:.2f} ({v[1]:.2f})" if v else "-" for v in vals]
        print(f"| {task} | {length} | {name} | " + " | ".join(text) + " |")


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--long"]
    main(args[0] if args else "bench/results/heads/quality.jsonl", "--long" in sys.argv[1:])
