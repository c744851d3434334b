"""Regenerate the generated part of docs/results.md from committed result files (`localkv bench report`).

Reads bench/results/{speed,memory,quality,kl}.jsonl, writes PNG plots next to
them and replaces the text between the markers <!-- results:begin --> and
<!-- results:end --> of the results document. Each table states the machine,
model and dates its rows were measured on, as each result recorded them
("machine not recorded" for results written before results carried it);
rows measured on different machines get a table each.
"""
from __future__ import annotations

import io
import os
import tempfile
from collections import defaultdict
from pathlib import Path

from rich.console import Console

from ..errors import LocalkvError
from .common import load_results
from .kvpress_anchor import PREFIX
from .report import kl_table, kvpress_table, label, quality_table, speed_table

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def _records(path: Path) -> list[dict]:
    return list(load_results(path).values())


def _markdown(fn, records) -> str:
    buf = io.StringIO()
    fn(records, Console(file=buf, width=400, highlight=False), markdown=True)
    return buf.getvalue().rstrip() + "\n"


NOT_RECORDED = "machine not recorded"


def _machine(record: dict) -> str:
    return record.get("machine") or NOT_RECORDED


def by_machine(records: list[dict]) -> list[tuple[str, list[dict]]]:
    """Records grouped by the machine each one ran on, in first-seen order (timings from two machines never share
    a table)."""
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(_machine(r), []).append(r)
    return list(groups.items())


def stamp(records: list[dict]) -> str:
    """'_Measured <dates> on <machine>; model: <models>._', the machine from each record, never today's."""
    on = []
    for machine, recs in by_machine(records):
        dates = ", ".join(sorted({r.get("date", "?") for r in recs}))
        on.append(f"{dates} ({machine})" if machine == NOT_RECORDED else f"{dates} on {machine}")
    models = sorted({r["config"].get("model") or "default model (qwen2.5-coder-0.5b-instruct-q4_k_m)" for r in records})
    return f"_Measured {'; '.join(on)}; model: {', '.join(models)}._\n"


def _tables(fn, records: list[dict]) -> list[str]:
    """One stamped table per machine."""
    parts = []
    for _machine_name, recs in by_machine(records):
        parts += [stamp(recs), _markdown(fn, recs)]
    return parts


def _save(fig, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)


