"""A progress line while a long prompt is read: tokens read of the total, tokens/s, time left.

Shown on a terminal only (never in a pipe, a file or --json output), and only for a prompt of a few chunks or
more: a short prompt is read before a line would be worth drawing. Engine.generate(on_progress=...) calls it
after every chunk; done() clears the line.
"""
from __future__ import annotations

import time

MIN_CHUNKS = 3  # a prompt of fewer chunks than this gets no line


class PrefillProgress:
    def __init__(self, stream, min_tokens: int):
        self.stream = stream
        self.min_tokens = min_tokens
        self.shown = False
        self.t0 = time.perf_counter()
        self.enabled = bool(getattr(stream, "isatty", lambda: False)())

    @classmethod
    def for_engine(cls, engine, stream) -> "PrefillProgress":
        return cls(stream, MIN_CHUNKS * engine.chunk)

    def __call__(self, read: int, total: int) -> None:
        if not self.enabled or total < self.min_tokens:
            return
        elapsed = time.perf_counter() - self.t0
        rate = read / elapsed if elapsed > 0 else 0.0
        left = f", {(total - read) / rate:.0f} s left" if rate > 0 and read < total else ""
        self.stream.write(f"\r\x1b[Kreading the prompt: {read:,} / {total:,} tokens, {rate:.0f} tok/s{left}")
        self.stream.flush()
        self.shown = True

    def done(self) -> None:
        if self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.shown = False
