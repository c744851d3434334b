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

POD's offline layer grouping (`localkv calibrate --policy pod`, the last section) reads the same probes the
same way and writes its own kind of profile: how alike consecutive layers attend, per KV head.

Reading, checking and writing profiles is localkv.profiles' (the policies read them there); this module makes
them, with an engine of its own, so it sits above the policies and the engine.
"""
from __future__ import annotations

import datetime
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import LocalkvError
from .profiles import (DEFAULT_POD_DELTA, KVZAP_KIND, POD_KIND, PROFILE_FORMAT, PROFILE_KIND, check_pod_delta, find_profile,
                       kv_scores, pod_blocks, read_profile, user_profile_path, write_profile)

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


# ---------------------------------------------------------------- running the probes


def _recording_engine(model: str | None, shared_model, threads: int | None):
    """An engine whose cache never evicts (its budget holds any probe) and that keeps the last query's attention
    per query head: the rows both calibrations read come from the same in-graph statistics every policy uses."""
    from . import capi
    from .engine import Engine
    from .policies import Policy

    class _Recorder(Policy):
        """Never evicts; asks for the last query's attention per query head."""
        query_heads = True

        def needs(self, phase):
            return {capi.STAT_LAST}

        def obs_window(self, phase):
            return 1

        def score(self, view):  # pragma: no cover - the budget is never exceeded
            raise AssertionError("calibration never compresses")

    budget = 2 * max(PROBE_LENGTHS) + 512
    return Engine(model, policy=_Recorder(window=0), budget=budget, prefill_budget=budget, shared_model=shared_model,
                  threads=threads, progress=False)


def _probes_for(eng, n: int, seed: int) -> list[Probe]:
    """The seeded probes, sized with the engine's tokenizer."""
    return make_probes(n, seed, lambda s: len(eng.model.tokenize(s, add_special=False)))


def _probe_prompt(eng, probe: Probe) -> list[int]:
    """A probe as the model reads it: a chat turn with the document and the question, then the reply's start."""
    text = eng.model.chat_prompt([{"role": "user", "content": probe.context + "\n\n" + probe.question}])
    return eng.model.tokenize(text + probe.answer_prefix, add_special=False, parse_special=True)


