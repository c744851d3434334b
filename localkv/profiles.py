"""Calibration profiles: where they live, how they are read, checked and written, and what their numbers give.

A profile is a JSON file keyed by the model file's sha256: the user's own (calibrated by `localkv calibrate`,
in the user cache) is found before the one shipped with the package. Three kinds: SurfaceLogicKV's head scores,
POD's layer similarities and KVzap's surrogate weights. Policies read profiles through this module; making
one is localkv.calibrate's (KVzap's surrogate: localkv.surrogate's), which sit above the policies and the engine.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import LocalkvError
from .fsutil import atomic_write

PROFILE_FORMAT = 1
PROFILE_KIND = "surfacelogickv"
POD_KIND = "pod"
KVZAP_KIND = "kvzap"
SHIPPED_DIR = Path(__file__).resolve().parent / "data" / "profiles"  # package data
DEFAULT_POD_DELTA = 0.6  # the paper uses 0.5; on the default model, training-free, 0.6 is the most sharing that kept
# every needle and a KL under 0.02 at 4K (docs/results.md, "POD: attention shared across layers")


# ---------------------------------------------------------------- what the numbers give


def inference_scores(surface: np.ndarray, logic: np.ndarray, kv_heads: list[int], w_surface: float,
                     w_logic: float) -> np.ndarray:
    """INFsc of every (layer, KV head), layer after layer, summing to 1: the weighted surface and logic scores of
    each head's GQA group. All zero (no head ever looked at a needle) gives every head the same score."""
    per_kv = []
    for layer, h_kv in enumerate(kv_heads):
        mix = w_surface * np.asarray(surface[layer], dtype=np.float64) + w_logic * np.asarray(logic[layer], dtype=np.float64)
        per_kv.append(mix.reshape(h_kv, -1).sum(axis=1))
    s = np.concatenate(per_kv)
    return s / s.sum() if s.sum() > 0 else np.full(len(s), 1.0 / len(s))


def kv_scores(profile: dict, w_surface: float = 1.0, w_logic: float = 1.0) -> np.ndarray:
    """[layers, KV heads] INFsc of a profile (rows of equal width: every layer has the same KV heads here)."""
    kv = list(profile["kv_heads"])
    return inference_scores(profile["surface"], profile["logic"], kv, w_surface, w_logic).reshape(len(kv), -1)


def pod_blocks(similarity: np.ndarray, delta: float) -> np.ndarray:
    """leaders [n_layers, n_kv]: the first layer of each (layer, KV head)'s block (the layer itself for a leader).

    similarity [n_layers - 1, n_kv]: row l compares layers l and l + 1. Greedy per head, top down: layer 0 starts
    a block; layer l joins the current one when similarity[l - 1] >= delta, else starts its own."""
    sim = np.asarray(similarity, dtype=np.float64)
    if sim.ndim != 2:
        raise LocalkvError(f"POD similarity must be [layers - 1, KV heads], got shape {sim.shape}")
    leaders = np.zeros((sim.shape[0] + 1, sim.shape[1]), dtype=np.int64)
    for layer in range(1, len(leaders)):
        leaders[layer] = np.where(sim[layer - 1] >= delta, leaders[layer - 1], layer)
    return leaders


def check_pod_delta(delta: float) -> float:
    """delta is a similarity: outside [0, 1] (or NaN) it would make every layer a leader or every one a
    follower without saying so."""
    if not 0.0 <= float(delta) <= 1.0:
        raise LocalkvError(f"--delta must be between 0 and 1 (the similarity at which a layer joins the block above "
                           f"it), got {delta}")
    return float(delta)


# ---------------------------------------------------------------- kinds


@dataclass(frozen=True)
class ProfileKind:
    """What differs between kinds of profile: how one is checked, which arrays it holds, how to rebuild it."""
    check: Callable[[dict], tuple[int, int] | None]  # the [layers, heads] shape, arrays converted; None: invalid
    arrays: tuple[str, ...]   # float arrays, rounded to 6 digits when written
    ints: tuple[str, ...]     # integer arrays
    command: str              # what rebuilds it
    heads: str                # what the second dimension counts, for messages
    significant: bool = False  # arrays rounded to 6 significant digits (weights of any scale), not 6 decimals


def _check_surfacelogickv(data: dict) -> tuple[int, int] | None:
    """Head scores: two equal [layers, query heads] arrays of finite non-negative numbers."""
    surface = np.asarray(data["surface"], dtype=np.float64)
    logic = np.asarray(data["logic"], dtype=np.float64)
    ok = surface.ndim == 2 and surface.shape == logic.shape and np.isfinite(surface).all() \
        and np.isfinite(logic).all() and (surface >= 0).all() and (logic >= 0).all()
    if not ok:
        return None
    data["surface"], data["logic"] = surface, logic
    return surface.shape


