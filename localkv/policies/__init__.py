"""Compression policies: one module per policy, found by name.

Adding a policy is one new file in this package defining a `Policy` subclass
with a `name`; it then shows up in `localkv policies`, `--policy` and the bench.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import fields

from ..errors import LocalkvError
from .base import DECODE, PREFILL, LayerView, Policy, PolicyArgError

__all__ = ["DECODE", "PREFILL", "LayerView", "Policy", "PolicyArgError", "available", "conversation_args", "create",
           "parse_args"]


def _discover() -> dict[str, type[Policy]]:
    found: dict[str, type[Policy]] = {}
    for mod in pkgutil.iter_modules(__path__):
        if mod.name == "base":
            continue
        module = importlib.import_module(f"{__name__}.{mod.name}")
        for obj in vars(module).values():
            if isinstance(obj, type) and issubclass(obj, Policy) and obj.name and obj.__module__ == module.__name__:
                found[obj.name] = obj
    return dict(sorted(found.items()))


_REGISTRY = _discover()


def available() -> dict[str, type[Policy]]:
    return dict(_REGISTRY)


def parse_args(items: list[str] | None) -> dict[str, str]:
    """['window=16', 'kernel=5'] -> {'window': '16', 'kernel': '5'}"""
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise LocalkvError(f"policy argument '{item}' is not NAME=VALUE")
        out[key.strip()] = value.strip()
    return out


def create(name: str, args: dict[str, str] | None = None) -> Policy:
    """A policy by name with its hyper-parameters overridden from strings. `pod+<policy>` composes POD with an
    evicting policy: each argument goes to POD if it is one of POD's, else to the other policy."""
    if name.startswith("pod+"):
        pod_cls = _REGISTRY["pod"]
        inner = name[4:]
        if inner in ("pod", "full", "") or inner.startswith("pod+") or inner not in _REGISTRY \
                or not _REGISTRY[inner].compresses:
            choices = ", ".join(f"pod+{n}" for n, c in _REGISTRY.items() if c.compresses and n not in ("pod", "kvzip"))
            raise LocalkvError(f"unknown policy '{name}': POD composes with one evicting policy ({choices})")
        if _REGISTRY[inner]().reconstructs:
            raise LocalkvError(f"{name}: POD does not compose with {inner} (its replay hides positions a POD follower needs)")
        own = {f.name for f in fields(pod_cls) if f.name not in pod_cls.not_arguments}
        args = args or {}
        evict = create(inner, {k: v for k, v in args.items() if k not in own})
        pod = create("pod", {k: v for k, v in args.items() if k in own})
        pod.evict = evict
        pod.__post_init__()
        return pod
    cls = _REGISTRY.get(name)
    if cls is None:
        raise LocalkvError(f"unknown policy '{name}': choose one of {', '.join(_REGISTRY)}")
    kwargs = {}
    known = {f.name: f for f in fields(cls) if f.name not in cls.not_arguments}
    for key, raw in (args or {}).items():
        if key not in known:
            choices = ", ".join(known) or "none"
            raise LocalkvError(f"policy {name} has no argument '{key}' (its arguments: {choices})")
        default = known[key].default
        try:
            kwargs[key] = type(default)(raw) if not isinstance(default, bool) else _bool(raw)
        except (ValueError, OverflowError):
            raise PolicyArgError(key, f"policy argument {key}={raw!r} is not a valid {type(default).__name__}") \
                from None
    policy = cls(**kwargs)
    policy.check_arguments()
    return policy


def conversation_args(name: str, args: dict[str, str]) -> dict[str, str]:
    """A conversation's earlier turns are compressed before the later questions exist: a policy that can replay
    them (KVzip's reconstruction, `replay=true`) does so unless told otherwise (measured in docs/results.md,
    "KVzip: a chat that remembers": SnapKV keeps no fact of an earlier turn at a third of the conversation
    without it). The chat and the server hold conversations (Engine(conversation=True))."""
    cls = _REGISTRY.get(name)
    if cls is not None and "replay" in {f.name for f in fields(cls)} and "replay" not in args:
        return {**args, "replay": "true"}
    return args


def _bool(raw: str) -> bool:
    low = raw.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)
