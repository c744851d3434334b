"""Calibration: which attention heads retrieve, measured on local needle probes (SurfaceLogicKV's stage one).

A probe is a seeded haystack of plain prose with one fact (the needle) somewhere in it and a question whose
answer copies the fact's value. The model reads the probe with nothing evicted, then the value's tokens are
fed one by one (teacher forcing); before each, the in-graph statistic STAT_LAST gives every query head's
attention row for the query that predicts the next value token. Per head and step (`step_scores`):

- surface memorization: 1/|needle| when the head's top-1 attended position lies in the needle and holds
  the token the model would generate there (its greedy choice): the head copies;
- logic construction: over the head's top-|needle| attended positions, the attention weight of those in
  the needle, / |needle|: the head gathers the fact without copying it token for token.

The scores are summed over the steps of a probe and averaged over probes, per (layer, query head), and
written as a profile keyed by the model file's sha256 (`localkv calibrate`). The paper's own formulas are not
public; this follows the reading in shared/research/policies.md (HeadKV's retrieval and reasoning heads).
"""
from __future__ import annotations

import datetime
import json
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import LocalkvError

PROFILE_FORMAT = 1
PROFILE_KIND = "surfacelogickv"
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "models" / "profiles"
DEFAULT_PROBES = 24
PROBE_LENGTHS = (500, 1000, 2000)  # tokens of haystack, cycled over the probes

# ---------------------------------------------------------------- probes

_PLACES = ("the lighthouse", "the market square", "the old mill", "the railway yard", "the botanical garden",
           "the observatory", "the fishing pier", "the library annex", "the clock tower", "the salt marsh",
           "the copper mine", "the vineyard terraces")
_EVENTS = ("the workers repainted the railings", "a choir rehearsed until dusk", "the council argued about taxes",
           "children chased gulls along the wall", "a storm knocked out the lamps", "merchants counted their coins",
           "the gardeners planted new hedges", "an engineer inspected the pumps", "the bakers opened before dawn",
           "travellers waited for the ferry", "students sketched the arches", "the caretaker oiled the hinges")
_WHEN = ("On Monday", "Later that week", "In the autumn", "Every evening", "Before the festival", "After the rains",
         "During the long summer", "Early one morning", "At the turn of the year", "Once a month")
_AFTER = ("Nobody remembered why.", "It was a quiet season.", "The town newspaper printed a short note about it.",
          "Most people hardly noticed.", "The routine continued for years.", "Some called it a good omen.")
_THINGS = ("access code", "locker number", "serial tag", "meeting word", "ticket reference", "badge number",
           "recovery phrase", "shipment label")
_OWNERS = ("the north warehouse", "Dr. Okafor", "the harbour office", "Captain Reyes", "the night shift",
           "Ms. Lindqvist", "the archive room", "the pump station")
_WORDS = ("amber", "birch", "cinder", "delta", "ember", "fjord", "garnet", "hazel", "indigo", "jasper", "kestrel",
          "lilac", "mosaic", "nectar", "onyx", "pewter", "quill", "russet", "sable", "tundra")


def _value(kind: int, rng: random.Random) -> str:
    """A fact value of one of several shapes (digits, letters and digits, words, hex, dates)."""
    if kind == 0:
        return str(rng.randint(1000000, 9999999))
    if kind == 1:
        return f"{rng.choice('ABCDEFGHJKLMNPRSTUVWXYZ')}{rng.choice('ABCDEFGHJKLMNPRSTUVWXYZ')}-{rng.randint(1000, 9999)}"
    if kind == 2:
        a, b = rng.sample(_WORDS, 2)
        return f"{a}-{b}-{rng.randint(10, 99)}"
    if kind == 3:
        return f"0x{rng.getrandbits(28):07x}"
    return f"{rng.randint(1, 28)} {rng.choice(('March', 'July', 'October', 'January'))} {rng.randint(2030, 2069)}"


@dataclass
class Probe:
    context: str      # the haystack with the needle sentence inside
    question: str
    answer_prefix: str  # the reply starts with this; the value follows it
    value: str
    depth: float


