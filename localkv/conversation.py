"""What a context's cache holds, seen as a conversation: its tokens, words, text and replay state.

The engine feeds tokens and the cache keeps some of them; this records what was fed: the position of the next
token, which positions form one word (policies keep words whole), the rendered text a chat continues after,
and, for a policy that scores by reconstruction (KVzip), the tokens not replayed yet and how a replay starts.
"""
from __future__ import annotations

from .words import WordIndex

# stand-ins for the template's user and assistant turns, found again in the rendered text
_MARKS = ("@@LKV1@@", "@@LKV2@@", "@@LKV3@@")


class Conversation:
    """One conversation in one cache (positions 0, 1, 2, ... of one sequence)."""

    def __init__(self, model):
        self.model = model
        self.n_past = 0  # tokens fed so far: the next position
        self.words = WordIndex(model.piece)
        self.history_text = ""  # the rendered text the cache holds ("" when a chat cannot continue after it)
        # reconstruction (KVzip): the tokens at the end of the cache not replayed yet, and the last replayed
        # span's final tokens (a later replay starts from them)
        self.unscored: list[int] = []
        self.span_tail: list[int] = []
        self._replay_turn: tuple[str, str] | None = None  # the template's text around a user turn (per model)

    def reset(self) -> None:
        """Nothing fed yet."""
        self.n_past = 0
        self.words.reset()
        self.history_text = ""
        self.unscored, self.span_tail = [], []

    def mark(self) -> tuple:
        """What the conversation is now; restore(mark) forgets what was fed after it (a turn rolled back)."""
        return self.n_past, self.words.mark(), self.history_text, list(self.unscored), list(self.span_tail)

    def restore(self, mark: tuple) -> None:
        self.n_past, words, self.history_text, unscored, span_tail = mark
        self.words.restore(words)
        self.unscored, self.span_tail = list(unscored), list(span_tail)

    def append(self, tokens: list[int], replayed_later: bool) -> None:
        """`tokens` were fed after the rest; `replayed_later`: a reconstruction will score them."""
        self.words.extend(tokens)
        self.n_past += len(tokens)
        if replayed_later:
            self.unscored.extend(tokens)

    def continues(self, text: str) -> bool:
        """Whether `text` continues what the cache holds (a chat's next turn: only the new part is fed)."""
        return bool(self.history_text) and text.startswith(self.history_text)

    def replayed(self, span: list[int]) -> None:
        """`span` was replayed and scored: the next replay starts from its final tokens."""
        self.span_tail = span[-8:]
        self.unscored = []

    def replay_prefix(self) -> list[int]:
        """The replay's instruction in a user turn of the model's template, then the assistant prefix."""
        opening, closing = self._template_turn()
        if self.span_tail:
            tail = b"".join(self.model.piece(t) for t in self.span_tail).decode("utf-8", errors="replace")
            instruction = f'Repeat the part of the previous context exactly, starting with "{tail}".'
        else:
            instruction = "Repeat the previous context exactly."
        return self.model.tokenize(opening + instruction + closing, parse_special=True)

    def _template_turn(self) -> tuple[str, str]:
        """The text the model's template puts before a user turn (after an assistant's) and after it."""
        if self._replay_turn is None:
            text = self.model.chat_prompt([{"role": "user", "content": _MARKS[0]},
                                           {"role": "assistant", "content": _MARKS[1]},
                                           {"role": "user", "content": _MARKS[2]}])
            at = [text.find(m) for m in _MARKS]
            if min(at) >= 0 and at[0] < at[1] < at[2]:
                self._replay_turn = (text[at[1] + len(_MARKS[1]):at[2]], text[at[2] + len(_MARKS[2]):])
            else:  # no usable template: a plain transcript
                self._replay_turn = ("\n\nuser: ", "\nassistant: ")
        return self._replay_turn
