"""The memory report: what llama.cpp allocated for the KV cache, as tables, plots and JSON.

Every figure labelled "allocated" is read from llama.cpp (its memory breakdown
and the K/V tensors of each layer); the "full" figures are what an uncompressed
cache of the same number of tokens would take in f16, q8_0 and q4_0.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from rich.table import Table

from .errors import LocalkvError
from .fsutil import atomic_write

if TYPE_CHECKING:  # the engine loads llama.cpp; fmt_bytes and the tables do not need it
    from .engine import MemoryReport


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def uneven_heads(rep: MemoryReport) -> bool:
    """Whether some layer's KV heads keep different numbers of tokens (per-head budgets)."""
    return any(lm.head_capacities and len(set(lm.head_capacities)) > 1 for lm in rep.layers)


def pod_role(rep: MemoryReport, lm, h: int) -> str:
    """'kv<h> follows L<layer> (K <slots>)', 'kv<h> leads' (some later layer follows it) or 'kv<h> -'."""
    if lm.head_leaders[h] >= 0:
        return f"kv{h} follows L{lm.head_leaders[h]} (K {lm.head_k_slots[h]})"
    leads = any(o.head_leaders and o.head_leaders[h] == lm.layer for o in rep.layers)
    return f"kv{h} leads" if leads else f"kv{h} -"


def layer_table(rep: MemoryReport) -> Table:
    title = (f"KV cache of {Path(rep.model).name}: policy {rep.policy}"
             + (f", budget {rep.budget}" if rep.budget else "") + f", K {rep.cache_type_k} / V {rep.cache_type_v}")
    t = Table(title=title)
    uneven = uneven_heads(rep)
    pod = any(lm.head_leaders for lm in rep.layers)
    windowed = any(lm.windowed for lm in rep.layers)
    for col in ("layer",) + (("kind",) if windowed else ()) + ("K", "V", "tokens/head") + \
            (("tokens per KV head",) if uneven else ()) + (("POD role per KV head",) if pod else ()):
        t.add_column(col, justify="right")
    for lm in rep.layers:
        row = [str(lm.layer)] + ([("windowed" if lm.windowed else "compressed" if rep.budget else "full")]
                                 if windowed else [])
        row += [fmt_bytes(lm.k_bytes), fmt_bytes(lm.v_bytes), str(lm.capacity if lm.capacity is not None else rep.ctx)]
        if uneven:
            row.append(" ".join(str(c) for c in lm.head_capacities or []) if not lm.windowed else "")
        if pod:
            row.append("  ".join(pod_role(rep, lm, h) for h in range(len(lm.head_leaders or []))))
        t.add_row(*row)
    if pod:
        followers = sum(sum(x >= 0 for x in lm.head_leaders or []) for lm in rep.layers)
        heads = sum(len(lm.head_leaders or []) for lm in rep.layers)
        t.caption = (f"POD: {followers} of {heads} (layer, KV head)s follow a leader (K for sinks + recent tokens "
                     "only: 'K n' is the K slots they hold); 'lead' heads share their logits with followers")
    if uneven:
        kept = sum(sum(lm.head_capacities or []) for lm in rep.layers)
        heads = sum(len(lm.head_capacities or []) for lm in rep.layers)
        t.caption = (f"heads keep different numbers of tokens: {kept} in all = {kept / heads:g} per KV head on "
                     f"average over {heads} (layer, KV head)s; tokens/head is each layer's largest")
    if windowed:
        n = sum(lm.windowed for lm in rep.layers)
        t.caption = ((t.caption + "\n") if t.caption else "") + (
            f"{n} windowed layers hold their sliding window of cells (tokens/head), as upstream keeps them; "
            f"{len(rep.layers) - n} full-attention layers are " + ("compressed" if rep.budget else "full"))
    return t


def totals_table(rep: MemoryReport) -> Table:
    t = Table(title=f"totals for {rep.tokens} tokens")
    t.add_column("cache")
    t.add_column("bytes", justify="right")
    t.add_column("vs full f16", justify="right")
    full = rep.kv_bytes_full_f16
    for name, val in (("allocated (llama.cpp)", rep.kv_bytes_allocated), ("full f16", full),
                      ("full q8_0", rep.kv_bytes_full_q8_0), ("full q4_0", rep.kv_bytes_full_q4_0)):
        t.add_row(name, fmt_bytes(val), f"{val / full:.1%}" if full else "-")
    if rep.kv_bytes_prefill != rep.kv_bytes_allocated:
        t.add_row("while a prompt goes in", fmt_bytes(rep.kv_bytes_prefill), f"{rep.kv_bytes_prefill / full:.1%}")
    if rep.kv_bytes_windowed:
        t.add_row("of which windowed layers", fmt_bytes(rep.kv_bytes_windowed), f"{rep.kv_bytes_windowed / full:.1%}")
    if rep.kv_stats_bytes:
        t.add_row("statistics and masks", fmt_bytes(rep.kv_stats_bytes), f"{rep.kv_stats_bytes / full:.1%}")
    t.add_row("compute buffers", fmt_bytes(rep.compute_bytes), "")
    return t


