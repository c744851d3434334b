"""POD's trade-off curve: KV bytes llama.cpp allocates against the delta threshold and the proximal size, next to
the needle accuracy and KL the bench measured (bench/results/pod). Prints Markdown tables and writes a PNG.

    PYTHONPATH=. python scripts/pod_curve.py [bench/results/pod] [bench/results/pod/pod_curve.png]

The bytes are real allocations: an Engine per (delta, proximal) sized for each length by memory_report.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from localkv import calibrate as cal
from localkv import profiles
from localkv.engine import Engine
from localkv.memory import save_png

DELTAS = (0.3, 0.4, 0.45, 0.5, 0.55, 0.6)
PROXIMAL = (512, 1024, 2048)
LENGTHS = (4096, 8192, 16384)


def saved_fractions() -> dict[tuple[float, int, int], float]:
    """(delta, proximal, length) -> share of the full f16 cache's bytes POD does not allocate."""
    out = {}
    with Engine(policy="full", ctx=256) as probe:
        for d in DELTAS:
            for prox in PROXIMAL:
                with Engine(policy="pod", budget=prox, policy_args={"delta": str(d)}, shared_model=probe.model) as eng:
                    for n in LENGTHS:
                        rep = eng.memory_report(tokens=n)
                        out[d, prox, n] = 1 - rep.kv_bytes_allocated / rep.kv_bytes_full_f16
    return out


def measured(results: Path) -> tuple[dict, dict]:
    """(policy label, budget, length) -> needle accuracy, and -> KL mean, from the bench's JSON lines."""
    def label(cfg):
        args = cfg.get("policy_args") or {}
        return cfg["policy"] + "".join(f":{k}={v}" for k, v in sorted(args.items()))
    acc, kl = {}, {}
    for name, into, key in (("quality.jsonl", acc, "accuracy"), ("kl.jsonl", kl, "kl_mean")):
        path = results / name
        for line in path.read_text().splitlines() if path.exists() else []:
            rec = json.loads(line)
            c = rec["config"]
            into[label(c), c["budget"], c["length"]] = rec["result"][key]
    return acc, kl


def main() -> None:
    results = Path(sys.argv[1] if len(sys.argv) > 1 else "bench/results/pod")
    png = sys.argv[2] if len(sys.argv) > 2 else str(results / "pod_curve.png")
    prof = json.loads(next(profiles.SHIPPED_DIR.glob("pod-*.json")).read_text())
    sim = np.asarray(prof["similarity"])
    followers = {d: cal.pod_followers(cal.pod_blocks(sim, d)) for d in DELTAS}
    heads = (sim.shape[0] + 1) * sim.shape[1]
    saved = saved_fractions()
    acc, kl = measured(results)

    print("| delta | followers | " + " | ".join(f"saved {n // 1024}K, prox {p}" for n in LENGTHS for p in (1024,))
          + " | saved 16K, prox 512 / 2048 | needle 4K / 8K / 16K (prox 1024) | KL 4K (prox 1024) |")
    print("|---" * 8 + "|")
    for d in DELTAS:
        a = [acc.get((f"pod:delta={d}", 1024, n)) for n in LENGTHS]
        k = kl.get((f"pod:delta={d}", 1024, 4096))
        print(f"| {d} | {followers[d]}/{heads} | " + " | ".join(f"{saved[d, 1024, n]:.1%}" for n in LENGTHS)
              + f" | {saved[d, 512, 16384]:.1%} / {saved[d, 2048, 16384]:.1%} | "
              + " / ".join(f"{x:.2f}" if x is not None else "-" for x in a) + " | " + (f"{k:.3f}" if k is not None else "-") + " |")
    full = {n: acc.get(("full", None, n)) for n in LENGTHS}
    print("\nfull cache needle accuracy:", {n: v for n, v in full.items() if v is not None})

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for prox in PROXIMAL:
        ax1.plot(DELTAS, [100 * saved[d, prox, 16384] for d in DELTAS], marker="o", label=f"16K, proximal {prox}")
    ax1.plot(DELTAS, [100 * saved[d, 1024, 4096] for d in DELTAS], marker="s", ls="--", label="4K, proximal 1024")
    ax1.axhline(20, color="grey", lw=0.8, ls=":")
    ax1.set_xlabel("delta (layers merge while JS similarity >= delta)")
    ax1.set_ylabel("KV bytes saved vs full f16 (%)")
    ax1.set_title("allocated by llama.cpp", fontsize=10)
    ax1.legend(fontsize=8)
    for j, n in enumerate(LENGTHS):
        pts = [(100 * saved[d, 1024, n], acc.get((f"pod:delta={d}", 1024, n)), d) for d in DELTAS]
        pts = [p for p in pts if p[1] is not None]
        if not pts:
            continue
        ax2.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=f"C{j}", label=f"needle accuracy {n // 1024}K")
        for x, a, d in pts:
            ax2.annotate(f"δ={d}", (x, a), fontsize=7, xytext=(3, 3), textcoords="offset points")
    pts = [(100 * saved[d, 1024, 4096], kl.get((f"pod:delta={d}", 1024, 4096))) for d in DELTAS]
    pts = [(x, None, k) for x, k in pts]
    ax2.set_xlabel("KV bytes saved, proximal 1024 (%)")
    ax2.set_ylabel("accuracy (full cache: 1.00)")
    ax2.set_ylim(-0.05, 1.05)
    ax3 = ax2.twinx()
    ax3.plot([p[0] for p in pts if p[2] is not None], [p[2] for p in pts if p[2] is not None], marker="s", color="C3",
             ls="--", label="KL vs full at 4K (right)")
    ax3.set_yscale("log")
    ax3.set_ylabel("KL mean (nats/token)")
    ax2.set_title("niah_multikey (3 depths) and KL, training-free", fontsize=10)
    h1, l1 = ax2.get_legend_handles_labels()
    h2, l2 = ax3.get_legend_handles_labels()
    ax2.legend(h1 + h2, l1 + l2, fontsize=8, loc="center left")
    fig.suptitle(f"POD on {prof['model']}: memory against quality", fontsize=11)
    fig.tight_layout()
    save_png(fig, png)
    print(f"\nwrote {png}")


if __name__ == "__main__":
    main()
