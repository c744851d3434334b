"""NVIDIA kvpress on the same model, tasks and budgets: the anchor our policies are compared against.

The GGUF that localkv runs is loaded into transformers (which dequantizes it to
float32 on the CPU) and kvpress's "kv-press-text-generation" pipeline compresses
the prefill with the press that matches one of our policies:

    streamingllm -> StreamingLLMPress   snapkv    -> SnapKVPress
    h2o          -> ObservedAttentionPress (eager attention)
    pyramidkv    -> PyramidKVPress      full      -> no press

and its query-agnostic presses, which score the context before any question:

    kvzip        -> KVzipPress (context reconstruction; one threshold over all heads, as our kvzip)
    keydiff      -> KeyDiffPress (key similarity to the mean key)
    adakv-expected -> AdaKVPress over ExpectedAttentionPress (per-head budgets from expected attention)

with each press's own defaults. KVzipPress and AdaKVPress keep every head's
cache and mask the dropped entries instead (kvpress's "fake compression"), so
their rows report the entries kept (kv_entries_kept) and the bytes those would
take in kvpress's float32 (kv_bytes_kept) beside what was allocated.

kvpress takes a compression ratio, not a budget: the ratio is 1 - budget / context tokens, so that every KV head keeps `budget`
tokens as ours does. Question-aware passes the whole prompt as the context and an
empty question; question-agnostic passes the document and the question apart.

Samples come from localkv.bench.tasks with the same seeds (sized with llama.cpp's
tokenizer), so both sides answer identical prompts. The converted model is kept
under ~/.cache/localkv/kvpress so later runs load it in seconds.

Needs the optional extra: pip install -e .[kvpress]  (torch==2.13.0, kvpress, gguf).
Worker: `python -m localkv.bench.kvpress_anchor < config.json`.
"""
from __future__ import annotations

import hashlib
import os
import time
from importlib.metadata import version
from pathlib import Path

from ..fsutil import written_aside
from .common import worker_main

PRESSES = {"full": None, "streamingllm": "StreamingLLMPress", "snapkv": "SnapKVPress",
           "h2o": "ObservedAttentionPress", "pyramidkv": "PyramidKVPress",
           "kvzip": "KVzipPress", "keydiff": "KeyDiffPress", "adakv-expected": "AdaKVPress+ExpectedAttentionPress"}
PREFIX = "kvpress:"


def check_installed():
    from ..errors import LocalkvError
    try:
        import kvpress  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise LocalkvError(f"the kvpress anchor needs the optional extra ({e.name} is missing): "
                           "pip install -e .[kvpress]") from None


def _converted(gguf: Path) -> Path:
    """A transformers copy of the GGUF, dequantized once and cached (written aside, then renamed)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    root = Path(os.environ.get("LOCALKV_CACHE", Path.home() / ".cache" / "localkv")) / "kvpress"
    target = root / key
    if (target / "config.json").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with written_aside(target, directory=True) as tmp:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype="float32")
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return target


def compression_ratio(budget: int, n_tokens: int) -> float:
    """kvpress keeps int(n * (1 - ratio)) tokens per head; this ratio makes that exactly the budget."""
    return max(0.0, 1.0 - (budget + 0.5) / n_tokens)


def _kv_bytes(cache) -> int:
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


def make_press(kvpress, name: str, ratio: float):
    """The press for one of PRESSES' names; 'A+B' is A wrapping B (AdaKV's per-head budgets over B's scores)."""
    outer, _, inner = PRESSES[name].partition("+")
    if inner:
        return getattr(kvpress, outer)(getattr(kvpress, inner)(compression_ratio=ratio))
    return getattr(kvpress, outer)(compression_ratio=ratio)


def _entries(model, cache) -> tuple[int, int]:
    """(layer, KV head, token) entries (kept, held): a masking press leaves its dropped ones in place."""
    held = sum(layer.keys.shape[1] * layer.keys.shape[2] for layer in cache.layers)
    masked = 0
    for layer in model.model.layers:
        idx = getattr(layer.self_attn, "masked_key_indices", None)
        if idx is not None:
            masked += len(idx[2])
    return held - masked, held


def run(cfg: dict) -> dict:
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything comes from the local GGUF
    check_installed()
    import kvpress
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, pipeline

    from .. import models
    from ..errors import LocalkvError
    from ..llama import Model, init_backend
    from .quality import MAX_TOKENS, depths_for
    from .tasks import make_sample

    name = cfg["policy"].removeprefix(PREFIX)
    if name not in PRESSES:
        raise LocalkvError(f"kvpress has no press for '{name}': choose from {', '.join(PRESSES)}")
    if cfg["setting"] not in ("aware", "agnostic"):
        raise LocalkvError("the kvpress anchor runs the aware and agnostic settings")
    torch.set_num_threads(cfg.get("threads") or os.cpu_count() or 1)
    gguf = Path(models.resolve(cfg.get("model")))
    init_backend()
    tokenizer_model = Model(str(gguf), n_gpu_layers=0)  # llama.cpp's tokenizer sizes the samples, as for ours
    path = _converted(gguf)
    attn = "eager" if name == "h2o" else "sdpa"  # ObservedAttentionPress reads the attention weights
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn)
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=AutoTokenizer.from_pretrained(path),
                    device="cpu")

    results = []
    t0 = time.time()
    for i, depth in enumerate(depths_for(cfg["samples"])):
        s = make_sample(cfg["task"], cfg["length"], depth, cfg.get("seed", 0) * 1000 + i, tokenizer_model.tokenize)
        if cfg["setting"] == "aware":
            context, question = s.context + "\n\n" + s.question, ""
        else:
            context, question = s.context, "\n\n" + s.question
        n_ctx = pipe.preprocess(context, questions=[question], answer_prefix=s.answer_prefix,
                                max_context_length=10**9)["context_ids"].shape[1]
        press = make_press(kvpress, name, compression_ratio(cfg["budget"], n_ctx)) if PRESSES[name] else None
        cache = DynamicCache()
        with torch.inference_mode():
            out = pipe(context, question=question, answer_prefix=s.answer_prefix, press=press, cache=cache,
                       max_new_tokens=MAX_TOKENS.get(s.task, 24))["answer"]
        kept = cache.layers[0].keys.shape[2]
        entries, held = _entries(model, cache)
        results.append({"depth": depth, "score": s.score(out), "output": out[:200], "expected": s.expected,
                        "prompt_tokens": n_ctx, "kv_tokens_kept": kept, "kv_bytes_allocated": _kv_bytes(cache),
                        "kv_entries_kept": entries, "kv_bytes_kept": _kv_bytes(cache) * entries // max(held, 1)})
    scores = [r["score"] for r in results]
    return {"accuracy": sum(scores) / len(scores), "samples": results, "seconds": round(time.time() - t0, 1),
            "kvpress_version": version("kvpress")}


if __name__ == "__main__":
    worker_main(run)