def compare_table(reports: list[MemoryReport]) -> Table:
    t = Table(title=f"policies side by side: {reports[0].tokens} tokens, budget {reports[-1].budget}")
    for col in ("policy", "KV allocated", "vs full f16", "while prefilling", "statistics", "compute"):
        t.add_column(col, justify="right" if col != "policy" else "left")
    for r in reports:
        full = r.kv_bytes_full_f16
        t.add_row(r.policy, fmt_bytes(r.kv_bytes_allocated), f"{r.kv_bytes_allocated / full:.1%}",
                  fmt_bytes(r.kv_bytes_prefill), fmt_bytes(r.kv_stats_bytes), fmt_bytes(r.compute_bytes))
    return t


def collect(model: str | None, policies: list[str], budget: int | None, tokens: int, skipped: dict | None = None,
            **engine_kw) -> list[MemoryReport]:
    """A real context per policy (budget for the compressing ones), each reported for `tokens` tokens. With
    `skipped`, a policy that cannot compress this model is left out, its one-line reason recorded there."""
    from .engine import Engine
    out = []
    for name in policies:
        full = name == "full"
        try:
            with Engine(model, policy=name, budget=None if full else budget, ctx=tokens if full else None,
                        **engine_kw) as eng:
                out.append(eng.memory_report(tokens=tokens))
        except LocalkvError as e:
            if skipped is None or full:
                raise
            skipped[name] = str(e)
    return out


def plot(reports: list[MemoryReport], path: str) -> None:
    """Bytes per layer, K and V stacked, one group of bars per report (PNG, written atomically)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    n_layers = len(reports[0].layers)
    x = np.arange(n_layers)
    width = 0.8 / len(reports)
    uneven = [r for r in reports if uneven_heads(r)]
    if uneven:  # a second panel: tokens kept by every (layer, KV head)
        fig, (ax, hx) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [3, 1]})
        caps = np.array([lm.head_capacities for lm in uneven[0].layers], dtype=float)
        im = hx.imshow(caps, aspect="auto", cmap="viridis", interpolation="nearest")
        hx.set_title(f"{uneven[0].policy}: tokens per KV head", fontsize=9)
        hx.set_xlabel("KV head")
        hx.set_ylabel("layer")
        hx.set_xticks(range(caps.shape[1]))
        fig.colorbar(im, ax=hx)
    else:
        fig, ax = plt.subplots(figsize=(10, 4.5))
    for j, r in enumerate(reports):
        k = np.array([lm.k_bytes for lm in r.layers]) / 2**20
        v = np.array([lm.v_bytes for lm in r.layers]) / 2**20
        label = r.policy + (f" (budget {r.budget})" if r.budget else f" (ctx {r.ctx})")
        ax.bar(x + j * width, k, width, label=f"{label}: K")
        ax.bar(x + j * width, v, width, bottom=k, label=f"{label}: V", alpha=0.6)
    ax.set_xlabel("layer")
    ax.set_ylabel("MiB allocated by llama.cpp")
    ax.set_title(f"KV bytes per layer, {Path(reports[0].model).name}")
    ax.legend(fontsize=7, ncol=2)
    save_png(fig, path)


def check_png_path(path: str) -> None:
    """Fail before any work when a --plot target cannot be written."""
    if not str(path).lower().endswith(".png"):
        raise LocalkvError(f"--plot writes a PNG: give a file name ending in .png, not {path}")
    target = Path(path)
    if not target.parent.exists():
        raise LocalkvError(f"cannot write {path}: directory {target.parent} does not exist")


def save_png(fig, path: str) -> None:
    """Save a matplotlib figure atomically (a temp file renamed over the target) and close it."""
    import matplotlib.pyplot as plt
    check_png_path(path)
    fig.tight_layout()
    try:
        atomic_write(path, lambda f: fig.savefig(f, dpi=110, format="png"), binary=True)
    finally:
        plt.close(fig)
