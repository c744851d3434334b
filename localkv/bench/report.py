"""Tables from bench results: a rich table on the terminal, or Markdown for docs/results.md."""
from __future__ import annotations

from rich.table import Table


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def emit(head: list[str], rows: list[list[str]], console, markdown: bool, title: str, justify: str = "right") -> None:
    """Print rows as a Markdown table (for docs/results.md) or a rich table."""
    if markdown:
        console.print("| " + " | ".join(head) + " |", markup=False)
        console.print("|" + "---|" * len(head), markup=False)
        for row in rows:
            console.print("| " + " | ".join(row) + " |", markup=False)
        return
    t = Table(title=title)
    for h in head:
        t.add_column(h, justify=justify)
    for row in rows:
        t.add_row(*row)
    console.print(t)


def kept_bytes(sample: dict) -> int:
    """KV bytes a run keeps: a masking press of kvpress (KVzipPress, AdaKVPress) allocates everything, so its
    samples count what attention still sees."""
    return sample.get("kv_bytes_kept", sample["kv_bytes_allocated"])


def speed_table(records: list[dict], console, markdown: bool = False) -> None:
    head = ["prompt", "policy", "budget", "prefill tok/s", "decode tok/s", "KV MiB (allocated)",
            "KV MiB (full f16)", "stats MiB", "compute MiB", "peak RSS MiB", "compress s", "compress MB moved",
            "replay s"]
    rows = []
    for r in records:
        c, x = r["config"], r["result"]
        rows.append([str(c["length"]), label(c), str(c["budget"] or "-"), f"{x['prefill_tokens_per_s']:.0f}",
                     f"{x['decode_tokens_per_s']:.1f}", _mib(x["kv_bytes_allocated"]), _mib(x["kv_bytes_full_f16"]),
                     _mib(x["kv_stats_bytes"]), _mib(x["compute_bytes"]), _mib(x["peak_rss_bytes"]),
                     f"{x['compress_s_total']:.2f}",
                     f"{x['compress_bytes'] / 1e6:.2f}" if "compress_bytes" in x else "-",
                     f"{x['replay_s']:.1f}" if x.get("replay_tokens") else "-"])
    emit(head, rows, console, markdown, "speed and memory")


def quality_table(records: list[dict], console, markdown: bool = False) -> None:
    """Accuracy: one row per (task, length, setting, policy), one column per budget."""
    from .kvpress_anchor import PREFIX
    budgets = sorted({r["config"]["budget"] for r in records if r["config"]["budget"] is not None})
    rows: dict[tuple, dict] = {}
    for r in records:
        c = r["config"]
        # rows in order: the f16 full cache, our policies, llama.cpp's quantized caches, then kvpress
        rank = (3 if c["policy"].startswith(PREFIX) else 2 if c.get("ctk", "f16") != "f16"
                else 0 if c["policy"] == "full" else 1)
        key = (c["task"], c["setting"], c["length"], rank, label(c))
        broken = sum(bool(x.get("partial")) for x in r["result"].get("samples", []))
        rows.setdefault(key, {})[c["budget"]] = f"{r['result']['accuracy']:.2f}" + (f" ({broken} broken)" if broken else "")
    head = ["task", "length", "setting", "policy"] + [f"budget {b}" for b in budgets]
    lines = []
    for (task, setting, length, _rank, pol), cells in sorted(rows.items()):
        if None in cells:  # full: one value for every budget column
            vals = [cells[None]] * len(budgets)
        else:
            vals = [cells[b] if b in cells else "-" for b in budgets]
        lines.append([task, str(length), setting, pol] + vals)
    emit(head, lines, console, markdown, "accuracy (fraction of expected strings found; broken: a fact came back with "
         "pieces missing)", justify="left")


def _args(args: dict | None) -> str:
    return "" if not args else " (" + ", ".join(f"{k}={v}" for k, v in sorted(args.items())) + ")"


def label(c: dict) -> str:
    """A run's name in tables and plots: policy, non-default hyper-parameters, quantized KV type."""
    kv = c.get("ctk", "f16")
    name = c["policy"] + _args(c.get("policy_args")) + ("" if kv == "f16" else f" ({kv} KV)")
    if c.get("prefill_budget") is not None:  # 0 is the strict mode: nothing beyond the budget
        name += f" (prefill {c['prefill_budget'] or 'budget'})"
    return name


def kl_table(records: list[dict], console, markdown: bool = False) -> None:
    head = ["context", "policy", "budget", "KL mean", "KL p99", "perplexity", "full ppl", "top-1 agree"]
    rows = []
    for r in records:
        c, x = r["config"], r["result"]
        rows.append([str(c["length"]), label(c), str(c["budget"] or "-"), f"{x['kl_mean']:.4f}",
                     f"{x['kl_p99']:.3f}", f"{x['ppl']:.3f}", f"{x['ppl_full']:.3f}", f"{x['top1_agree']:.1%}"])
    emit(head, rows, console, markdown, "KL divergence against the full cache")


def kvpress_table(records: list[dict], console, markdown: bool = False) -> None:
    """Ours against kvpress's matching press: accuracy and KV bytes, same tasks, prompts and budgets."""
    from .kvpress_anchor import PREFIX
    ours, theirs = {}, {}
    for r in records:
        c = r["config"]
        if c.get("ctk", "f16") != "f16" or c.get("policy_args") or c.get("prefill_budget") is not None:
            continue  # the default configuration of each policy only
        name = c["policy"]
        key = (c["task"], c["length"], c["setting"], name.removeprefix(PREFIX), c["budget"])
        kv = sum(kept_bytes(x) for x in r["result"]["samples"]) / len(r["result"]["samples"])
        (theirs if name.startswith(PREFIX) else ours)[key] = (r["result"]["accuracy"], kv)
    head = ["task", "length", "setting", "policy", "budget", "localkv accuracy", "kvpress accuracy",
            "localkv KV MiB", "kvpress KV MiB"]
    rows = []
    for key in sorted(theirs, key=lambda k: (k[0], k[1], k[2], k[3], k[4] or 0)):
        (b, kv_b) = theirs[key]
        a, kv_a = ours.get(key, (None, None))  # kvpress's own presses (keydiff) have no policy of ours
        task, length, setting, name, budget = key
        rows.append([task, str(length), setting, name, str(budget or "-"), "-" if a is None else f"{a:.2f}",
                     f"{b:.2f}", "-" if kv_a is None else _mib(kv_a), _mib(kv_b)])
    emit(head, rows, console, markdown, "localkv against kvpress", justify="left")