def _last_attention(eng):
    """Per cached layer, the last query's attention rows [n_head, n_slots] and the token position of each slot,
    repeated over each KV head's query heads (-1 where a head holds none)."""
    from . import capi
    from .policies import DECODE
    for view in eng.layer_views(DECODE):
        att = view.stat(capi.STAT_LAST, per_kv_head=False)
        yield att, np.repeat(view.positions, eng.shape.n_head // view.n_head_kv, axis=0)


def calibrate(model: str | None = None, *, probes: int = DEFAULT_PROBES, seed: int = 0, shared_model=None,
              progress: Callable[[int, int], None] | None = None, record: list | None = None,
              threads: int | None = None, sha256: str | None = None) -> dict:
    """Run the probes on a model and return its profile (not written). `record`, when a list, receives every
    step's (attention rows, positions, needle positions, tokens, greedy token) per layer (tests). `sha256`: the
    model file's, when the caller already has it.

    The cache is localkv's compressed one with a budget larger than any probe: nothing is evicted, and the
    attention rows come from the same in-graph statistics every policy uses."""
    from . import capi, models

    if probes < 1:
        raise LocalkvError(f"--probes must be at least 1, got {probes}")
    t0 = time.perf_counter()
    eng = _recording_engine(model, shared_model, threads)
    try:
        n_layers, n_head = len(eng.kv_layers), eng.shape.n_head
        surface = np.zeros((n_layers, n_head))
        logic = np.zeros((n_layers, n_head))
        items = _probes_for(eng, probes, seed)
        for j, pr in enumerate(items):
            prompt = _probe_prompt(eng, pr)
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
                for i, (att, pos) in enumerate(_last_attention(eng)):
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
    """The SurfaceLogicKV profile of the engine's model: the user's, else the shipped one, else calibrated now
    and saved."""
    return _load_or_calibrate(engine, PROFILE_KIND, (len(engine.kv_layers), engine.shape.n_head), calibrate,
                              DEFAULT_PROBES, "a few minutes", progress)


def load_or_calibrate_kind(engine, kind: str) -> tuple[dict, Path]:
    """The profile of `kind` a policy of the engine asks for (Engine.profile): read, else calibrated now."""
    from .surrogate import load_or_calibrate_kvzap
    return {PROFILE_KIND: load_or_calibrate, POD_KIND: load_or_calibrate_pod, KVZAP_KIND: load_or_calibrate_kvzap}[kind](engine)


def _load_or_calibrate(engine, kind: str, shape: tuple[int, int], run: Callable[..., dict], probes: int,
                       takes: str, progress) -> tuple[dict, Path]:
    """A profile of `kind` for the engine's model: the user's, else the shipped one, else `run` on `probes`
    probes now (it takes about `takes`) and saved to the user cache."""
    from .models import file_sha256
    sha = file_sha256(engine.model_path)
    path = find_profile(sha, kind)
    if path is not None:
        return read_profile(path, sha, shape, kind=kind), path
    path = user_profile_path(sha, kind)
    print(f"localkv: no {kind} profile for {Path(engine.model_path).name} yet: calibrating it once on "
          f"{probes} local probes ({takes}), saved to {path}", file=sys.stderr)
    profile = run(shared_model=engine.model, probes=probes, progress=progress, sha256=sha)
    write_profile(profile, path)
    return read_profile(path, sha, shape, kind=kind), path


# ---------------------------------------------------------------- showing a profile


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


# ================================================================ POD: layers that attend alike
#
# POD (arXiv 2412.02252) lets consecutive layers share one attention over distant tokens. Offline, per KV head,
# it measures how alike the attention distributions of consecutive layers are (1 - Jensen-Shannon divergence)
# and greedily merges consecutive layers into blocks: a layer joins the block above it when it is at least
# `delta` similar to the layer before it. The first layer of a block leads, the others follow it.
# The queries are the last tokens of the same probes (the reply's start, where the model is about to look the
# fact up), each attending over the whole probe with nothing evicted.

DEFAULT_POD_PROBES = 8
DEFAULT_LAST_QUERIES = 8


def js_similarity(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """1 - the Jensen-Shannon divergence in bits between attention rows along the last axis (so in [0, 1]: 1 for
    the same distribution, 0 for disjoint ones). Rows are renormalised first: the in-graph rows sum to 1 only to
    float16's precision."""
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    p = p / p.sum(axis=-1, keepdims=True)
    q = q / q.sum(axis=-1, keepdims=True)
    m = (p + q) / 2
    return np.clip(1.0 - (_kl_bits(p, m) + _kl_bits(q, m)) / 2, 0.0, 1.0)


def _kl_bits(p: np.ndarray, m: np.ndarray) -> np.ndarray:
    """KL(p || m) in bits along the last axis, 0 log 0 = 0 (m > 0 wherever p > 0: m is p's mixture)."""
    ratio = np.divide(p, m, out=np.ones_like(p), where=p > 0)
    return (p * np.log2(ratio)).sum(axis=-1)


def pod_spans(leaders: np.ndarray) -> list[list[tuple[int, int]]]:
    """Per KV head, its blocks as (first layer, last layer), top down (for display)."""
    leaders = np.asarray(leaders)
    spans = []
    for h in range(leaders.shape[1]):
        starts = [layer for layer in range(len(leaders)) if leaders[layer, h] == layer]
        spans.append([(a, b - 1) for a, b in zip(starts, starts[1:] + [len(leaders)])])
    return spans


def pod_followers(leaders: np.ndarray) -> int:
    """(layer, KV head)s that follow a leader: the ones whose attention over distant tokens is shared."""
    leaders = np.asarray(leaders)
    return int((leaders != np.arange(len(leaders))[:, None]).sum())


def pod_at(profile: dict, delta: float | None) -> dict:
    """The profile with its blocks at another delta (None: its own), for showing."""
    if delta is None:
        return profile
    sim = np.asarray(profile["similarity"])
    return {**profile, "delta": check_pod_delta(delta), "leaders": pod_blocks(sim, delta)}


def _by_position(att: np.ndarray, positions: np.ndarray, n_seen: int) -> np.ndarray:
    """Rows [n_head, n_seen] ordered by token position: the layers' slots then line up column for column.
    Nothing is evicted, so every position 0..n_seen-1 must be held exactly once."""
    order = np.argsort(positions, axis=1, kind="stable")
    if positions.shape[1] != n_seen or (np.take_along_axis(positions, order, 1) != np.arange(n_seen)).any():
        raise LocalkvError("POD calibration: a layer does not hold every probe token once (a bug)")
    return np.take_along_axis(att, order, 1)


def layer_similarity(rows: list[np.ndarray], n_kv: int) -> np.ndarray:
    """[n_layers - 1, n_kv]: js_similarity of each query head's rows in consecutive layers, averaged over each KV
    head's GQA group (consecutive query heads)."""
    stack = np.stack(rows)  # [layers, n_head, n_slots]
    sim = js_similarity(stack[:-1], stack[1:])
    return sim.reshape(len(rows) - 1, n_kv, -1).mean(axis=2)


def calibrate_pod(model: str | None = None, *, probes: int = DEFAULT_POD_PROBES, seed: int = 0,
                  last_queries: int = DEFAULT_LAST_QUERIES, shared_model=None,
                  progress: Callable[[int, int], None] | None = None, record: list | None = None,
                  threads: int | None = None, sha256: str | None = None, delta: float = DEFAULT_POD_DELTA) -> dict:
    """Measure on the probes how alike consecutive layers attend, per KV head, and return the POD profile (not
    written): the similarity and the blocks at `delta`. Each probe's last `last_queries` tokens are decoded one
    by one after the rest; each attends over all the probe. `record`, when a list, receives (probe, query,
    layer, rows [n_head, n_slots] ordered by position) for every query (tests)."""
    from . import models

    if probes < 1:
        raise LocalkvError(f"--probes must be at least 1, got {probes}")
    if last_queries < 1:
        raise LocalkvError(f"last_queries must be at least 1, got {last_queries}")
    check_pod_delta(delta)
    t0 = time.perf_counter()
    eng = _recording_engine(model, shared_model, threads)
    try:
        kv = [int(h) for h in eng.kv_heads]
        if len(kv) < 2 or len(set(kv)) != 1:
            raise LocalkvError(f"POD groups consecutive layers of one shape: {Path(eng.model_path).name} has "
                               f"{len(kv)} cached layers with {sorted(set(kv))} KV heads")
        total = np.zeros((len(kv) - 1, kv[0]))
        items = _probes_for(eng, probes, seed)
        for j, pr in enumerate(items):
            prompt = _probe_prompt(eng, pr)
            if len(prompt) <= last_queries:
                raise LocalkvError(f"last_queries {last_queries} leaves nothing of probe {j} ({len(prompt)} tokens)")
            eng.reset()
            eng.feed(prompt[:-last_queries], want_logits=False)
            for t, tok in enumerate(prompt[-last_queries:]):
                eng.step(tok)
                rows = [_by_position(att, pos, eng.n_past) for att, pos in _last_attention(eng)]
                if record is not None:
                    record.extend((j, t, i, r.copy()) for i, r in enumerate(rows))
                total += layer_similarity(rows, kv[0])
            if progress:
                progress(j + 1, len(items))
        # rounded before the blocks are cut, so the written profile gives back exactly its own leaders
        similarity = np.round(total / (len(items) * last_queries), 6)
        return {
            "format": PROFILE_FORMAT, "kind": POD_KIND, "model": Path(eng.model_path).name,
            "model_sha256": sha256 or models.file_sha256(eng.model_path), "n_layer": len(kv), "kv_heads": kv,
            "probes": len(items), "seed": seed, "last_queries": last_queries, "probe_lengths": list(PROBE_LENGTHS),
            "seconds": round(time.perf_counter() - t0, 1), "created": datetime.date.today().isoformat(),
            "similarity": similarity, "delta": float(delta), "leaders": pod_blocks(similarity, delta),
        }
    finally:
        eng.close()


def load_or_calibrate_pod(engine, progress: Callable[[int, int], None] | None = None) -> tuple[dict, Path]:
    """The POD profile of the engine's model: the user's, else the shipped one, else calibrated now and saved."""
    return _load_or_calibrate(engine, POD_KIND, (len(engine.kv_layers), engine.shape.n_head_kv), calibrate_pod,
                              DEFAULT_POD_PROBES, "a minute or two", progress)


def pod_table(profile: dict, delta: float | None = None):
    """Per layer and KV head: the similarity to the layer before and whether it leads a block or follows one, at
    `delta` (None: the profile's own)."""
    from rich.table import Table
    prof = pod_at(profile, delta)
    sim, leaders = np.asarray(prof["similarity"]), np.asarray(prof["leaders"])
    n_follow, n_all = pod_followers(leaders), leaders.size
    t = Table(title=f"{prof['kind']} profile of {prof['model']}: attention similarity to the previous layer "
                    f"(1 - JS divergence) and blocks at delta {prof['delta']:g}",
              caption=f"{n_follow} of {n_all} (layer, KV head)s follow their block's leader at delta "
                      f"{prof['delta']:g} ({n_follow / n_all:.0%})")
    t.add_column("layer", justify="right")
    for h in range(leaders.shape[1]):
        t.add_column(f"kv{h} sim", justify="right")
        t.add_column(f"kv{h} block")
    for layer in range(len(leaders)):
        row = [str(layer)]
        for h in range(leaders.shape[1]):
            lead = int(leaders[layer, h])
            row += ["" if layer == 0 else f"{sim[layer - 1, h]:.3f}",
                    "leader" if lead == layer else f"follows L{lead}"]
        t.add_row(*row)
    return t


def plot_pod(profile: dict, path: str, delta: float | None = None) -> None:
    """Heat map (layers x KV heads) of each layer's similarity to the one before, a red line above every block's
    leader, written atomically as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .memory import save_png
    prof = pod_at(profile, delta)
    sim, leaders = np.asarray(prof["similarity"]), np.asarray(prof["leaders"])
    n_layers, n_kv = leaders.shape
    data = np.ma.masked_invalid(np.vstack([np.full((1, n_kv), np.nan), sim]))  # layer 0 has no layer before it
    fig, ax = plt.subplots(figsize=(3 + 1.2 * n_kv, 7))
    im = ax.imshow(data, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    for h in range(n_kv):
        for layer in range(1, n_layers):
            if leaders[layer, h] == layer:
                ax.plot([h - 0.5, h + 0.5], [layer - 0.5, layer - 0.5], color="red", linewidth=2.5)
    ax.set_xlabel("KV head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(n_kv))
    fig.colorbar(im, ax=ax, fraction=0.08, label="similarity to the layer before (1 - JS)")
    ax.set_title(f"{prof['kind']} blocks at delta {prof['delta']:g} (red: a block starts)\n{prof['model']}, "
                 f"{prof['probes']} probes, {pod_followers(leaders)} of {leaders.size} follow", fontsize=9)
    save_png(fig, path)
