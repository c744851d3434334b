from dataclasses import dataclass

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

    beta: int = 20

    def capacities(self, budget, n_layers):
        if n_layers == 1:
            return [budget]
        free = budget - self.window
        low = free / self.beta
        high = 2 * free - low
        step = (high - low) / (n_layers - 1)
        caps = [self.window + int(round(high - i * step)) for i in range(n_layers)]
        # rounding drift goes to the lowest layers so the average is the budget exactly
        drift = budget * n_layers - sum(caps)
        for i in range(abs(drift)):
            caps[i % n_layers] += 1 if drift > 0 else -1
        return [max(c, self.window + 1) for c in caps]
