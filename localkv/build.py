"""Build and install the patched llama.cpp (as the `llama_cpp` Python package).

    python -m localkv.build            # fetch, verify, patch, build (or reuse the cache), install
    python -m localkv.build --check    # only check that our sources and every hook patch apply
    python -m localkv.build tree DIR   # a git tree of the pinned llama.cpp with our sources and hooks
    python -m localkv.build export DIR # write patches/ back from such a tree

patches/ holds what we add to the vendored llama.cpp: our own files as ordinary
source (patches/include/ and patches/src/, copied to the same folders of
vendor/llama.cpp, where none of them may exist already) and a few small hook
patches into upstream files (patches/NNNN-*.patch, applied in order).

Steps: download the pinned llama-cpp-python sdist with pip, check its sha256,
copy our sources into its vendor/llama.cpp, `git apply --check` then
`git apply` every hook patch, build a wheel with a lean target list, keep it in
a cache keyed by (sdist hash, source and patch hashes, build flags), and
pip-install it.  A second run with nothing changed installs the cached wheel in
seconds.

CPU by default; LOCALKV_CUDA=1 adds -DGGML_CUDA=ON; CMAKE_ARGS passes through
(and is part of the cache key); on macOS the sdist turns Metal on by itself.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

PIN = "0.3.36"
SDIST_NAME = f"llama_cpp_python-{PIN}.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"

REPO_ROOT = Path(__file__).resolve().parent.parent
# the checkout's patches/ when running from one (editable install, developers), else the copy that pyproject
# ships inside the package as localkv.llama_patches (a wheel); the cache key hashes contents, so both find
# the same cached wheel
PATCH_DIR = (REPO_ROOT / "patches" if (REPO_ROOT / "pyproject.toml").is_file() and (REPO_ROOT / "patches").is_dir()
             else Path(__file__).resolve().parent / "llama_patches")
SOURCE_DIRS = ("include", "src")  # patches/<dir>/* is copied to vendor/llama.cpp/<dir>/
VENDOR = "vendor/llama.cpp"

# Only what the Python bindings load: libllama (+ ggml backends, pulled in as
# dependencies). llama-common is listed because llama.cpp's install rules
# install it whenever the sdist forces LLAMA_BUILD_COMMON on.
BUILD_TARGETS = "llama;llama-common"
LEAN_CMAKE_ARGS = [
    "-DLLAVA_BUILD=OFF",            # no multimodal library
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_TOOLS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DGGML_RPC=ON",                # layers on other machines (`localkv rpc-server`, `--rpc HOST:PORT`)
]


class BuildError(Exception):
    """A build step failed; the message is one line for the user."""


def cache_dir() -> Path:
    root = os.environ.get("LOCALKV_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "localkv")
    return Path(root)


def patch_files() -> list[Path]:
    """The hook patches into upstream files, in the order they apply."""
    return sorted(PATCH_DIR.glob("[0-9][0-9][0-9][0-9]-*.patch"))


def source_files() -> list[Path]:
    """Our own C/C++ files, relative to patches/ (and so to the vendored llama.cpp they are copied into)."""
    return sorted(p.relative_to(PATCH_DIR) for d in SOURCE_DIRS for p in (PATCH_DIR / d).glob("*") if p.is_file())


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def build_flags() -> list[str]:
    """The cmake arguments that shape the binary (part of the cache key)."""
    flags = list(LEAN_CMAKE_ARGS)
    if os.environ.get("LOCALKV_CUDA", "") not in ("", "0"):
        flags.append("-DGGML_CUDA=ON")
    extra = os.environ.get("CMAKE_ARGS", "").split()
    flags += extra
    return flags


def cache_key(flags: list[str]) -> str:
    h = hashlib.sha256()
    h.update(SDIST_SHA256.encode())
    for rel in [*source_files(), *(p.relative_to(PATCH_DIR) for p in patch_files())]:
        h.update(str(rel).encode())
        h.update(sha256_file(PATCH_DIR / rel).encode())
    h.update(json.dumps(flags).encode())
    h.update(f"{sys.implementation.cache_tag}-{platform.machine()}-{platform.system()}".encode())
    return h.hexdigest()[:24]


def run(cmd: list[str], log: Path | None = None, **kw) -> None:
    if log is None:
        res = subprocess.run(cmd, **kw)
    else:
        with open(log, "ab") as f:
            res = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, **kw)
    if res.returncode != 0:
        where = f" (log: {log})" if log else ""
        raise BuildError(f"command failed with exit code {res.returncode}: {' '.join(cmd[:4])} ...{where}")


def fetch_sdist() -> Path:
    """The pinned sdist from PyPI (cached), verified against its sha256."""
    ensure_build_deps()
    dest = cache_dir() / "sdist"
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / SDIST_NAME
    if not path.exists():
        print(f"localkv: downloading llama-cpp-python=={PIN} sdist", flush=True)
        with tempfile.TemporaryDirectory(dir=dest) as tmp:
            run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                 "--no-build-isolation", f"llama-cpp-python=={PIN}", "-d", tmp])
            got = Path(tmp) / SDIST_NAME
            if not got.exists():
                raise BuildError(f"pip did not produce {SDIST_NAME}")
            os.replace(got, path)
    digest = sha256_file(path)
    if digest != SDIST_SHA256:
        path.unlink()
        raise BuildError(f"{SDIST_NAME} has sha256 {digest}, expected {SDIST_SHA256}; removed it, run again")
    return path


def extract_sdist(sdist: Path, into: Path) -> Path:
    with tarfile.open(sdist) as tar:
        tar.extractall(into, filter="data")
    return into / f"llama_cpp_python-{PIN}"


def copy_sources(llama: Path) -> None:
    """Our own files into the vendored llama.cpp; each must be new there (a hook patch changes upstream's)."""
    for rel in source_files():
        dest = llama / rel
        if dest.exists():
            raise BuildError(f"patches/{rel} would overwrite llama.cpp's own {rel}; change upstream files by a hook patch")
        shutil.copy2(PATCH_DIR / rel, dest)


def apply_patches(src: Path) -> None:
    """Copy our sources in, then git apply --check and git apply each hook patch in order; stop at the first
    that fails."""
    copy_sources(src / VENDOR)
    for p in patch_files():
        for args in (["--check"], []):
            res = subprocess.run(["git", "apply", *args, f"--directory={VENDOR}", str(p)],
                                 cwd=src, capture_output=True, text=True)
            if res.returncode != 0:
                first = (res.stderr.strip().splitlines() or ["no detail"])[0]
                raise BuildError(f"patch {p.name} does not apply to llama-cpp-python {PIN}: {first}")


def build_wheel(src: Path, flags: list[str], out: Path, log: Path) -> Path:
    """pip wheel on the patched source. The source and build directories are fixed per flag set, so ccache
    (paths are part of its key) and cmake reuse everything a patch did not touch."""
    env = dict(os.environ)
    launcher = []
    if shutil.which("ccache"):
        launcher = ["-DCMAKE_C_COMPILER_LAUNCHER=ccache", "-DCMAKE_CXX_COMPILER_LAUNCHER=ccache",
                    "-DCMAKE_CUDA_COMPILER_LAUNCHER=ccache"]
    env["CMAKE_ARGS"] = " ".join(flags + launcher)
    env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
    build_dir = cache_dir() / "build" / hashlib.sha256(json.dumps(flags).encode()).hexdigest()[:12]
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(out),
         "-C", f"build.targets={BUILD_TARGETS}", "-C", f"build-dir={build_dir}", str(src)], log=log, env=env)
    wheels = list(out.glob("llama_cpp_python-*.whl"))
    if len(wheels) != 1:
        raise BuildError(f"expected one wheel in {out}, found {len(wheels)}")
    return wheels[0]


