"""What one decoded token costs in graph nodes and kernels: upstream's cache, uniform compressed layers, ragged ones.

Counted from ggml's own graph as it runs (`localkv.graph_tap.OpCounter`: every node the scheduler computes), so no
GPU is needed: a kernel is a node that is not a view, reshape, permute or transpose (what a GPU backend would
launch, before any fusion it does). The default model is a random-weight GGUF of Llama-3-8B's attention shape
(32 query / 8 KV heads, head dim 128; 4 layers, as the count is per layer) written on the fly; `--model` takes a
real one. Ragged layers come from AdaKV-style adaptive heads (a layer's budget shared by its heads by score), so
every head keeps its own count; `padding` is what grouping a layer's heads into runs of equal slots adds to
the bytes one region per head would take. Counted twice: the cache alone (statistics off: store, masks,
attention), and as the policy runs (its statistics computed with every decoded token, `with_stats`).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

CACHES = {
    "full": {"policy": "full"},
    "uniform": {"policy": "snapkv"},
    "ragged": {"policy": "snapkv", "policy_args": {"adaptive": "true"}},
}


def count_cache(model: str, name: str, *, prompt: int, budget: int, decode: int, max_parts: int | None,
                threads: int | None, gpu_layers: int) -> dict:
    """Nodes and kernels per decoded token of one cache kind, and its bytes."""
    from .. import capi
    from ..engine import Engine
    from ..graph_tap import OpCounter
    from ..policies import DECODE
    from ..llama import Sampler
    from .speed import filler_tokens

    spec = CACHES[name]
    counter = OpCounter()
    compressed = spec["policy"] != "full"
    eng = Engine(model, policy=spec["policy"], policy_args=spec.get("policy_args"),
                 budget=budget if compressed else None, ctx=None if compressed else prompt + decode + 64,
                 chunk=256, threads=threads, gpu_layers=gpu_layers, eval_callback=counter.callback)
    try:
        if compressed and max_parts is not None:
            eng.cache.max_parts = max_parts
        eng.feed(filler_tokens(eng.model, prompt))
        sampler = Sampler(0.0, 0)
        eng.step(sampler.sample(eng.ctx))  # the compaction after the prompt runs with the first decode

        # as the policy runs: its statistics computed with every token
        counter.reset()
        for _ in range(decode):
            eng.step(sampler.sample(eng.ctx))
        with_stats = {"nodes_per_token": counter.nodes / decode, "kernels_per_token": counter.kernels / decode}

        # the cache alone: the same steps with no statistic switched on (store, masks, attention)
        if compressed:
            capi.set_stats(eng.ctx, [])
        counter.reset()
        for _ in range(decode):
            if compressed:
                eng._make_room(1, DECODE)
            eng._decode([sampler.sample(eng.ctx)], True)
        sampler.close()
        out = {"nodes_per_token": counter.nodes / decode, "kernels_per_token": counter.kernels / decode,
               "with_stats": with_stats, "ops_per_token": {op: n / decode for op, n in sorted(counter.ops.items())},
               "kv_bytes": eng.kv_bytes_allocated()}
        if compressed:
            out.update(_padding(eng))
        return out
    finally:
        eng.close()


def _padding(eng) -> dict:
    """The bytes of the cache as laid out against one region per head of exactly its own slots."""
    from .. import capi
    cache = eng.cache
    _cap, alloc, used = capi.cache_state(eng.ctx)
    own = np.array([max(32, -(-int(u + eng.plan.decode_interval) // 32) * 32) for u in used])
    laid = np.array(cache.layout(used + eng.plan.decode_interval))
    parts = [len(set(laid[cache.heads_of(i)].tolist())) for i in range(len(cache.head0) - 1)]
    return {"slots_laid_out": int(laid.sum()), "slots_own": int(own.sum()),
            "padding": float(laid.sum() / own.sum() - 1.0), "parts_per_layer_max": max(parts),
            "heads_kept_min": int(used.min()), "heads_kept_max": int(used.max())}


def run(model: str | None, *, prompt: int = 1024, budget: int = 256, decode: int = 16, max_parts: int | None = None,
        threads: int | None = None, gpu_layers: int = -1, shape: str = "llama") -> dict:
    """{"full": {...}, "uniform": {...}, "ragged": {...}} for `model`, or a random `shape` model written here."""
    with tempfile.TemporaryDirectory(prefix="localkv-graph-") as tmp:
        if model is None:
            from ..synthetic import write_random_model
            model = str(write_random_model(Path(tmp) / f"random-{shape}.gguf", shape))
        return {name: count_cache(model, name, prompt=prompt, budget=budget, decode=decode, max_parts=max_parts,
                                  threads=threads, gpu_layers=gpu_layers) for name in CACHES}
