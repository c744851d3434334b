from dataclasses import dataclass

from .base import Policy


@dataclass
class Full(Policy):
    """No compression: every token stays (llama.cpp's own cache, unpatched path)."""

    name = "full"
    summary = "no compression: the plain llama.cpp cache"
    compresses = False

    sinks: int = 0
    window: int = 0

    def score(self, view):  # never called: the engine does not compress with this policy
        raise AssertionError("full does not compress")
