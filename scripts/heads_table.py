"""Markdown table of a quality bench: accuracy and KV MiB at rest per policy, budget and length (and setting,
when the file holds more than one: the KVzip table).

    localkv bench quality --policies snapkv,snapkv:adaptive=true,pyramidkv,pyramidkv:adaptive=true,\
surfacelogickv,full --budgets 64,128,256 --lengths 2048,4096 --tasks niah_multikey --settings aware \
--samples 5 --anchors '' --out bench/results/heads
    python scripts/heads_table.py bench/results/heads/quality.jsonl
    python scripts/heads_table.py bench/results/kvzip/quality.jsonl
"""
import json
import sys
from collections import defaultdict

from localkv.bench.report import label


def main(path: str) -> None:
    cells: dict[tuple, dict] = defaultdict(dict)
    budgets: set[int] = set()
    records = [json.loads(line) for line in open(path, encoding="utf-8")]
    settings = len({r["config"].get("setting") for r in records}) > 1
    for rec in records:
        c, x = rec["config"], rec["result"]
        mib = sum(s["kv_bytes_allocated"] for s in x["samples"]) / len(x["samples"]) / 2**20
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
    main(sys.argv[1] if len(sys.argv) > 1 else "bench/results/heads/quality.jsonl")