def make_probes(n: int, seed: int, count_tokens: Callable[[str], int]) -> list[Probe]:
    """n seeded probes: lengths from PROBE_LENGTHS, needle depths spread over the document, five value shapes."""
    rng = random.Random(seed)
    probes = []
    for i in range(n):
        length = PROBE_LENGTHS[i % len(PROBE_LENGTHS)]
        depth = 0.05 + 0.9 * ((i * 7) % n) / max(n - 1, 1)
        thing, owner = rng.choice(_THINGS), rng.choice(_OWNERS)
        value = _value(i % 5, rng)
        needle = f"The {thing} for {owner} is {value}."
        sentences, total = [], 0
        while total < length:
            s = f"{rng.choice(_WHEN)} at {rng.choice(_PLACES)}, {rng.choice(_EVENTS)}. {rng.choice(_AFTER)}"
            sentences.append(s)
            total += count_tokens(s) + 1
        sentences.insert(int(round(depth * len(sentences))), needle)
        probes.append(Probe(context=" ".join(sentences), question=f"What is the {thing} for {owner}?",
                            answer_prefix=f"The {thing} for {owner} is", value=value, depth=round(depth, 3)))
    return probes


def find_span(tokens: list[int], part: list[int]) -> int:
    """Start of the last occurrence of `part` in `tokens`, or -1."""
    n = len(part)
    for s in range(len(tokens) - n, -1, -1):
        if tokens[s:s + n] == part:
            return s
    return -1


# ---------------------------------------------------------------- scores


def step_scores(att: np.ndarray, positions: np.ndarray, needle: np.ndarray, tokens: np.ndarray,
                generated: int) -> tuple[np.ndarray, np.ndarray]:
    """Surface and logic scores of every query head for one decoding step.

    att: [n_head, n_slots] attention rows of the query that predicts the next token; positions: [n_head,
    n_slots] the token position each slot holds (its KV head's slots, -1 for none); needle: the needle's
    positions; tokens: the token at every position; generated: the model's greedy next token.
    """
    k = len(needle)
    in_needle = np.isin(positions, needle)
    top1 = np.argmax(att, axis=1)
    rows = np.arange(att.shape[0])
    p1 = positions[rows, top1]
    copies = in_needle[rows, top1] & (tokens[np.maximum(p1, 0)] == generated)
    surface = copies / k
    topk = np.argsort(-att, axis=1, kind="stable")[:, :k]
    logic = (np.take_along_axis(att, topk, 1) * np.take_along_axis(in_needle, topk, 1)).sum(axis=1) / k
    return surface.astype(np.float64), logic.astype(np.float64)


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


# ---------------------------------------------------------------- profiles


def profile_name(sha256: str) -> str:
    return f"{PROFILE_KIND}-{sha256[:16]}.json"


def user_profile_path(sha256: str) -> Path:
    from .models import cache_dir
    return cache_dir().parent / "profiles" / profile_name(sha256)


def shipped_profile_path(sha256: str) -> Path:
    return SHIPPED_DIR / profile_name(sha256)


def read_profile(path: Path, sha256: str | None = None, shape: tuple[int, int] | None = None) -> dict:
    """A profile, checked: format, model hash and [layers, heads] shape when given."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LocalkvError(f"no profile at {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LocalkvError(f"profile {path} is unreadable ({e.__class__.__name__}): delete it or run "
                           "`localkv calibrate` again") from None
    try:
        ok = data["format"] == PROFILE_FORMAT and data["kind"] == PROFILE_KIND
        surface = np.asarray(data["surface"], dtype=np.float64)
        logic = np.asarray(data["logic"], dtype=np.float64)
        ok = ok and surface.ndim == 2 and surface.shape == logic.shape and np.isfinite(surface).all() \
            and np.isfinite(logic).all() and (surface >= 0).all() and (logic >= 0).all()
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise LocalkvError(f"profile {path} is not a valid {PROFILE_KIND} profile (format {PROFILE_FORMAT}): "
                           "delete it or run `localkv calibrate` again")
    if sha256 is not None and data.get("model_sha256") != sha256:
        raise LocalkvError(f"profile {path} was calibrated for another model file "
                           f"(sha256 {str(data.get('model_sha256'))[:16]}..., this one {sha256[:16]}...)")
    if shape is not None and surface.shape != tuple(shape):
        raise LocalkvError(f"profile {path} has {surface.shape[0]} layers x {surface.shape[1]} heads, the model "
                           f"{shape[0]} x {shape[1]}")
    data["surface"], data["logic"] = surface, logic
    return data


def write_profile(profile: dict, path: Path) -> None:
    """Write atomically (a temp file renamed over the target): a crash never leaves half a profile."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out = dict(profile)
    out["surface"] = np.asarray(profile["surface"]).round(6).tolist()
    out["logic"] = np.asarray(profile["logic"]).round(6).tolist()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def find_profile(sha256: str) -> Path | None:
    """The user's own calibration first, else the one shipped in models/profiles."""
    for p in (user_profile_path(sha256), shipped_profile_path(sha256)):
        if p.is_file():
            return p
    return None


