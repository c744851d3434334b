"""Policy arguments from anywhere (the CLI's --policy-arg, the Python API, a server request): whatever the
values, creating, validating and sizing a policy is a clean LocalkvError or a result within a time limit,
never a hang or another exception. Every numeric argument has a declared range."""
from __future__ import annotations

import math
import signal
import time
from contextlib import contextmanager
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from localkv import policies
from localkv.cache import plan_cache
from localkv.errors import LocalkvError
from localkv.policies.base import MAX_TOKENS

NAMES = [*policies.available(), "pod+snapkv"]
LIMIT_S = 5.0  # a generous bound for pure Python on a busy 2-core machine; a hang never returns
SHAPE = SimpleNamespace(n_layer=24, n_ctx_train=32768)  # the default model's (cache.plan_cache reads these)
HEADS = [2] * SHAPE.n_layer


class Hang(Exception):
    pass


@contextmanager
def time_limit(seconds: float):
    """Interrupt the code inside after `seconds` (SIGALRM: pure-Python loops are interrupted too)."""
    def fire(signum, frame):
        raise Hang(f"no result after {seconds} s")
    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def arguments(name: str) -> list[tuple[str, type, object]]:
    """(name, type, default) of every argument `name` takes (pod+X: POD's and X's)."""
    if name.startswith("pod+"):
        own = policies.available()["pod"].arguments()
        seen = {a for a, _, _ in own}
        return own + [a for a in policies.available()[name[4:]].arguments() if a[0] not in seen]
    return policies.available()[name].arguments()


def ranges(name: str) -> dict:
    if name.startswith("pod+"):
        return {**policies.available()[name[4:]].argument_ranges(), **policies.available()["pod"].argument_ranges()}
    return policies.available()[name].argument_ranges()


# strings as a user or a client would type them: numbers of every kind, and things that are not numbers
JUNK = st.sampled_from(["", " ", "abc", "nan", "NaN", "inf", "-inf", "1e30", "-1e30", "1e400", "0x10", "1_000",
                        "true", "false", "None", "null", "[]", "{}", "3.5", "-0", "0.0", "+7", " 8 ", "\x00",
                        "9" * 40, "-" + "9" * 40, "1e-320", "١٢"])


def inside(kind: type, rng) -> st.SearchStrategy[str]:
    """In-range values, mostly small (near the bottom of the range, where the budgets are), as strings."""
    if kind is bool:
        return st.sampled_from(["true", "false"])
    if kind is str:
        return st.text(max_size=20)
    if kind is int:
        lo, hi = int(rng.lo), int(rng.hi)
        return st.one_of(st.integers(lo, min(hi, lo + 64)), st.integers(lo, min(hi, 1 << 20)), st.just(hi)).map(str)
    return st.one_of(st.floats(rng.lo, min(rng.hi, 1e6), exclude_max=rng.hi_open, allow_nan=False),
                     st.just(rng.lo)).map(repr)


def value(kind: type, rng) -> st.SearchStrategy[str]:
    """Values for one argument of type `kind` (range `rng`): inside the range, at its edges, outside it, NaN,
    inf, huge, negative, and the wrong type, all as the strings the CLI and the server pass on."""
    if kind in (bool, str):
        return st.one_of(inside(kind, rng), st.sampled_from(["maybe", "2", "yes", "off"]), JUNK)
    if kind is int:
        edges = st.sampled_from([int(rng.lo), int(rng.lo) - 1, int(rng.hi), int(rng.hi) + 1, 0, -1, -5])
        return st.one_of(inside(kind, rng), edges.map(str), st.integers(-(1 << 70), 1 << 70).map(str),
                         st.floats(allow_nan=True, allow_infinity=True).map(repr), JUNK)
    edges = st.sampled_from([rng.lo, rng.hi, -1e-9, -1.0, 0.0, 1.0, 1e30, -1e30])
    return st.one_of(inside(kind, rng), edges.map(repr), st.floats(allow_nan=True, allow_infinity=True).map(repr),
                     st.integers(-(1 << 70), 1 << 70).map(str), JUNK)


