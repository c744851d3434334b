"""Greedy tokens and logits of the default model, computed with llama_cpp's own API only.

Run against an unpatched llama-cpp-python build once to record the reference
(scripts/record_upstream_reference.py); the tests run the same function on the
patched build and compare: with compression off, the patch must change nothing.
"""
from __future__ import annotations

import ctypes
import hashlib

import numpy as np

PROMPT = "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n"
N_STEPS = 12
_quiet = None
TOP = 32


def run(model_path: str, n_threads: int = 2) -> dict:
    import llama_cpp.llama_cpp as ll

    global _quiet
    _quiet = ll.llama_log_callback(lambda *a: None)  # kept referenced: C calls it later
    ll.llama_log_set(_quiet, ctypes.c_void_p(0))
    ll.llama_backend_init()
    mp = ll.llama_model_default_params()
    model = ll.llama_model_load_from_file(model_path.encode(), mp)
    assert model, "model failed to load"
    vocab = ll.llama_model_get_vocab(model)
    n_vocab = ll.llama_vocab_n_tokens(vocab)
    cp = ll.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = 512, 512, 512, 1
    cp.n_threads = cp.n_threads_batch = n_threads
    ctx = ll.llama_init_from_model(model, cp)
    assert ctx, "context failed"

    data = PROMPT.encode()
    buf = (ll.llama_token * 256)()
    n = ll.llama_tokenize(vocab, data, len(data), buf, 256, False, True)
    tokens = list(buf[:n])

    steps = []
    pos = 0
    feed = tokens
    for _ in range(N_STEPS):
        batch = ll.llama_batch_init(len(feed), 0, 1)
        for i, t in enumerate(feed):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = t, pos + i, 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = i == len(feed) - 1
        batch.n_tokens = len(feed)
        assert ll.llama_decode(ctx, batch) == 0
        ll.llama_batch_free(batch)
        pos += len(feed)
        logits = np.ctypeslib.as_array(ll.llama_get_logits_ith(ctx, -1), shape=(n_vocab,)).astype(np.float32).copy()
        top = np.argsort(-logits, kind="stable")[:TOP]
        nxt = int(top[0])
        steps.append({"token": nxt, "top_ids": top.tolist(), "top_logits": logits[top].tolist(),
                      "sha256": hashlib.sha256(logits.tobytes()).hexdigest()})
        feed = [nxt]

    ll.llama_free(ctx)
    ll.llama_model_free(model)
    return {"prompt_tokens": tokens, "steps": steps}


def cpu_signature() -> str:
    """What makes CPU float results comparable bit for bit: the model name and the flag set."""
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return "unknown"
    model = next((l.split(":", 1)[1].strip() for l in text.splitlines() if l.startswith("model name")), "")
    flags = next((l.split(":", 1)[1].strip() for l in text.splitlines() if l.startswith("flags")), "")
    return hashlib.sha256(f"{model}|{flags}".encode()).hexdigest()[:16]
