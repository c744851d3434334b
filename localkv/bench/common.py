"""Shared bench plumbing: resumable JSON-lines results and running one configuration in a subprocess."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

from ..errors import LocalkvError


def config_key(cfg: dict) -> str:
    return json.dumps(cfg, sort_keys=True)


def load_results(path: Path) -> dict[str, dict]:
    """Finished results by config key; a torn last line (interrupted write) is ignored."""
    done: dict[str, dict] = {}
    if not path.exists():
        return done
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "config" in rec:
            done[config_key(rec["config"])] = rec
    return done


def append_result(path: Path, rec: dict) -> None:
    """One line per result, flushed and fsynced: finished results survive an interruption."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (json.dumps(rec, sort_keys=True) + "\n").encode()
    with open(path, "ab") as f:
        # a torn line left by an earlier crash must not swallow this one
        if f.tell() > 0:
            with open(path, "rb") as r:
                r.seek(-1, os.SEEK_END)
                if r.read(1) != b"\n":
                    f.write(b"\n")
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def run_worker(module: str, cfg: dict, timeout: float = 3600) -> dict:
    """Run `python -m localkv.bench.<module>` on one config (JSON on stdin), return its JSON result."""
    proc = subprocess.run([sys.executable, "-m", f"localkv.bench.{module}"], input=json.dumps(cfg),
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise LocalkvError(f"bench worker failed on {cfg}: {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def worker_main(run: Callable[[dict], dict]) -> None:
    """A worker's side of run_worker (`python -m localkv.bench.<module> < config.json`): the config from stdin,
    `run`'s result as one JSON line on stdout."""
    cfg = json.loads(sys.stdin.read())
    print(json.dumps(run(cfg)))


def run_grid(module: str, configs: list[dict], out_file: Path, progress: bool, label: str = "bench") -> list[dict]:
    """Run every config not already in out_file (resumable), appending each result as it finishes."""
    import time

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    done = load_results(out_file)
    machine = machine_note()  # each result says where it ran (bench report prints it with its table)
    todo = [c for c in configs if config_key(c) not in done]
    records = [done[config_key(c)] for c in configs if config_key(c) in done]
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), disable=not progress, transient=True) as bar:
        task = bar.add_task(label, total=len(configs), completed=len(records))
        for cfg in todo:
            bar.update(task, description=f"{label}: {cfg.get('policy')} {cfg.get('budget') or ''} @ {cfg.get('length')}")
            t0 = time.time()
            result = run_worker(cfg.get("worker", module), cfg)
            rec = {"config": cfg, "result": result, "seconds": round(time.time() - t0, 1),
                   "date": time.strftime("%Y-%m-%d"), "machine": machine}
            append_result(out_file, rec)
            records.append(rec)
            bar.advance(task)
    order = {config_key(c): i for i, c in enumerate(configs)}
    return sorted(records, key=lambda r: order[config_key(r["config"])])


def anchor_configs(base: dict, kv_types: list[str], lengths: list[int]) -> list[dict]:
    """The full cache quantized by llama.cpp (what users already have), once per KV type and length."""
    return [{**base, "ctk": t, "ctv": t, "policy": "full", "budget": None, "length": n, "prefill_budget": None}
            for t in kv_types for n in lengths]


def machine_note() -> str:
    """The CPU, its cores and any NVIDIA GPU: 'AMD EPYC 7B13, 2 cores' or '..., 16 cores, NVIDIA H100 80GB HBM3'."""
    import platform
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or platform.machine()
    note = f"{cpu}, {os.cpu_count()} cores"
    try:
        gpus = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=10).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        gpus = []
    return ", ".join([note] + [g.strip() for g in gpus if g.strip()])


def grid(policies: list[str], budgets: list[int], lengths: list[int], base: dict,
         prefill_budget: int | None = None, budget_below_length: bool = False) -> list[dict]:
    """Configs for every (length, policy, budget): `full` once per length, without budget or working set."""
    configs = []
    for length in lengths:
        for pol in policies:
            for b in ([None] if pol == "full" else budgets):
                if budget_below_length and b is not None and b >= length:
                    continue
                configs.append({**base, "policy": pol, "budget": b, "length": length,
                                "prefill_budget": prefill_budget if pol != "full" else None})
    return configs


def split_spec(spec: str) -> tuple[str, dict[str, str]]:
    """'snapkv:adaptive=true:window=16' -> ('snapkv', {'adaptive': 'true', 'window': '16'})."""
    from ..policies import parse_args
    name, *args = spec.split(":")
    return name.strip(), parse_args(args)