@st.composite
def policy_case(draw, names=NAMES):
    """A policy, some of its arguments, a budget and a layer count: half the cases in range (so that they
    reach the sizing code), half anything at all."""
    name = draw(st.sampled_from(names))
    args_of = arguments(name)
    chosen = draw(st.lists(st.sampled_from(args_of), unique_by=lambda a: a[0], max_size=len(args_of)))
    rng = ranges(name)
    hostile = draw(st.booleans())
    args = {a: draw((value if hostile else inside)(kind, rng.get(a))) for a, kind, _ in chosen}
    if hostile:
        budget = draw(st.one_of(st.integers(-5, 600), st.integers(600, 1 << 20), st.sampled_from([0, 1, 1 << 40])))
    else:
        budget = draw(st.one_of(st.integers(1, 300), st.integers(1, SHAPE.n_ctx_train)))
    n_layers = draw(st.integers(1, 48))
    return name, args, budget, n_layers


def size(name: str, args: dict[str, str], budget: int, n_layers: int, scores: np.ndarray):
    """What the CLI, the API and the server do with a policy before a context exists."""
    pol = policies.create(name, args)
    if not pol.compresses:  # full: its arguments are checked, it takes no budget and sizes nothing
        plan_cache(pol, SHAPE, budget=None, prefill_budget=None, ctx=None, chunk=256, decode_interval=32)
        return pol, [budget] * n_layers, [budget] * 2 * n_layers
    pol.validate(budget)
    plan_cache(pol, SHAPE, budget=budget, prefill_budget=None, ctx=None, chunk=256, decode_interval=32)
    caps = pol.capacities(budget, n_layers)
    heads = [2] * n_layers
    if hasattr(pol, "w_surface"):  # SurfaceLogicKV: what prepare() reads from the model's profile
        pol.scores = scores[:sum(heads)] / scores[:sum(heads)].sum()
    head_caps = pol.head_capacities(budget, heads)
    return pol, caps, head_caps


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=policy_case(), seed=st.integers(0, 2**32 - 1))
def test_any_arguments_give_a_clean_error_or_a_result_in_time(case, seed):
    name, args, budget, n_layers = case
    scores = np.random.default_rng(seed).random(2 * 48) + 1e-3
    t0 = time.perf_counter()
    try:
        with time_limit(LIMIT_S):
            pol, caps, head_caps = size(name, args, budget, n_layers, scores)
    except LocalkvError as e:
        msg = str(e)
        assert msg and "\n" not in msg and len(msg) < 400, msg  # one line, as the CLI prints it
        if isinstance(e, policies.PolicyArgError):
            assert e.arg in args and e.arg in msg  # names the argument (the server's 400 says which)
        return
    assert time.perf_counter() - t0 < LIMIT_S
    # a result: every argument it was given lies in its declared range, and the sizes add up
    rng = ranges(name)
    pod_own = {a for a, _, _ in policies.available()["pod"].arguments()}
    for a, kind, _ in arguments(name):
        v = getattr(pol.evict if name.startswith("pod+") and a not in pod_own else pol, a)
        if kind in (int, float):
            # finite, but for a range open to -inf (kvzap's threshold: -inf is "no threshold", the budget mode)
            assert not isinstance(v, bool) and v in rng[a] and (math.isfinite(v) or v == rng[a].lo == -math.inf), (a, v)
    assert len(caps) == n_layers and all(isinstance(c, int) and c >= 0 for c in caps)
    assert sum(caps) == budget * n_layers
    assert len(head_caps) == 2 * n_layers and all(int(c) >= 0 for c in head_caps)
    assert sum(int(c) for c in head_caps) == budget * 2 * n_layers


@pytest.mark.parametrize("name, args, budget, words", [
    ("pyramidkv", {"sinks": "-5"}, 28, "sinks"),           # was an endless capacity loop in the server's worker
    ("pyramidkv", {"beta": "0"}, 128, "beta"),             # divided by zero
    ("pyramidkv", {"window": "128"}, 128, "budget"),        # nothing left beyond the window
    ("surfacelogickv", {"beta": "0"}, 128, "beta"),
    ("surfacelogickv", {"beta": "nan"}, 128, "beta"),
    ("snapkv", {"window": "1e30"}, 128, "window"),
    ("snapkv", {"kernel": "0"}, 128, "kernel"),
    ("h2o", {"recent_ratio": "1"}, 128, "recent_ratio"),
    ("ahakv", {"r": "-1"}, 128, "r"),
    ("kvzip", {"replay_chunk": "1"}, 128, "replay_chunk"),
    ("pod", {"delta": "inf"}, 128, "delta"),
    ("pod+snapkv", {"kernel": "-3"}, 128, "kernel"),
])
def test_known_hostile_arguments_are_one_line_errors(name, args, budget, words):
    with pytest.raises(LocalkvError) as e:
        with time_limit(LIMIT_S):
            size(name, args, budget, 24, np.ones(96))
    assert words in str(e.value) and "\n" not in str(e.value)


