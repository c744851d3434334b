"""KL divergence and perplexity against the full cache on long natural text (what llama.cpp's maintainers use).

Text: the license texts of Debian's base-files package (/usr/share/common-licenses),
present on every Debian machine: about 60K tokens of plain English. For a context
length L, the first L tokens are fed (compressed by the policy as they go), then the
next `eval` tokens are scored teacher-forced: the mean KL(full || policy) of the
next-token distributions, the perplexity, and how often the top token agrees with
the full cache's. The full cache's distributions are computed once per (model, L)
and kept next to the results.

Worker: `python -m localkv.bench.kl < config.json`.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from ..fsutil import atomic_write
from .common import worker_main

TEXT_DIR = Path("/usr/share/common-licenses")
TEXT_FILES = ("GPL-3", "GPL-2", "LGPL-2.1", "Apache-2.0", "MPL-2.0", "GFDL-1.3", "MPL-1.1", "LGPL-2", "GPL-1",
              "CC0-1.0", "Artistic", "LGPL-3", "GFDL-1.2")


def corpus() -> str:
    from ..errors import LocalkvError
    parts = []
    for name in TEXT_FILES:
        p = TEXT_DIR / name
        if p.exists():
            parts.append(p.read_text(encoding="utf-8", errors="replace"))
    if not parts:
        raise LocalkvError(f"no text in {TEXT_DIR} (Debian's base-files package ships it)")
    return "\n\n".join(parts)


def run(cfg: dict) -> dict:
    from ..engine import Engine

    length, n_eval = cfg["length"], cfg["eval"]
    ref_dir = Path(cfg["ref_dir"])
    ref_dir.mkdir(parents=True, exist_ok=True)

    def engine(policy, budget, ctk="f16", ctv="f16"):
        return Engine(cfg.get("model"), policy=policy, budget=budget,
                      policy_args=cfg.get("policy_args") if policy == cfg["policy"] else None,
                      prefill_budget=cfg.get("prefill_budget") if policy != "full" else None,
                      ctx=length + n_eval + 64 if policy == "full" else None, chunk=cfg.get("chunk", 256),
                      cache_type_k=ctk, cache_type_v=ctv, gpu_layers=cfg.get("gpu_layers", -1))

    with engine("full", None) as probe:
        tokens = probe.model.tokenize(corpus())
        model_id = hashlib.sha256(probe.model_path.encode()).hexdigest()[:12]
    from ..errors import LocalkvError
    if len(tokens) < length + n_eval + 1:
        raise LocalkvError(f"the text has {len(tokens)} tokens, fewer than {length + n_eval + 1}")
    ctx_tokens, eval_tokens = tokens[:length], tokens[length:length + n_eval + 1]

    ref_path = ref_dir / f"full-{model_id}-{length}-{n_eval}.npy"
    if ref_path.exists():
        ref = np.load(ref_path)
    else:
        with engine("full", None) as eng:
            eng.feed(ctx_tokens, want_logits=False)
            ref = eng.log_probs(eval_tokens[:-1]).astype(np.float16)
        atomic_write(ref_path, lambda f: np.save(f, ref), binary=True)
    ref = ref.astype(np.float64)

    # the reference is always the full f16 cache; a quantized full cache (an anchor) is measured against it
    kv = (cfg.get("ctk", "f16"), cfg.get("ctv", "f16"))
    if cfg["policy"] == "full" and kv == ("f16", "f16"):
        got = ref
    else:
        with engine(cfg["policy"], cfg["budget"], *kv) as eng:
            eng.feed(ctx_tokens, want_logits=False)
            got = eng.log_probs(eval_tokens[:-1]).astype(np.float64)
    p = np.exp(ref)
    kl = (p * (ref - got)).sum(axis=1)
    nxt = np.array(eval_tokens[1:])
    nll = -got[np.arange(len(nxt)), nxt]
    return {"kl_mean": float(kl.mean()), "kl_p99": float(np.percentile(kl, 99)),
            "ppl": float(np.exp(nll.mean())), "ppl_full": float(np.exp(-ref[np.arange(len(nxt)), nxt].mean())),
            "top1_agree": float((got.argmax(1) == ref.argmax(1)).mean())}


if __name__ == "__main__":
    worker_main(run)