def ensure_build_deps() -> None:
    """The sdist's build backend, installed once so builds need no isolation env."""
    try:
        import scikit_build_core  # noqa: F401
    except ImportError:
        run([sys.executable, "-m", "pip", "install", "--quiet", "scikit-build-core[pyproject]>=0.9.2"])


def wheel_for_current_config(force: bool = False) -> Path:
    flags = build_flags()
    key = cache_key(flags)
    slot = cache_dir() / "wheels" / key
    cached = list(slot.glob("*.whl")) if slot.exists() else []
    if cached and not force:
        print(f"localkv: using cached patched wheel {slot.name}", flush=True)
        return cached[0]
    sdist = fetch_sdist()
    slot.parent.mkdir(parents=True, exist_ok=True)
    work = cache_dir() / "src"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="localkv-build-") as tmp:
        tmp = Path(tmp)
        src = extract_sdist(sdist, work)
        apply_patches(src)
        print(f"localkv: added {len(source_files())} source files and applied {len(patch_files())} hook patches; "
              f"building llama.cpp "
              f"(flags: {' '.join(flags)}) -- several minutes on a cold cache", flush=True)
        log = cache_dir() / "build.log"
        log.write_text("")
        t0 = time.time()
        wheel = build_wheel(src, flags, tmp / "out", log)
        # publish atomically: a half-copied wheel never sits in the cache slot
        staging = Path(tempfile.mkdtemp(dir=slot.parent, prefix=".staging-"))
        shutil.copy2(wheel, staging / wheel.name)
        (staging / "build.json").write_text(json.dumps(
            {"flags": flags, "sources": [str(p) for p in source_files()], "patches": [p.name for p in patch_files()],
             "seconds": round(time.time() - t0, 1)}))
        if slot.exists():
            shutil.rmtree(slot)
        os.replace(staging, slot)
        print(f"localkv: built in {time.time() - t0:.0f}s", flush=True)
        return slot / wheel.name


