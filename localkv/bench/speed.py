"""Speed and memory of the compressed cache against the full cache (the mechanism benchmark).

For each (prompt length, policy, budget): prefill a prompt of exactly that many
tokens in chunks, then decode a fixed number of tokens greedily, and report
prefill and decode tokens/s, the KV bytes llama.cpp allocated, the statistics
buffers, the compute buffers and the process's peak RSS. Run as a worker:
`python -m localkv.bench.speed < config.json`.
"""
from __future__ import annotations

import random
import time

from .common import worker_main

WORDS = ("river stone cloud music paper light garden window silver forest ocean market bridge "
         "candle winter harbor lantern meadow copper violet engine orchard thunder canvas").split()


def filler_tokens(model, n: int, seed: int = 0) -> list[int]:
    """Exactly n tokens of seeded filler prose, sized with the model's tokenizer."""
    rng = random.Random(seed)
    tokens: list[int] = []
    while len(tokens) < n:
        sentence = " ".join(rng.choice(WORDS) for _ in range(12)).capitalize() + ". "
        tokens += model.tokenize(sentence * 8)
    return tokens[:n]


def measure(cfg: dict) -> dict:
    from ..engine import Engine, peak_rss_bytes
    from .. import capi
    from ..llama import Sampler

    policy = cfg["policy"]
    eng = Engine(cfg.get("model"), policy=policy, budget=cfg.get("budget"), prefill_budget=cfg.get("prefill_budget"),
                 policy_args=cfg.get("policy_args") or None,
                 ctx=cfg["length"] + cfg["decode"] + 64 if policy == "full" else None,
                 chunk=cfg.get("chunk", 256), cache_type_k=cfg.get("ctk", "f16"), cache_type_v=cfg.get("ctv", "f16"),
                 threads=cfg.get("threads"), gpu_layers=cfg.get("gpu_layers", -1))
    prompt = filler_tokens(eng.model, cfg["length"])
    t0 = time.perf_counter()
    eng.feed(prompt)
    t_prefill = time.perf_counter() - t0
    compress_prefill = eng.compress_seconds
    sampler = Sampler(0.0, 0)
    kept_max = eng.kv_tokens_kept()
    reused = eng.graphs_reused()
    t1 = time.perf_counter()
    for _ in range(cfg["decode"]):
        tok = sampler.sample(eng.ctx)
        eng.step(tok)
        if cfg.get("track_kept"):
            kept_max = max(kept_max, eng.kv_tokens_kept())
    t_decode = time.perf_counter() - t1
    reused = eng.graphs_reused() - reused
    sampler.close()
    out = {
        "prefill_tokens_per_s": len(prompt) / t_prefill,
        "decode_tokens_per_s": cfg["decode"] / t_decode,
        "prefill_s": t_prefill,
        "compress_s_prefill": compress_prefill,
        "compress_s_total": eng.compress_seconds,
        "compressions": eng.compressions,
        "replay_s": eng.replay_seconds,              # reconstruction (KVzip, replay=true): part of prefill_s
        "replay_tokens": eng.replay_tokens,
        "compress_bytes": eng.compress_bytes(),      # host <-> backend bytes moved by compression
        "reallocations": eng.reallocations,          # resizes of the compressed cache (grow / shrink)
        "decode_graph_reuse": reused / cfg["decode"] if cfg["decode"] else 0.0,  # llama.cpp's n_reused per step
        "kv_bytes_allocated": capi.memory_bytes(eng.ctx),
        "kv_bytes_full_f16": eng.full_bytes(eng.n_past, "f16"),
        "kv_stats_bytes": capi.stats_bytes(eng.ctx) if eng.compressing else 0,
        "compute_bytes": capi.compute_bytes(eng.ctx),
        "kv_tokens_kept": eng.kv_tokens_kept(),
        "kv_tokens_kept_max": kept_max,
        "peak_rss_bytes": peak_rss_bytes(),
    }
    eng.close()
    return out


if __name__ == "__main__":
    worker_main(measure)
