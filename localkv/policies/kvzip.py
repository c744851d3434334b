from dataclasses import dataclass

from .. import capi
from .base import FRACTION, PREFILL, Policy, Range, select_one_threshold


@dataclass
class KVzip(Policy):
    """KVzip (Kim et al., 2025, arXiv 2505.23416): keep what the model needs to rebuild the context.

    After a span of at most `replay_chunk` tokens is read (a prompt chunk, a chat turn), the engine
    feeds a replay: an instruction to repeat the previous context (for later spans: the part starting
    with the previous span's last 8 tokens), the template's assistant prefix, then the span's own tokens,
    teacher-forced. Its queries see only the first `sinks` tokens, the span and themselves (hidden
    positions), and each (layer, KV head, token) of the span scores the maximum attention it gets over
    the replay's queries and its GQA group's query heads (STAT_MAX, computed in the graph). The replay
    then leaves the cache and positions go on as if it had never been there. The scores do not depend
    on any question, so a fact survives a compression that happens before it is asked for.

    Selection: one threshold over every layer and KV head (the paper's default: heads keep different
    numbers of tokens, the total is the uniform split's), each head keeping at least `head_floor` x its
    capacity; `layerwise=true` is the top-k per KV head. While decoding, tokens not yet replayed score
    the largest attention a decoded query gave them, and are replayed with the next span.
    """

    name = "kvzip"
    summary = "query-agnostic: attention of a replay that rebuilds the context, one threshold over all heads"
    reconstructs = True  # (a class attribute over Policy's property)

    ranges = {"replay_chunk": Range(16, 1 << 16), "head_floor": FRACTION}

    sinks: int = 4
    window: int = 16
    replay_chunk: int = 2048   # tokens rebuilt by one replay (KVzip: about 2K); a field here, an argument
    layerwise: bool = False    # top-k per KV head instead of one threshold over all heads and layers
    head_floor: float = 0.1    # global threshold: each head keeps at least this fraction of its capacity

    def needs(self, phase):
        return set() if phase == PREFILL else {capi.STAT_MAX}

    def obs_window(self, phase):
        return 1

    @property
    def shares_model_budget(self):
        return not self.layerwise

    def score(self, view):
        return view.stat(capi.STAT_MAX)

    def select_layers(self, views):
        if self.layerwise or not views:
            return super().select_layers(views)
        return select_one_threshold(self, views, self.head_floor)