def install(force: bool = False) -> None:
    import fcntl
    cache_dir().mkdir(parents=True, exist_ok=True)
    with open(cache_dir() / "build.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print("localkv: another build is running; waiting for it", flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        wheel = wheel_for_current_config(force)
    run([sys.executable, "-m", "pip", "install", "--quiet", "--force-reinstall", "--no-deps", str(wheel)])
    # runtime dependencies of llama_cpp, resolved normally (already present on a second run)
    run([sys.executable, "-m", "pip", "install", "--quiet", "typing-extensions>=4.5.0", "numpy>=1.20.0",
         "diskcache>=5.6.1", "jinja2>=2.11.3"])
    print(f"localkv: installed patched llama_cpp from {wheel.name}", flush=True)


def copy_wheel(dest: Path, force: bool = False) -> None:
    """The patched wheel of the current flags (built, or from the cache) copied into `dest`, not installed: a CUDA
    build (LOCALKV_CUDA=1) made on a machine without a GPU, for the GPU check (scripts/gpu_check.sh)."""
    import fcntl
    cache_dir().mkdir(parents=True, exist_ok=True)
    with open(cache_dir() / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        wheel = wheel_for_current_config(force)
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(wheel, dest / wheel.name)
    print(f"localkv: wrote {dest / wheel.name} ({wheel.stat().st_size / 2**20:.1f} MiB)")


def make_tree(dest: Path) -> None:
    """A git repository of the pinned vendored llama.cpp (tag localkv-base), then one commit with our sources,
    then one commit per hook patch: edit it as code, commit, and `export` writes patches/ back."""
    if dest.exists():
        raise BuildError(f"{dest} already exists")
    sdist = fetch_sdist()
    with tempfile.TemporaryDirectory() as tmp:
        src = extract_sdist(sdist, Path(tmp))
        # the sdist keeps llama.cpp's submodule gitlink (.git, a file pointing outside): not a repository here
        shutil.copytree(src / VENDOR, dest, ignore=lambda d, names: [".git"] if Path(d) == src / VENDOR else [])
    git = ["git", "-c", "user.name=localkv", "-c", "user.email=dev@localkv"]
    run(["git", "init", "-q"], cwd=dest)
    run(["git", "add", "-A"], cwd=dest)
    run(git + ["commit", "-q", "-m", f"llama.cpp vendored in llama-cpp-python {PIN}"], cwd=dest)
    run(["git", "tag", "localkv-base"], cwd=dest)
    copy_sources(dest)
    run(["git", "add", "--", *map(str, source_files())], cwd=dest)
    run(git + ["commit", "-q", "-m", "localkv: own sources (patches/include, patches/src)"], cwd=dest)
    for p in patch_files():
        run(git + ["am", "-q", str(p)], cwd=dest)


def git_lines(tree: Path, *args: str) -> list[str]:
    res = subprocess.run(["git", *args], cwd=tree, capture_output=True, text=True)
    if res.returncode != 0:
        raise BuildError(f"git {args[0]} failed in {tree}: {(res.stderr.strip().splitlines() or ['no detail'])[0]}")
    return [line for line in res.stdout.splitlines() if line]


def export_tree(tree: Path) -> None:
    """Write patches/ back from a tree made by `tree`: files the commits since localkv-base added under
    include/ and src/ become our sources; what they changed in upstream's files becomes the hook patches,
    one per commit that touches upstream (squash a fix into the hook it fixes before exporting)."""
    added = git_lines(tree, "diff", "--name-only", "--diff-filter=A", "localkv-base", "HEAD")
    stray = [f for f in added if Path(f).parent.as_posix() not in SOURCE_DIRS]
    if stray:
        raise BuildError(f"new files outside {'/, '.join(SOURCE_DIRS)}/ are not exported: {', '.join(stray)}")
    with tempfile.TemporaryDirectory() as tmp:
        run(["git", "format-patch", "-q", "--no-signature", "--zero-commit", "--no-stat",
             "-o", tmp, "localkv-base..HEAD", "--", ".", *[f":(exclude){f}" for f in added]], cwd=tree)
        new = sorted(Path(tmp).glob("*.patch"))
        for old in [*patch_files(), *(PATCH_DIR / f for f in source_files())]:
            old.unlink()
        for p in new:
            shutil.copy2(p, PATCH_DIR / p.name)
        for f in added:
            (PATCH_DIR / f).parent.mkdir(exist_ok=True)
            shutil.copy2(tree / f, PATCH_DIR / f)
    print(f"localkv: wrote {len(added)} source files and {len(new)} hook patches to {PATCH_DIR}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m localkv.build", description=__doc__.split("\n")[0])
    ap.add_argument("action", nargs="?", default="install", choices=["install", "wheel", "tree", "export"])
    ap.add_argument("dir", nargs="?", type=Path)
    ap.add_argument("--check", action="store_true", help="only check that the patches apply")
    ap.add_argument("--force", action="store_true", help="rebuild even if a cached wheel exists")
    ap.add_argument("--print-key", action="store_true", help="print the wheel cache key and exit")
    args = ap.parse_args(argv)
    try:
        if args.print_key:
            print(cache_key(build_flags()))
        elif args.check:
            with tempfile.TemporaryDirectory() as tmp:
                apply_patches(extract_sdist(fetch_sdist(), Path(tmp)))
            print(f"localkv: our {len(source_files())} source files and all {len(patch_files())} hook patches "
                  f"apply to llama-cpp-python {PIN}")
        elif args.action == "install":
            install(args.force)
        elif args.dir is None:
            raise BuildError(f"'{args.action}' needs a directory")
        elif args.action == "wheel":
            copy_wheel(args.dir, args.force)
        elif args.action == "tree":
            make_tree(args.dir)
        else:
            export_tree(args.dir)
    except BuildError as e:
        print(f"localkv build: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("localkv build: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
