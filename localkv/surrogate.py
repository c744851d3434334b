"""KVzap's surrogate, fitted on local text (`localkv calibrate --policy kvzap`); the kvzap policy runs it in the graph.

KVzap (arXiv 2601.07891) predicts, from a token's hidden state at the attention's input, the log of its KVzip+
score per KV head. KVzip+ is KVzip's reconstruction score refined by what the token adds to the output:

    target(layer, KV head k, token i) = log max over the replay's queries j and the query heads h of k's group of
                                        a_hji / ||x_j|| * ||W_o^h v_i||

with a_hji the attention query j of the replay gives token i in head h, x_j the query's hidden state at the
attention's input, v_i the token's value and W_o^h the output projection's columns of head h.

Here: each piece of text is read with nothing evicted while `graph_tap.HiddenTap` keeps every layer's hidden
states (the surrogate's inputs), then replayed as the kvzip policy replays a span (Engine.reconstruct) with
STAT_MAX_NORMED on, per query head: the graph computes max_j a_hji / ||x_j||. The ||W_o^h v_i|| factor comes from
the cached values (read_rows) and the GGUF's attn_output weights, dequantized. Targets and inputs of the
training pieces go into per-layer normal equations (every token, no sampling); ridge regression solves them
for a grid of penalties, the one with the best R^2 on validation pieces wins, and test pieces report R^2 and
the per-head rank correlation (Spearman) of predicted against true scores.

The text: files every Debian and Python machine has, none of them the bench's tasks: license texts
(/usr/share/common-licenses), Python's standard library (code with docstrings), the installed packages'
descriptions (METADATA: prose, lists, code blocks) and Debian's package changelogs (terse lists). Pieces are
taken from them round-robin in a seeded order.
"""
from __future__ import annotations

import datetime
import gzip
import random
import sysconfig
import time
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import LocalkvError
from .profiles import KVZAP_KIND, PROFILE_FORMAT

DEFAULT_PIECES = 32  # about 17 s each for the default model on 2 cores
PIECE_TOKENS = 1000  # tokens per piece (KVzap trains on 750 to 1250)
MIN_CHARS = 3000     # files shorter than this are skipped (a piece should be a whole document's worth)
SINKS = 4            # the first tokens of a piece: always kept by the policy, left out of the fit
RIDGE_GRID = (1e-3, 1e-2, 3e-2, 1e-1, 0.3, 1.0, 3.0, 10.0)  # penalties, relative to the mean diagonal of X^T X


# ---------------------------------------------------------------- the text


def _sources() -> list[tuple[str, list[Path]]]:
    """(name, files) of each kind of local text, each list sorted (the same machine gives the same order)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    purelib = Path(sysconfig.get_paths()["purelib"])
    return [
        ("licenses", sorted(p for p in Path("/usr/share/common-licenses").glob("*") if p.is_file())),
        ("python", sorted(stdlib.glob("*.py"))),
        ("packages", sorted(purelib.glob("*.dist-info/METADATA"))),
        ("changelogs", sorted(Path("/usr/share/doc").glob("*/changelog.Debian.gz"))),
    ]


def _read_text(path: Path) -> str | None:
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError, EOFError, gzip.BadGzipFile):
        return None
    return text if len(text) >= MIN_CHARS else None


def corpus(n: int, seed: int, files: list[Path] | None = None) -> list[tuple[str, str]]:
    """n (label, text) documents: the given files, else the local sources taken in turn, each shuffled by `seed`;
    the same files (contents resolved, duplicates such as license symlinks once) give the same documents."""
    if files is not None:
        pools = [("files", list(files))]
    else:
        pools = [(name, fs) for name, fs in _sources() if fs]
    rng = random.Random(seed)
    for _name, fs in pools:
        rng.shuffle(fs)
    out, seen = [], set()
    while len(out) < n and any(fs for _name, fs in pools):
        for name, fs in pools:
            while fs:
                path = fs.pop()
                real = path.resolve()
                if real in seen:
                    continue
                seen.add(real)
                text = _read_text(path)
                if text is not None:
                    out.append((f"{name}:{path.parent.name if name in ('packages', 'changelogs') else path.name}", text))
                    break
            if len(out) >= n:
                break
    if len(out) < n:
        raise LocalkvError(f"kvzap calibration needs {n} local documents of {MIN_CHARS}+ characters, found "
                           f"{len(out)} (license texts, Python's standard library, package descriptions)")
    return out


def split_of(k: int) -> str:
    """Piece k's part: 7 in 10 train, 1.5 validate (the penalty), 1.5 test (the reported fit)."""
    return "val" if k % 20 in (3, 9, 16) else "test" if k % 20 in (6, 12, 18) else "train"


