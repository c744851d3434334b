"""A non-editable install: the wheel holds every module, the model registry, the shipped profiles and the C
sources and hook patches that `python -m localkv.build` builds from, and runs from there (no checkout)."""
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# what a build leaves in a checkout: never copied, so a stale build/lib cannot hide a missing package
_GENERATED = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                                    ".hypothesis")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The wheel `pip wheel --no-deps --no-build-isolation .` builds, from a clean copy of the checkout."""
    tmp = tmp_path_factory.mktemp("packaging")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=_GENERATED)
    out = tmp / "wheel"
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                        "--disable-pip-version-check", "-q", "-w", str(out), "."],
                       cwd=src, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    (whl,) = out.glob("localkv-*.whl")
    return whl


@pytest.fixture(scope="module")
def names(wheel):
    return set(zipfile.ZipFile(wheel).namelist())


def _missing(expected, names):
    return sorted(set(expected) - names)


def test_wheel_holds_every_module(names):
    modules = [p.relative_to(ROOT).as_posix() for p in (ROOT / "localkv").rglob("*.py")
               if "__pycache__" not in p.parts]
    assert "localkv/bench/__init__.py" in modules and "localkv/policies/__init__.py" in modules
    assert not _missing(modules, names), "add the package to pyproject's [tool.setuptools] packages"


def test_wheel_holds_the_registry_and_the_profiles(names):
    data = [p.relative_to(ROOT).as_posix() for p in (ROOT / "localkv" / "data").rglob("*") if p.is_file()]
    assert "localkv/data/registry.json" in data
    assert any(d.startswith("localkv/data/profiles/surfacelogickv-") for d in data)
    assert any(d.startswith("localkv/data/profiles/pod-") for d in data)
    assert not _missing(data, names)


def test_wheel_holds_the_c_sources_and_hooks(names):
    from localkv import build
    assert build.PATCH_DIR == ROOT / "patches"  # a checkout builds from its own patches/
    files = [*build.source_files(), *(p.relative_to(build.PATCH_DIR) for p in build.patch_files())]
    assert any(f.parts[0] == "include" for f in files) and any(f.parts[0] == "src" for f in files)
    assert any(f.suffix == ".patch" for f in files)
    assert not _missing([f"localkv/llama_patches/{f.as_posix()}" for f in files], names)


def test_the_unpacked_wheel_works_without_the_checkout(wheel, tmp_path):
    """Registry, profiles and the build's inputs from the package alone; the wheel cache key is the
    checkout's (it hashes file contents), so both find the same cached patched llama.cpp."""
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    probe = f"""
import json, sys
sys.path.insert(0, {str(site)!r})
import localkv
from localkv import build, calibrate, models
entry = next(e for e in models.load_registry() if e["default"])
print(json.dumps({{
    "package": localkv.__file__, "patch_dir": str(build.PATCH_DIR),
    "key": build.cache_key(build.build_flags()),
    "sources": len(build.source_files()), "patches": len(build.patch_files()),
    "profiles": [str(calibrate.find_profile(entry["sha256"], kind)) for kind in ("surfacelogickv", "pod")],
}}))
"""
    env = dict(os.environ, LOCALKV_CACHE=str(tmp_path / "empty-cache"))
    p = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, env=env,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout)
    from localkv import build
    assert got["package"].startswith(str(site))
    assert got["patch_dir"] == str(site / "localkv" / "llama_patches")
    assert (got["sources"], got["patches"]) == (len(build.source_files()), len(build.patch_files()))
    assert got["key"] == build.cache_key(build.build_flags())
    for path in got["profiles"]:
        assert path.startswith(str(site / "localkv" / "data" / "profiles")), got["profiles"]