def _accuracy_plot(plt, quality: list[dict], path: Path) -> None:
    """Accuracy vs budget, one panel per (setting, length): our policies solid, kvpress's presses dashed in the
    same colour, the uncompressed anchors (f16, llama.cpp's q8_0/q4_0, transformers) as horizontal lines."""
    panels = sorted({(r["config"]["setting"], r["config"]["length"]) for r in quality})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4), squeeze=False)
    colours = {}
    for ax, (setting, length) in zip(axes[0], panels):
        series, flat = defaultdict(lambda: defaultdict(list)), defaultdict(list)
        for r in quality:
            c = r["config"]
            if (c["setting"], c["length"]) != (setting, length):
                continue
            if c["budget"] is None:
                flat[label(c)].append(r["result"]["accuracy"])
            else:
                series[label(c)][c["budget"]].append(r["result"]["accuracy"])
        for name, pts in sorted(series.items()):
            base = name.removeprefix(PREFIX)
            colour = colours.setdefault(base, f"C{len(colours) % 10}")
            xs = sorted(pts)
            ax.plot(xs, [sum(pts[x]) / len(pts[x]) for x in xs], marker="o", color=colour, label=name,
                    linestyle="--" if name.startswith(PREFIX) else "-")
        styles = iter(["-", "--", ":", "-."] * 3)
        for name, vals in sorted(flat.items()):
            ax.axhline(sum(vals) / len(vals), color="black" if not name.startswith(PREFIX) else "grey",
                       linestyle=next(styles), linewidth=1, label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("budget (tokens per KV head)")
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.05, 1.05)
        ax.set_title(f"question-{setting}, {length} tokens" if setting in ("aware", "agnostic")
                     else f"{setting}, {length} tokens")
        ax.legend(fontsize=6)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plots(results: Path) -> list[str]:
    """Accuracy vs budget per policy; KV memory and decode speed vs context length. Returns the PNG names."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    quality = _records(results / "quality.jsonl")
    if quality:
        _accuracy_plot(plt, quality, results / "accuracy.png")
        made.append("accuracy.png")

    for name, key, ylabel, fname in (("memory", "kv_bytes_allocated", "KV MiB allocated", "memory.png"),
                                     ("memory", "peak_rss_bytes", "peak RSS MiB", "rss.png"),
                                     ("speed", "decode_tokens_per_s", "decode tokens/s", "decode.png")):
        recs = _records(results / f"{name}.jsonl")
        if not recs:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        series = defaultdict(list)
        for r in recs:
            c = r["config"]
            line = label(c) + (f" {c['budget']}" if c.get("budget") else "")
            v = r["result"][key]
            series[line].append((c["length"], v / 2**20 if "bytes" in key else v))
        for line, pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=line)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
        fig.tight_layout()
        _save(fig, results / fname)
        plt.close(fig)
        made.append(fname)
    return made


def render(results: Path, rel: str) -> str:
    """The generated section; `rel` is the results directory as the document links to it."""
    parts = [BEGIN, "",
             f"Generated by `localkv bench report` from the result files in `{results.as_posix()}/`.", ""]
    speed = _records(results / "speed.jsonl")
    if speed:
        parts += ["### Speed and memory against prompt length", "",
                  "`localkv bench speed` (decode 64 tokens after the prompt; full uses llama.cpp's default 512-token "
                  "ubatch, compressed runs prefill in 256-token chunks):", "", *_tables(speed_table, speed),
                  f"![decode speed]({rel}/decode.png)", ""]
    mem = _records(results / "memory.jsonl")
    if mem:
        parts += ["### KV memory and peak RSS against prompt length", "",
                  "`localkv bench memory`:", "", *_tables(speed_table, mem),
                  f"![KV memory]({rel}/memory.png) ![peak RSS]({rel}/rss.png)", ""]
    quality = _records(results / "quality.jsonl")
    if quality:
        parts += ["### Accuracy against budget", "",
                  "`localkv bench quality` (fraction of expected strings found, RULER-style; samples spread "
                  "the needle over the document):", "", *_tables(quality_table, quality),
                  f"![accuracy]({rel}/accuracy.png)", ""]
        if any(r["config"]["policy"].startswith(PREFIX) for r in quality):
            parts += ["### Against NVIDIA kvpress", "",
                      "The same prompts and budgets through kvpress's matching press on transformers (the same GGUF, "
                      "dequantized to float32 on the CPU); KV MiB is what each cache holds after the prompt "
                      "(ours: f16, what llama.cpp allocated, from the result files; kvpress: float32):", "",
                      stamp(quality), _markdown(kvpress_table, quality), ""]
    kl = _records(results / "kl.jsonl")
    if kl:
        parts += ["### KL divergence against the full cache", "",
                  "`localkv bench kl` (English license texts from Debian's base-files package):", "",
                  *_tables(kl_table, kl), ""]
    parts += [END]
    return "\n".join(parts)


def update_doc(doc: Path, results: Path) -> None:
    """Write the plots and replace the generated section of `doc` (atomically)."""
    text = doc.read_text(encoding="utf-8")
    if BEGIN not in text or END not in text:
        raise LocalkvError(f"{doc} has no {BEGIN} ... {END} section")
    plots(results)
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    rel = Path(os.path.relpath(results.resolve(), doc.resolve().parent)).as_posix()
    new = head + render(results, rel) + tail
    fd, tmp = tempfile.mkstemp(dir=doc.parent, prefix=f".{doc.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(new)
    os.replace(tmp, doc)
