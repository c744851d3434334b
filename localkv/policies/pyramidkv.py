from dataclasses import dataclass

from ..errors import LocalkvError
from .base import Range
from .snapkv import SnapKV


@dataclass
class PyramidKV(SnapKV):
    """PyramidKV (Cai et al., 2024, arXiv 2406.02069): SnapKV with budgets shrinking up the layers.

    Lower layers attend broadly and get more tokens, upper layers fewer: the
    capacities fall linearly from layer 0 to the last layer, averaging the
    budget. Beyond the window, the top layer gets 1/beta of the mean and the
    bottom layer the rest of twice the mean (the authors' reference code,
    beta = 20). Selection inside a layer is SnapKV's.
    """

    name = "pyramidkv"
    summary = "SnapKV selection with budgets decreasing linearly from lower to upper layers"

    ranges = {"beta": Range(1, 1e6)}

    beta: int = 20

    def min_budget(self):
        return self.sinks + self.window + 1  # each layer keeps something beyond its window

    def capacities(self, budget, n_layers):
        if n_layers == 1:
            return [budget]
        if budget < self.window + 1:
            # what validate() refuses; checked here too, as the loop below could never settle the total
            raise LocalkvError(f"budget {budget} leaves pyramidkv nothing beyond its window {self.window}")
        free = budget - self.window
        low = free / self.beta
        high = 2 * free - low
        step = (high - low) / (n_layers - 1)
        floor = self.window + 1  # every layer keeps at least one token beyond its window
        caps = [max(floor, self.window + int(round(high - i * step))) for i in range(n_layers)]
        # rounding and the floor drift the total: settle it on the lowest layers so the average is exact
        drift = budget * n_layers - sum(caps)
        i = 0
        while drift != 0:
            j = i % n_layers
            if drift > 0:
                caps[j] += 1
                drift -= 1
            elif caps[j] > floor:
                caps[j] -= 1
                drift += 1
            i += 1
        return caps