# ---------------------------------------------------------------- the targets


def wo_gram(model_path: str, layers: list[int], n_head: int) -> dict[int, np.ndarray]:
    """Per model layer, [n_head, d, d]: G_h = W_o^h^T W_o^h, so ||W_o^h v||^2 = v^T G_h v (dequantized from the GGUF)."""
    import gguf
    reader = gguf.GGUFReader(model_path)
    want = {f"blk.{il}.attn_output.weight": il for il in layers}
    out = {}
    for t in reader.tensors:
        if t.name in want:
            wo = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float64)  # [n_embd, n_head * d]
            d = wo.shape[1] // n_head
            heads = wo.reshape(wo.shape[0], n_head, d).transpose(1, 0, 2)  # [n_head, n_embd, d]
            out[want[t.name]] = np.einsum("hed,hef->hdf", heads, heads)
    missing = set(layers) - set(out)
    if missing:
        raise LocalkvError(f"the model file has no attn_output weights for layers {sorted(missing)[:4]}: KVzip+ "
                           "targets need the attention's output projection")
    return out


def kvzip_plus(max_normed: np.ndarray, values: np.ndarray, gram: np.ndarray, n_head_kv: int) -> np.ndarray:
    """[n_head_kv, n] log KVzip+ of a layer's tokens: max_normed [n_head, n] (STAT_MAX_NORMED per query head), values
    [n_head_kv, n, d] (the cached V rows), gram [n_head, d, d] (wo_gram)."""
    n_head = max_normed.shape[0]
    group = n_head // n_head_kv
    v = np.repeat(values.astype(np.float64), group, axis=0)               # [n_head, n, d]
    wov = np.sqrt(np.maximum(np.einsum("hnd,hde,hne->hn", v, gram, v), 0.0))
    best = (max_normed.astype(np.float64) * wov).reshape(n_head_kv, group, -1).max(axis=1)
    return np.log(np.maximum(best, 1e-30))


def _replaying_engine(model: str | None, shared_model, threads: int | None, tap):
    """An engine that never evicts and replays what it read with STAT_MAX_NORMED per query head (kvzip's replay)."""
    from . import capi
    from .engine import Engine
    from .policies import Policy

    class _Replayer(Policy):
        query_heads = True
        reconstructs = True
        replay_stat = capi.STAT_MAX_NORMED
        replay_chunk = 1 << 16

        def score(self, view):  # pragma: no cover - the budget is never exceeded
            raise AssertionError("calibration never compresses")

    budget = 2 * PIECE_TOKENS + 512  # a piece and its replay, nothing evicted
    return Engine(model, policy=_Replayer(window=0), budget=budget, prefill_budget=budget, shared_model=shared_model,
                  threads=threads, progress=False, eval_callback=tap.callback)