# ---------------------------------------------------------------- running the probes


def calibrate(model: str | None = None, *, probes: int = DEFAULT_PROBES, seed: int = 0, shared_model=None,
              progress: Callable[[int, int], None] | None = None, record: list | None = None,
              threads: int | None = None, sha256: str | None = None) -> dict:
    """Run the probes on a model and return its profile (not written). `record`, when a list, receives every
    step's (attention rows, positions, needle positions, tokens, greedy token) per layer (tests). `sha256`: the
    model file's, when the caller already has it.

    The cache is localkv's compressed one with a budget larger than any probe: nothing is evicted, and the
    attention rows come from the same in-graph statistics every policy uses."""
    from . import capi, models
    from .engine import Engine
    from .policies import DECODE, Policy

    if probes < 1:
        raise LocalkvError(f"--probes must be at least 1, got {probes}")

    class _Recorder(Policy):
        """Never evicts (its budget holds any probe); asks for the last query's attention per query head."""
        query_heads = True

        def needs(self, phase):
            return {capi.STAT_LAST}

        def obs_window(self, phase):
            return 1

        def score(self, view):  # pragma: no cover - the budget is never exceeded
            raise AssertionError("calibration never compresses")

    budget = 2 * max(PROBE_LENGTHS) + 512
    t0 = time.perf_counter()
    eng = Engine(model, policy=_Recorder(window=0), budget=budget, prefill_budget=budget, shared_model=shared_model,
                 threads=threads, progress=False)
    try:
        n_layers, n_head = len(eng.kv_layers), eng.shape.n_head
        surface = np.zeros((n_layers, n_head))
        logic = np.zeros((n_layers, n_head))
        items = make_probes(probes, seed, lambda s: len(eng.model.tokenize(s, add_special=False)))
        for j, pr in enumerate(items):
            text = eng.model.chat_prompt([{"role": "user", "content": pr.context + "\n\n" + pr.question}])
            prompt = eng.model.tokenize(text + pr.answer_prefix, add_special=False, parse_special=True)
            answer = eng.model.tokenize(" " + pr.value, add_special=False)
            start = find_span(prompt, answer)
            if start < 0:
                raise LocalkvError(f"calibration probe {j}: the value {pr.value!r} does not tokenize the same in "
                                   "the document and in the answer")
            needle = np.arange(start, start + len(answer))
            eng.reset()
            eng.feed(prompt)
            tokens = list(prompt)
            if (capi.cache_state(eng.ctx)[2] < len(prompt)).any():
                raise LocalkvError("calibration evicted a probe token (a bug)")
            for t in range(len(answer)):
                greedy = int(np.argmax(eng.last_logits()))
                tok = np.asarray(tokens)
                cap, _alloc, held = capi.cache_state(eng.ctx)  # once per step, not once per layer
                for i in range(n_layers):
                    heads = eng._heads_of(i)
                    view = eng.layer_view(i, DECODE, capacity=cap[heads], used=held[heads])
                    att = view.stat(capi.STAT_LAST, per_kv_head=False)
                    pos = np.repeat(view.positions, n_head // view.n_head_kv, axis=0)
                    s, lg = step_scores(att, pos, needle, tok, greedy)
                    surface[i] += s
                    logic[i] += lg
                    if record is not None:
                        record.append((j, t, i, att.copy(), pos.copy(), needle, tok, greedy))
                if t + 1 < len(answer):
                    eng.step(answer[t])
                    tokens.append(answer[t])
            if progress:
                progress(j + 1, len(items))
        sha = sha256 or models.file_sha256(eng.model_path)
        return {
            "format": PROFILE_FORMAT, "kind": PROFILE_KIND, "model": Path(eng.model_path).name,
            "model_sha256": sha, "n_layer": n_layers, "n_head": n_head, "kv_heads": list(eng.kv_heads),
            "probes": len(items), "seed": seed, "probe_lengths": list(PROBE_LENGTHS),
            "seconds": round(time.perf_counter() - t0, 1),
            "created": datetime.date.today().isoformat(),
            "surface": surface / len(items), "logic": logic / len(items),
        }
    finally:
        eng.close()


def load_or_calibrate(engine, progress: Callable[[int, int], None] | None = None) -> tuple[dict, Path]:
    """The profile of the engine's model: the user's, else the shipped one, else calibrated now and saved."""
    from .models import file_sha256
    sha = file_sha256(engine.model_path)
    shape = (len(engine.kv_layers), engine.shape.n_head)
    path = find_profile(sha)
    if path is not None:
        return read_profile(path, sha, shape), path
    path = user_profile_path(sha)
    print(f"localkv: no {PROFILE_KIND} profile for {Path(engine.model_path).name} yet: calibrating it once on "
          f"{DEFAULT_PROBES} local probes (a few minutes), saved to {path}", file=sys.stderr)
    profile = calibrate(shared_model=engine.model, probes=DEFAULT_PROBES, progress=progress, sha256=sha)
    write_profile(profile, path)
    return read_profile(path, sha, shape), path


# ---------------------------------------------------------------- showing a profile


def kv_scores(profile: dict, w_surface: float = 1.0, w_logic: float = 1.0) -> np.ndarray:
    """[layers, KV heads] INFsc of a profile (rows of equal width: every layer has the same KV heads here)."""
    kv = list(profile["kv_heads"])
    return inference_scores(profile["surface"], profile["logic"], kv, w_surface, w_logic).reshape(len(kv), -1)


def profile_table(profile: dict, budget: int):
    """Per layer and KV head: surface and logic (summed over the head's query heads), INFsc, and the capacity
    SurfaceLogicKV gives it at `budget`."""
    from rich.table import Table

    from .policies.surfacelogickv import SurfaceLogicKV, surface_logic_capacities
    kv = list(profile["kv_heads"])
    inf = kv_scores(profile)
    pol = SurfaceLogicKV()
    caps = np.asarray(surface_logic_capacities(inf.reshape(-1), budget, pol.window, pol.beta)).reshape(inf.shape)
    t = Table(title=f"{profile['kind']} profile of {profile['model']}: head scores and capacities at budget {budget}")
    t.add_column("layer", justify="right")
    for h in range(inf.shape[1]):
        for col in ("surf", "logic", "INFsc", "tokens"):
            t.add_column(f"kv{h} {col}", justify="right")
    for layer in range(inf.shape[0]):
        surf = np.asarray(profile["surface"][layer]).reshape(kv[layer], -1).sum(axis=1)
        logic = np.asarray(profile["logic"][layer]).reshape(kv[layer], -1).sum(axis=1)
        row = [str(layer)]
        for h in range(inf.shape[1]):
            row += [f"{surf[h]:.2f}", f"{logic[h]:.2f}", f"{inf[layer, h]:.1%}", str(caps[layer, h])]
        t.add_row(*row)
    return t


def plot_profile(profile: dict, path: str) -> None:
    """Heat maps (layers x KV heads) of the surface, logic and INFsc scores, written atomically as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .memory import save_png
    kv = list(profile["kv_heads"])
    panels = [("surface memorization", [np.asarray(r).reshape(h, -1).sum(1) for r, h in zip(profile["surface"], kv)]),
              ("logic construction", [np.asarray(r).reshape(h, -1).sum(1) for r, h in zip(profile["logic"], kv)]),
              ("INFsc (share of the pool)", kv_scores(profile))]
    fig, axes = plt.subplots(1, 3, figsize=(10, 6))
    for ax, (title, data) in zip(axes, panels):
        im = ax.imshow(np.asarray(data), aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("KV head")
        ax.set_xticks(range(max(kv)))
        fig.colorbar(im, ax=ax, fraction=0.05)
    axes[0].set_ylabel("layer")
    fig.suptitle(f"{profile['kind']} head scores, {profile['model']} ({profile['probes']} probes)", fontsize=10)
    save_png(fig, path)