def test_pyramidkv_with_the_window_next_to_the_budget_settles():
    """In range, the tightest case: one token per layer beyond the window, however steep the pyramid."""
    for beta in ("1", "20", "1000000"):
        for window, budget in ((127, 128), (0, 1), (4000, 4001)):
            with time_limit(LIMIT_S):
                pol = policies.create("pyramidkv", {"window": str(window), "beta": beta})
                pol.validate(budget)
                caps = pol.capacities(budget, 24)
            assert sum(caps) == budget * 24 and min(caps) >= window + 1


def test_every_numeric_argument_of_every_policy_has_a_declared_range():
    for name, cls in policies.available().items():
        declared = cls.argument_ranges()
        for arg, kind, default in cls.arguments():
            if kind in (int, float):
                assert arg in declared, f"{name}.{arg} has no declared range"
                assert default in declared[arg], f"{name}.{arg}'s default {default} is outside {declared[arg]}"
                assert declared[arg].hi <= MAX_TOKENS or kind is float, (name, arg)
            else:
                assert kind in (bool, str), f"{name}.{arg}: a {kind.__name__} argument has no check"


def test_file_arguments_are_declared_and_strings():
    for name, cls in policies.available().items():
        kinds = {a: k for a, k, _ in cls.arguments()}
        for arg in cls.file_arguments:
            assert kinds.get(arg) is str, f"{name}.{arg}"
    assert "profile" in policies.available()["pod"].file_arguments
    assert "profile" in policies.available()["surfacelogickv"].file_arguments


# ------------------------------------------------------------ the real engine


@st.composite
def runnable_case(draw):
    """In-range arguments from small corners of their ranges, so the engine really runs (and compresses the
    chat template's ~30 tokens): sinks and windows of a few tokens, budgets just above what is always kept."""
    name = draw(st.sampled_from([n for n in NAMES if n != "full"]))
    rng = ranges(name)
    args = {}
    for a, kind, _ in arguments(name):
        if a == "profile" or not draw(st.booleans()):
            continue
        r = rng.get(a)
        if kind is bool:
            args[a] = draw(st.sampled_from(["true", "false"]))
        elif a in ("sinks", "window", "proximal", "protect"):
            args[a] = str(draw(st.integers(0, 8)))
        elif kind is int:
            args[a] = str(draw(st.integers(int(r.lo), int(min(r.hi, r.lo + 40)))))
        else:
            args[a] = repr(draw(st.floats(r.lo, min(r.hi, 4.0), exclude_max=r.hi_open, allow_nan=False)))
    return name, args, draw(st.integers(1, 48))


@pytest.fixture(scope="module")
def shared_model(model_path):
    from localkv.llama import Model, init_backend
    init_backend(False)
    model = Model(model_path)
    yield model
    model.close()


@pytest.mark.model
def test_drawn_in_range_arguments_run_the_real_engine(shared_model):
    from localkv.engine import Engine
    ran, refused = [], []

    @settings(max_examples=14, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                     HealthCheck.function_scoped_fixture])
    @given(case=runnable_case())
    def run(case):
        name, args, extra = case
        t1 = time.perf_counter()
        try:
            with time_limit(60):
                pol = policies.create(name, args)
                budget = pol.min_budget() + extra
                eng = Engine(shared_model.path, policy=name, budget=budget, policy_args=args, threads=2,
                             shared_model=shared_model, calibrate=False)
                try:
                    res = eng.generate("hi", max_tokens=2, temperature=0)
                finally:
                    eng.close()
        except LocalkvError as e:
            assert "\n" not in str(e)
            refused.append((name, args, str(e)))
            return
        assert 1 <= res.generated_tokens <= 2 or res.stop_reason == "eos"
        ran.append((name, args, budget, round(time.perf_counter() - t1, 2)))

    run()  # about 4 s on 2 cores
    assert len(ran) >= len(refused), (ran, refused)  # most drawn in-range cases run
