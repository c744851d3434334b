from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import LocalkvError
from ..profiles import PROFILE_KIND, inference_scores, read_profile
from .base import Range
from .snapkv import SnapKV


@dataclass
class SurfaceLogicKV(SnapKV):
    """SurfaceLogicKV (Li and Song, 2025, arXiv 2508.15806): per-(layer, KV head) budgets from head behaviour.

    Stage one (`localkv calibrate`, once per model file): on local needle probes every query head gets a
    surface-memorization score (its top attended position is in the needle and holds the token being
    copied) and a logic-construction score (attention its top-|needle| positions put on the needle); see
    localkv.calibrate. The inference score INFsc of a (layer, KV head) is w_surface x surface + w_logic x
    logic summed over the head's GQA group, normalised to sum to 1 over all (layer, KV head)s.
    Stage two: with B' = budget - window, every (layer, KV head) gets window + B' - B'/beta, and a pool of
    (B'/beta) x layers x KV heads is shared in proportion to INFsc (beta = 1.5, HeadKV's); rounding is settled
    by largest remainder, so the capacities add up to budget x layers x KV heads exactly. Inside each head,
    SnapKV's selection (window 32, max-pool kernel 7) up to the head's own capacity.
    The paper's formulas are not public: this is the reading in shared/research/policies.md. Choices made
    here: teacher-forced answers (the greedy token decides a copy), group scores summed, weights 1 and 1.
    `profile`: a profile file to use instead of the model's own (the user's calibration, else the one in
    localkv/data/profiles, else calibrated on first use and saved in the user cache).
    """

    name = "surfacelogickv"
    summary = "per-head budgets from calibrated needle-probe head scores (surface + logic), SnapKV in each head"

    not_arguments = ("adaptive", "adaptive_floor")  # the profile sets the per-head budgets

    # beta 1 shares the whole budget by score
    ranges = {"beta": Range(1.0, 1e6), "w_surface": Range(0.0, 1e6), "w_logic": Range(0.0, 1e6)}
    file_arguments = ("profile",)

    beta: float = 1.5
    w_surface: float = 1.0
    w_logic: float = 1.0
    profile: str = ""

    def validate(self, budget):
        super().validate(budget)
        if self.adaptive:
            raise LocalkvError("surfacelogickv sets its per-head budgets from its profile: adaptive does not apply")
        if self.w_surface + self.w_logic <= 0:
            raise LocalkvError("w_surface and w_logic must not both be 0")

    def profile_kinds(self):
        return set() if self.profile else {PROFILE_KIND}

    def prepare(self, engine):
        if self.profile:
            shape = (len(engine.kv_layers), engine.shape.n_head)
            prof, path = read_profile(Path(self.profile).expanduser(), shape=shape), Path(self.profile)
        else:
            prof, path = engine.profile(PROFILE_KIND)
        self.profile_path = str(path)
        self.scores = inference_scores(prof["surface"], prof["logic"], list(engine.kv_heads), self.w_surface,
                                       self.w_logic)

    def head_capacities(self, budget, heads):
        scores = getattr(self, "scores", None)
        if scores is None or len(scores) != sum(heads):
            raise LocalkvError("surfacelogickv has no head scores for this model: run `localkv calibrate`")
        return surface_logic_capacities(scores, budget, self.window, self.beta)


def surface_logic_capacities(scores: np.ndarray, budget: int, window: int, beta: float) -> list[int]:
    """window + floor + pool x score per (layer, KV head), rounded so that they sum to budget x heads exactly."""
    scores = np.asarray(scores, dtype=np.float64)
    n = len(scores)
    free = budget - window
    exact = window + free - free / beta + (free / beta) * n * scores
    caps = np.floor(exact).astype(np.int64)
    short = budget * n - int(caps.sum())
    # largest remainders first (ties: the earlier head)
    for h in np.argsort(-(exact - caps), kind="stable")[:short]:
        caps[h] += 1
    return caps.tolist()