def piece_tokens(eng, text: str, rng: random.Random, size: int = PIECE_TOKENS) -> list[int]:
    """About `size` tokens of a document, from a seeded place in it, as a user turn of the model's template."""
    words = text.split(" ")
    start = rng.randrange(max(1, len(words) - 4 * size // 3))
    body = " ".join(words[start:])
    ids = eng.model.tokenize(body, add_special=False, parse_special=False)[:size]
    body = b"".join(eng.model.piece(t) for t in ids).decode("utf-8", errors="ignore")
    if eng.model.has_chat_template:
        body = eng.model.chat_prompt([{"role": "user", "content": body}], add_assistant=False)
    return eng.model.tokenize(body, add_special=not eng.model.has_chat_template, parse_special=True)


def read_and_replay(eng, tap, tokens: list[int], grams: dict[int, np.ndarray]) -> tuple[list, list]:
    """Feed a piece with nothing evicted (its hidden states tapped), replay it, and return per cached layer its
    inputs [n, n_embd] and log KVzip+ targets [n, n_head_kv]."""
    from . import capi
    from .policies import DECODE, PREFILL
    eng.reset()
    tap.clear()
    tap.armed = True
    try:
        for i in range(0, len(tokens), eng.plan.n_batch):
            chunk = tokens[i:i + eng.plan.n_batch]
            eng._make_room(len(chunk), PREFILL)
            eng._decode(chunk, False)
    finally:
        tap.armed = False
    eng.reconstruct()
    xs, ys = [], []
    n = len(tokens)
    for view in eng.layer_views(DECODE):
        if (view.head_used != n).any():
            raise LocalkvError("kvzap calibration evicted a token (a bug)")
        states = tap.states.get(view.layer)
        if not states:
            raise LocalkvError(f"the graph of layer {view.layer} shows no attention input (attn_norm-{view.layer}): "
                               "this architecture cannot be calibrated for kvzap")
        x = np.concatenate(states)
        m = view.stat(capi.STAT_MAX_NORMED, per_kv_head=False)
        rows = capi.read_rows(eng.ctx, view.index, 1)
        if rows.shape[1] != 2 * grams[view.layer].shape[1]:
            raise LocalkvError("kvzap calibration reads an f16 V cache")
        v = rows.view(np.float16).reshape(view.n_head_kv, n, -1)
        xs.append(x)
        ys.append(kvzip_plus(m, v, grams[view.layer], view.n_head_kv).T)
    return xs, ys


# ---------------------------------------------------------------- the fit


class NormalEquations:
    """X^T X, X^T y and the sums of one layer's samples, so every token of every piece counts without being kept."""

    def __init__(self, n_in: int, n_out: int):
        self.xtx = np.zeros((n_in, n_in))
        self.xty = np.zeros((n_in, n_out))
        self.sx, self.sy = np.zeros(n_in), np.zeros(n_out)
        self.syy = np.zeros(n_out)
        self.n = 0

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        x, y = x.astype(np.float64), y.astype(np.float64)
        self.xtx += x.T @ x
        self.xty += x.T @ y
        self.sx += x.sum(0)
        self.sy += y.sum(0)
        self.syy += (y * y).sum(0)
        self.n += len(x)

    def centred(self):
        mx, my = self.sx / self.n, self.sy / self.n
        return self.xtx - self.n * np.outer(mx, mx), self.xty - self.n * np.outer(mx, my), mx, my

    def solve(self, lam: float) -> tuple[np.ndarray, np.ndarray]:
        """Ridge with an unpenalised intercept: w [n_out, n_in], b [n_out]."""
        cxx, cxy, mx, my = self.centred()
        reg = lam * np.trace(cxx) / len(cxx)
        w = np.linalg.solve(cxx + reg * np.eye(len(cxx)), cxy)
        return w.T, my - mx @ w

    def r2(self, w: np.ndarray, b: np.ndarray) -> np.ndarray:
        """[n_out] R^2 of predictions x w^T + b on these samples, from the sums alone."""
        # sum (y - p)^2 = yy - 2 p.y + p.p, with p = x w^T + b
        pty = np.einsum("oi,io->o", w, self.xty) + b * self.sy
        ptp = np.einsum("oi,ij,oj->o", w, self.xtx, w) + 2 * b * (w @ self.sx) + self.n * b * b
        sse = self.syy - 2 * pty + ptp
        sst = self.syy - self.sy ** 2 / self.n
        return 1.0 - sse / np.maximum(sst, 1e-30)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def calibrate_kvzap(model: str | None = None, *, pieces: int = DEFAULT_PIECES, seed: int = 0, shared_model=None,
                    threads: int | None = None, sha256: str | None = None, files: list[Path] | None = None,
                    progress: Callable[[int, int], None] | None = None, record: dict | None = None,
                    piece: int = PIECE_TOKENS) -> dict:
    """Fit the model's KVzap surrogate on `pieces` local documents (or `files`), `piece` tokens of each, and return
    its profile (not written). `record`, when a dict, receives the test pieces' inputs and targets per layer."""
    from . import models
    from .graph_tap import HiddenTap
    if pieces < 7:
        raise LocalkvError(f"--probes must be at least 7 for kvzap (train, validation and test documents), got {pieces}")
    t0 = time.perf_counter()
    docs = corpus(pieces, seed, files)
    tap = HiddenTap(0)
    eng = _replaying_engine(model, shared_model, threads, tap)
    try:
        tap.n_embd = n_embd = eng.shape.n_embd
        layers = [il for il, _k, _v in eng.kv_layers]
        n_kv = eng.kv_heads[0]
        if len(set(eng.kv_heads)) != 1:
            raise LocalkvError("kvzap calibration needs the same KV heads in every layer")
        grams = wo_gram(eng.model_path, layers, eng.shape.n_head)
        eqs = {split: [NormalEquations(n_embd, n_kv) for _ in layers] for split in ("train", "val")}
        tests: list[tuple[list, list]] = []
        rng = random.Random(seed)
        order = sorted(range(len(docs)), key=lambda k: split_of(k) == "test")  # test pieces last: the fit comes first
        for done, k in enumerate(order):
            tokens = piece_tokens(eng, docs[k][1], rng, piece)
            xs, ys = read_and_replay(eng, tap, tokens, grams)
            if split_of(k) == "test":
                tests.append(([x[SINKS:] for x in xs], [y[SINKS:] for y in ys]))
            else:
                for li in range(len(layers)):
                    eqs[split_of(k)][li].add(xs[li][SINKS:], ys[li][SINKS:])
            if progress:
                progress(done + 1, len(docs))
        weights, bias, val_r2, lams = [], [], [], []
        for li in range(len(layers)):
            fits = [(lam, *eqs["train"][li].solve(lam)) for lam in RIDGE_GRID]
            scored = [(float(eqs["val"][li].r2(w, b).mean()), lam, w, b) for lam, w, b in fits]
            r2, lam, w, b = max(scored, key=lambda s: s[0])
            weights.append(w)
            bias.append(b)
            val_r2.append(r2)
            lams.append(lam)
        test_r2, test_rho = _test_fit(tests, weights, bias)
        if record is not None:
            record.update(tests=tests, layers=layers)
        sha = sha256 or models.file_sha256(eng.model_path)
        return {
            "format": PROFILE_FORMAT, "kind": KVZAP_KIND, "model": Path(eng.model_path).name, "model_sha256": sha,
            "n_layer": len(layers), "n_embd": n_embd, "kv_heads": list(eng.kv_heads), "form": "linear",
            "probes": len(docs), "seed": seed, "piece_tokens": piece,
            "documents": [label for label, _text in docs],
            "train_tokens": int(sum(e.n for e in eqs["train"][:1])), "ridge": lams,
            "val_r2": [round(r, 4) for r in val_r2], "test_r2": round(test_r2, 4), "test_spearman": round(test_rho, 4),
            "seconds": round(time.perf_counter() - t0, 1), "created": datetime.date.today().isoformat(),
            "weights": np.asarray(weights), "bias": np.asarray(bias),
        }
    finally:
        eng.close()


def _test_fit(tests, weights, bias) -> tuple[float, float]:
    """Mean R^2 over layers and heads on the test pieces, and the mean per-(piece, layer, head) rank correlation."""
    if not tests:
        return float("nan"), float("nan")
    r2s, rhos = [], []
    for li, (w, b) in enumerate(zip(weights, bias)):
        y = np.concatenate([ys[li] for _xs, ys in tests])
        p = np.concatenate([xs[li] for xs, _ys in tests]) @ w.T + b
        r2s.append(1 - ((y - p) ** 2).sum(0) / np.maximum(((y - y.mean(0)) ** 2).sum(0), 1e-30))
        for xs, ys in tests:
            pred = xs[li] @ w.T + b
            rhos += [spearman(pred[:, h], ys[li][:, h]) for h in range(ys[li].shape[1])]
    return float(np.mean(r2s)), float(np.nanmean(rhos))


def load_or_calibrate_kvzap(engine) -> tuple[dict, Path]:
    """The engine's model's KVzap profile: the user's, else the shipped one, else fitted now (minutes) and saved."""
    from .calibrate import _load_or_calibrate

    def run(probes: int, **kw) -> dict:
        return calibrate_kvzap(pieces=probes, **kw)
    return _load_or_calibrate(engine, KVZAP_KIND, (len(engine.kv_layers), engine.kv_heads[0]), run, DEFAULT_PIECES,
                              "about ten minutes", None)


def fit_table(profile: dict):
    """The surrogate's fit per layer (validation R^2, the chosen penalty) and on the test pieces, as a rich table."""
    from rich.table import Table
    table = Table(title=f"KVzap surrogate ({profile['form']}) fitted on {profile['probes']} local documents, "
                        f"{profile['train_tokens']:,} training tokens: test R\u00b2 {profile['test_r2']:.3f}, "
                        f"rank correlation {profile['test_spearman']:.3f}")
    table.add_column("layer", justify="right")
    table.add_column("validation R\u00b2", justify="right")
    table.add_column("ridge", justify="right")
    for li, (r2, lam) in enumerate(zip(profile["val_r2"], profile["ridge"])):
        table.add_row(str(li), f"{r2:.3f}", f"{lam:g}")
    return table
