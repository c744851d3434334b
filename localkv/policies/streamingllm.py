from dataclasses import dataclass

from .base import Policy


@dataclass
class StreamingLLM(Policy):
    """StreamingLLM (Xiao et al., 2023, arXiv 2309.17453): attention sinks plus the most recent tokens.

    Keeps the first `sinks` tokens and fills the rest of the budget with the most
    recent ones; needs no statistics. Paper default: 4 sinks.
    """

    name = "streamingllm"
    summary = "the first tokens (attention sinks) plus the most recent ones"

    sinks: int = 4
    window: int = 0  # the recent part is whatever the budget leaves after the sinks

    def score(self, view):
        return view.positions.astype(float)  # newer is better
