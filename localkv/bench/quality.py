"""Quality of a policy at a budget on the synthetic tasks, in three settings.

- aware:    the question is part of the compressed prompt (one-shot questions)
- agnostic: the document is fed and compressed before the question is seen
            (every later turn of a chat; how kvpress measures)
- twoturn:  an unrelated first question and its answer, then the task's question
- chat:     the document told over several user turns, each answered by the model
            (greedy, short), then the question in a turn of its own: a fact from an
            earlier turn of `localkv chat`, with every turn compressed as it comes

Worker: `python -m localkv.bench.quality < config.json` runs every sample of one
configuration with one engine and prints per-sample scores as JSON.
"""
from __future__ import annotations

import time

from .common import worker_main

SETTINGS = ("aware", "agnostic", "twoturn", "chat")
FIRST_TURN = "In one short sentence, what kind of text is the above?"
MAX_TOKENS = {"cwe": 80, "fwe": 40, "vt": 48, "niah_multivalue": 64, "niah_multiquery": 48}
FACT_MAX_TOKENS = 40  # no answer prefix: the reply restates the question before the fact
CHAT_TURNS = 4
CHAT_OPENERS = ("Here are my notes from today.", "More of my notes.", "Continuing my notes.",
                "The last part of my notes.")
CHAT_REPLY_TOKENS = 16


def chat_turns(context: str, n: int = CHAT_TURNS) -> list[str]:
    """The document cut at sentence ends into n user turns of about equal length, each opened as a note."""
    cuts, at = [], 0
    for k in range(1, n):
        end = context.find(". ", max(at, len(context) * k // n))
        if end < 0:
            break
        cuts.append(context[at:end + 1].strip())
        at = end + 2
    cuts.append(context[at:].strip())
    return [f"{CHAT_OPENERS[min(i, len(CHAT_OPENERS) - 1)]} {part}" for i, part in enumerate(cuts) if part]


def depths_for(samples: int) -> list[float]:
    """Needle depths spread evenly over the document, ends included."""
    if samples == 1:
        return [0.5]
    return [round(i / (samples - 1) * 0.9 + 0.05, 3) for i in range(samples)]


def quality_configs(policies: list[str], tasks: list[str], settings: list[str], lengths: list[int],
                    budgets: list[int], base: dict, policy_args: dict, prefill_budget: int | None,
                    anchors: list[str], kvpress: list[str]) -> list[dict]:
    """Every run of a quality grid: our policies, the full cache quantized by llama.cpp (`anchors`, KV types)
    and kvpress's presses for the `kvpress` policies, for each task and setting."""
    from .common import anchor_configs, grid, split_spec
    from .kvpress_anchor import PREFIX
    configs = []
    for task in tasks:
        for st in settings:
            cell = {**base, "task": task, "setting": st}
            for cfg in grid(policies, budgets, lengths, cell, prefill_budget):
                cfg["policy"], own = split_spec(cfg["policy"])  # a variant: snapkv:adaptive=true
                cfg["policy_args"] = {**policy_args, **own} if cfg["policy"] != "full" else {}
                configs.append(cfg)
            configs += [{**cfg, "policy_args": {}} for cfg in anchor_configs(cell, anchors, lengths)]
            # kvpress on transformers: same prompts and budgets (its pipeline has no second turn, no chat)
            if st in ("aware", "agnostic"):
                kv_base = {k: cell[k] for k in ("bench", "model", "task", "setting", "samples", "seed")}
                for cfg in grid(kvpress, budgets, lengths, kv_base):
                    cfg.pop("prefill_budget")
                    configs.append({**cfg, "worker": "kvpress_anchor", "policy": PREFIX + cfg["policy"]})
    return configs


def run(cfg: dict) -> dict:
    from ..engine import Engine
    from .tasks import make_sample

    policy = cfg["policy"]
    room = 1024 if cfg["setting"] == "chat" else 512  # the full cache's context: the turns and the answer too
    eng = Engine(cfg.get("model"), policy=policy, budget=cfg.get("budget"), policy_args=cfg.get("policy_args"),
                 prefill_budget=cfg.get("prefill_budget"),
                 ctx=cfg["length"] + room if policy == "full" else None, chunk=cfg.get("chunk", 256),
                 cache_type_k=cfg.get("ctk", "f16"), cache_type_v=cfg.get("ctv", "f16"), gpu_layers=cfg.get("gpu_layers", -1))
    results = []
    t0 = time.time()
    for i, depth in enumerate(depths_for(cfg["samples"])):
        s = make_sample(cfg["task"], cfg["length"], depth, cfg.get("seed", 0) * 1000 + i, eng.model.tokenize)
        max_tokens = MAX_TOKENS.get(s.task, FACT_MAX_TOKENS if s.task.startswith("fact_") else 24)
        setting = cfg["setting"]
        if setting == "chat":
            msgs = []
            for turn in chat_turns(s.context):
                msgs.append({"role": "user", "content": turn})
                r = eng.generate(messages=msgs, max_tokens=CHAT_REPLY_TOKENS, temperature=0,
                                 keep_history=len(msgs) > 1)  # each sample its own conversation
                msgs.append({"role": "assistant", "content": r.text})
            msgs.append({"role": "user", "content": s.question})
            res = eng.generate(messages=msgs, max_tokens=max_tokens, temperature=0, keep_history=True,
                               answer_prefix=" " + s.answer_prefix)
        elif setting == "twoturn":
            first = [{"role": "user", "content": s.context + "\n\n" + FIRST_TURN}]
            r1 = eng.generate(messages=first, max_tokens=24, temperature=0)
            msgs = first + [{"role": "assistant", "content": r1.text}, {"role": "user", "content": s.question}]
            res = eng.generate(messages=msgs, max_tokens=max_tokens, temperature=0, keep_history=True,
                               answer_prefix=" " + s.answer_prefix)
        else:
            msgs = [{"role": "user", "content": s.context + "\n\n" + s.question}]
            res = eng.generate(messages=msgs, max_tokens=max_tokens, temperature=0,
                               answer_prefix=s.answer_prefix,
                               split_before=s.question if setting == "agnostic" else None)
        results.append({"depth": depth, "score": s.score(res.text), "partial": s.partial(res.text),
                        "output": res.text[:200],
                        "expected": s.expected, "prompt_tokens": res.prompt_tokens, "context_tokens": eng.n_past,
                        "kv_bytes_allocated": res.kv_bytes_allocated, "kv_tokens_kept": res.kv_tokens_kept})
    eng.close()
    scores = [r["score"] for r in results]
    return {"accuracy": sum(scores) / len(scores), "samples": results, "seconds": round(time.time() - t0, 1)}


if __name__ == "__main__":
    worker_main(run)