def _check_pod(data: dict) -> tuple[int, int] | None:
    """Similarities in [0, 1] between each pair of consecutive layers, and the blocks they give at the delta."""
    sim = np.asarray(data["similarity"], dtype=np.float64)
    leaders = np.asarray(data["leaders"])
    kv = [int(h) for h in data["kv_heads"]]
    n_layer, delta = int(data["n_layer"]), float(data["delta"])
    ok = sim.ndim == 2 and n_layer >= 2 and sim.shape[0] == n_layer - 1 and len(kv) == n_layer \
        and set(kv) == {sim.shape[1]} and np.isfinite(sim).all() and (sim >= 0).all() and (sim <= 1).all() \
        and 0 <= delta <= 1 and leaders.dtype.kind == "i" and leaders.shape == (n_layer, sim.shape[1])
    # the leaders are the ones the similarity gives at delta (a hand-edited file that says otherwise is wrong)
    if not ok or not (leaders == pod_blocks(sim, delta)).all():
        return None
    data["similarity"], data["leaders"] = sim, leaders.astype(np.int64)
    return n_layer, sim.shape[1]


def _check_kvzap(data: dict) -> tuple[int, int] | None:
    """KVzap's surrogate: per layer a [KV heads, embedding] linear map and its [KV heads] bias, all finite."""
    weights = np.asarray(data["weights"], dtype=np.float32)
    bias = np.asarray(data["bias"], dtype=np.float32)
    ok = weights.ndim == 3 and bias.shape == weights.shape[:2] and int(data["n_embd"]) == weights.shape[2] \
        and np.isfinite(weights).all() and np.isfinite(bias).all()
    if not ok:
        return None
    data["weights"], data["bias"] = weights, bias
    return weights.shape[0], weights.shape[1]


PROFILE_KINDS: dict[str, ProfileKind] = {
    PROFILE_KIND: ProfileKind(_check_surfacelogickv, ("surface", "logic"), (), "localkv calibrate", "heads"),
    POD_KIND: ProfileKind(_check_pod, ("similarity",), ("leaders",), "localkv calibrate --policy pod", "KV heads"),
    KVZAP_KIND: ProfileKind(_check_kvzap, ("weights", "bias"), (), "localkv calibrate --policy kvzap", "KV heads",
                            significant=True),
}


def _kind(kind: str) -> ProfileKind:
    """A kind's description; an unknown kind is a caller's mistake, said in one line."""
    if kind not in PROFILE_KINDS:
        raise LocalkvError(f"no profiles of kind '{kind}' (known: {', '.join(PROFILE_KINDS)})")
    return PROFILE_KINDS[kind]


# ---------------------------------------------------------------- files


def profile_name(sha256: str, kind: str = PROFILE_KIND) -> str:
    return f"{kind}-{sha256[:16]}.json"


def user_profile_path(sha256: str, kind: str = PROFILE_KIND) -> Path:
    from .models import cache_dir
    return cache_dir().parent / "profiles" / profile_name(sha256, kind)


def shipped_profile_path(sha256: str, kind: str = PROFILE_KIND) -> Path:
    return SHIPPED_DIR / profile_name(sha256, kind)


def find_profile(sha256: str, kind: str = PROFILE_KIND) -> Path | None:
    """The user's own calibration first, else the one shipped in localkv/data/profiles."""
    for p in (user_profile_path(sha256, kind), shipped_profile_path(sha256, kind)):
        if p.is_file():
            return p
    return None


def read_profile(path: Path, sha256: str | None = None, shape: tuple[int, int] | None = None,
                 kind: str = PROFILE_KIND) -> dict:
    """A profile of `kind`, checked: format, the kind's own arrays, model hash and [layers, heads] shape when
    given."""
    spec = _kind(kind)
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LocalkvError(f"no profile at {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LocalkvError(f"profile {path} is unreadable ({e.__class__.__name__}): delete it or run "
                           f"`{spec.command}` again") from None
    try:
        got = data["format"] == PROFILE_FORMAT and data["kind"] == kind and spec.check(data)
    except (KeyError, TypeError, ValueError, IndexError):
        got = None
    if not got:
        raise LocalkvError(f"profile {path} is not a valid {kind} profile (format {PROFILE_FORMAT}): "
                           f"delete it or run `{spec.command}` again")
    if sha256 is not None and data.get("model_sha256") != sha256:
        raise LocalkvError(f"profile {path} was calibrated for another model file "
                           f"(sha256 {str(data.get('model_sha256'))[:16]}..., this one {sha256[:16]}...)")
    if shape is not None and tuple(got) != tuple(shape):
        raise LocalkvError(f"profile {path} has {got[0]} layers x {got[1]} {spec.heads}, the model "
                           f"{shape[0]} x {shape[1]}")
    return data


def read_pod_profile(path: Path, sha256: str | None = None, shape: tuple[int, int] | None = None) -> dict:
    """A POD profile, checked like every kind; shape is the model's [layers, KV heads]."""
    return read_profile(path, sha256, shape, kind=POD_KIND)


def write_profile(profile: dict, path: Path) -> None:
    """Write atomically: a crash never leaves half a profile."""
    spec = _kind(profile.get("kind", PROFILE_KIND))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out = dict(profile)
    for key in spec.arrays:
        a = np.asarray(profile[key], dtype=np.float64)
        if spec.significant:
            scale = 10.0 ** (5 - np.floor(np.log10(np.maximum(np.abs(a), 1e-30))))
            out[key] = (np.round(a * scale) / scale).tolist()
        else:
            out[key] = a.round(6).tolist()
    for key in spec.ints:
        out[key] = np.asarray(profile[key]).astype(int).tolist()

    def dump(f):
        json.dump(out, f, indent=1)
        f.write("\n")
    atomic_write(path, dump)
