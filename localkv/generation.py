"""Generation: a reply sampled token by token after the prompt, and what one Engine.generate call reports."""
from __future__ import annotations

import os
import resource
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable

from .llama import Sampler, Utf8Stream


def peak_rss_bytes() -> int:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb if sys.platform == "darwin" else kb * 1024


@dataclass
class GenerationResult:
    text: str
    policy: str
    budget: int | None
    prompt_tokens: int
    generated_tokens: int
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    first_token_latency_s: float
    kv_bytes_allocated: int     # KV buffers llama.cpp holds now (at rest: budget + decode interval at most)
    kv_bytes_prefill: int       # the most the KV buffers held so far (a long prompt's working set)
    kv_bytes_full_f16: int
    kv_tokens_kept: int
    kv_stats_bytes: int
    compute_bytes: int
    peak_rss_bytes: int
    compressions: int
    compress_seconds: float
    compress_bytes: int         # bytes compression moved between host and backend (indices, scores read)
    stop_reason: str
    cache_type_k: str
    cache_type_v: str
    model: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Reply:
    """What one sampling loop produced."""
    text: str
    generated: int                 # tokens sampled
    stop_reason: str               # "eos", "length" or "interrupted"
    first_token_at: float | None   # time.perf_counter() when the first token was sampled (None: none was)
    ended_at: float
    in_cache: bool                 # whether the cache holds the whole reply (a chat's next turn continues it)

    @property
    def decode_tokens_per_s(self) -> float:
        steps = max(self.generated - 1, 0)  # tokens decoded after the first sample: one step() each
        seconds = self.ended_at - self.first_token_at if self.first_token_at is not None else 0.0
        return steps / seconds if steps and seconds > 0 else 0.0


def sample_reply(engine, *, max_tokens: int, temperature: float, seed: int | None, ignore_eos: bool,
                 on_text: Callable[[str], None] | None, should_stop: Callable[[], bool] | None,
                 top_p: float | None = None) -> Reply:
    """Sample after what `engine` was fed, decoding each token (engine.step) until the end of the turn,
    `max_tokens` or `should_stop`; `on_text` receives the text as it comes, whole UTF-8 characters only."""
    sampler = Sampler(temperature, seed if seed is not None else int.from_bytes(os.urandom(4), "little"),
                      **({} if top_p is None else {"top_p": top_p}))
    out = Utf8Stream()
    pieces: list[str] = []

    def emit(piece: str) -> None:
        if piece:
            pieces.append(piece)
            if on_text:
                on_text(piece)
    generated = 0
    stop = "length"
    first_at = None
    unfed = None  # the last sampled token when the reply ended on max_tokens (sampled, never decoded)
    try:
        while generated < max_tokens:
            if should_stop and should_stop():
                stop = "interrupted"
                break
            tok = sampler.sample(engine.ctx)
            if first_at is None:
                first_at = time.perf_counter()
            if engine.model.is_eog(tok) and not ignore_eos:
                stop = "eos"
                break
            emit(out.push(engine.model.piece(tok)))
            generated += 1
            if generated >= max_tokens:
                unfed = tok
                break
            engine.step(tok)
    finally:
        sampler.close()
        ended_at = time.perf_counter()
    in_cache = True
    if unfed is not None:
        # the cache must hold the whole reply, or the next turn of a chat would continue without this token
        if engine.compressing or engine.n_past + 1 <= engine.n_ctx:
            engine.step(unfed)
        else:
            in_cache = False  # no room: the next turn feeds the conversation again
    emit(out.flush())
    return Reply("".join(pieces), generated, stop, first_at, ended_at, in_cache)
