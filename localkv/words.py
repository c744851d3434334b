"""Which tokens belong to the same word, so that policies can keep a word whole.

A fact the tokenizer splits into many pieces ("cobalt-7391" is six tokens for
Qwen2.5: " cobalt", "-", "7", "3", "9", "1") is one whitespace-delimited word.
Token-level top-k keeps the pieces the question attends to most and drops the
others; giving every piece of a word the best score of the word keeps it whole.

A new word starts at a token whose text begins with whitespace, after a token
whose text ends with whitespace, at a special token (no text), and after
`MAX_WORD_TOKENS` tokens (a long run without spaces, such as a base64 blob or
unspaced CJK text, is cut into pieces of that size rather than kept or dropped
whole).
"""
from __future__ import annotations

from typing import Callable

import numpy as np

MAX_WORD_TOKENS = 32


class WordIndex:
    """The word id of every position fed so far (positions 0, 1, 2, ... of one sequence)."""

    def __init__(self, piece: Callable[[int], bytes]):
        self._piece = piece
        self._edges: dict[int, tuple[bool, bool]] = {}  # token -> (starts with space, ends with space or is special)
        self._ids = np.zeros(1024, dtype=np.int64)
        self._n = 0
        self._open_ends = True   # the previous token ended a word
        self._run = 0            # tokens in the current word

    def reset(self) -> None:
        self._n = 0
        self._open_ends = True
        self._run = 0

    def __len__(self) -> int:
        return self._n

    def mark(self) -> tuple[int, bool, int]:
        """Where the index stands: restore() goes back to it after later positions were recorded."""
        return self._n, self._open_ends, self._run

    def restore(self, mark: tuple[int, bool, int]) -> None:
        self._n, self._open_ends, self._run = mark

    def _token_edges(self, token: int) -> tuple[bool, bool]:
        edges = self._edges.get(token)
        if edges is None:
            text = self._piece(token)
            if not text:
                edges = (True, True)  # special tokens stand alone
            else:
                edges = (text[:1].isspace(), text[-1:].isspace())
            self._edges[token] = edges
        return edges

    def extend(self, tokens: list[int]) -> None:
        """Record the next positions' tokens."""
        need = self._n + len(tokens)
        if need > len(self._ids):
            self._ids = np.resize(self._ids, max(need, 2 * len(self._ids)))
        word = self._ids[self._n - 1] if self._n else -1
        for i, tok in enumerate(tokens):
            starts, ends = self._token_edges(tok)
            if starts or self._open_ends or self._run >= MAX_WORD_TOKENS:
                word += 1
                self._run = 0
            self._ids[self._n + i] = word
            self._run += 1
            self._open_ends = ends
        self._n = need

    def of(self, positions: np.ndarray) -> np.ndarray:
        """Word ids for an array of positions (positions not fed yet get ids of their own)."""
        positions = np.asarray(positions, dtype=np.int64)
        inside = (positions >= 0) & (positions < self._n)
        out = np.where(inside, self._ids[np.clip(positions, 0, max(self._n - 1, 0))], -1 - positions)
        return out
