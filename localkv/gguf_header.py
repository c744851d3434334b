"""A small, pure-Python reader for the header of a GGUF model file.

It reads the metadata key/value pairs and the tensor table, never the tensor
data, so it is cheap even for multi-GB models. The header itself can be several
MB (the tokenizer's vocabulary is stored as string arrays); large arrays are
skipped rather than decoded and only their length is kept.

Layout (GGUF v2/v3, little-endian):
    magic b"GGUF" | u32 version | u64 tensor_count | u64 kv_count
    kv_count x (string key, u32 value_type, value)
    tensor_count x (string name, u32 n_dims, u64 dims[n_dims], u32 ggml_type, u64 offset)
    padding to `general.alignment` (default 32), then the tensor data section.
A string is a u64 byte length followed by UTF-8 bytes.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from localkv.errors import LocalkvError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

# Arrays longer than this are not decoded (tokenizer tokens/scores/merges);
# the metadata dict holds a SkippedArray with their length instead.
MAX_DECODED_ARRAY = 256

# GGUF metadata value types -> struct format of one scalar.
_SCALAR_FORMATS = {
    0: "<B",  # uint8
    1: "<b",  # int8
    2: "<H",  # uint16
    3: "<h",  # int16
    4: "<I",  # uint32
    5: "<i",  # int32
    6: "<f",  # float32
    7: "<?",  # bool
    10: "<Q",  # uint64
    11: "<q",  # int64
    12: "<d",  # float64
}
_STRING, _ARRAY = 8, 9
_VALUE_TYPE_NAMES = {
    0: "uint8", 1: "int8", 2: "uint16", 3: "int16", 4: "uint32", 5: "int32",
    6: "float32", 7: "bool", 8: "string", 9: "array", 10: "uint64", 11: "int64",
    12: "float64",
}

# ggml tensor types: id -> (name, elements per block, bytes per block).
# Ids 4, 5 and 31..33, 36..38 were removed from the format and never appear.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    9: ("Q8_1", 32, 36),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66),
    17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18),
    21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
    40: ("NVFP4", 64, 36),
    41: ("Q1_0", 128, 18),
    42: ("Q2_0", 64, 18),
}

# llama.cpp's `general.file_type` (llama_ftype) -> the usual quant label.
FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1",
    10: "Q2_K", 11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S",
    15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS",
    20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S",
    25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M",
    30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0", 37: "TQ2_0",
    38: "MXFP4_MOE",
}

_MAX_DIMS = 4  # GGML_MAX_DIMS: more means the file is corrupt


@dataclass(frozen=True)
class SkippedArray:
    """Stands in for a metadata array too long to be worth decoding."""

    item_type: str
    length: int

    def __len__(self) -> int:
        return self.length


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int  # relative to GGUFInfo.data_offset

    @property
    def type_name(self) -> str:
        return GGML_TYPES.get(self.ggml_type, (f"type{self.ggml_type}",))[0]

    @property
    def nbytes(self) -> int | None:
        """Bytes of tensor data, or None for a ggml type this reader doesn't know."""
        known = GGML_TYPES.get(self.ggml_type)
        if known is None:
            return None
        _, block, block_bytes = known
        n = 1
        for d in self.shape:
            n *= d
        return n // block * block_bytes


@dataclass
class GGUFInfo:
    path: Path
    version: int
    architecture: str | None
    metadata: dict[str, Any]
    tensor_count: int
    data_offset: int
    expected_size: int | None  # None when a tensor has an unknown ggml type
    file_size: int
    tensors: list[TensorInfo] = field(default_factory=list, repr=False)

    @property
    def quant(self) -> str | None:
        """The quantization label from `general.file_type`, e.g. "Q4_K_M"."""
        ft = self.metadata.get("general.file_type")
        return FILE_TYPES.get(ft) if isinstance(ft, int) else None


class _Reader:
    """Buffered sequential reads that turn EOF into a one-line LocalkvError."""

    def __init__(self, f: BinaryIO, path: Path, size: int):
        self.f, self.path, self.size = f, path, size
        self.pos = 0

    def truncated(self, what: str) -> LocalkvError:
        return LocalkvError(
            f"{self.path} is truncated: its GGUF header ends early while reading {what} "
            f"({self.size} bytes); re-download or re-assemble the model"
        )

    def read(self, n: int, what: str) -> bytes:
        if n > self.size - self.pos:  # checked first so a corrupt length can't allocate GBs
            raise self.truncated(what)
        data = self.f.read(n)
        if len(data) != n:
            raise self.truncated(what)
        self.pos += n
        return data

    def skip(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise self.truncated(what)
        self.f.seek(n, os.SEEK_CUR)
        self.pos += n

    def scalar(self, fmt: str, what: str) -> Any:
        return struct.unpack(fmt, self.read(struct.calcsize(fmt), what))[0]

    def u32(self, what: str) -> int:
        return self.scalar("<I", what)

    def u64(self, what: str) -> int:
        return self.scalar("<Q", what)

    def string(self, what: str) -> str:
        return self.read(self.u64(what), what).decode("utf-8", errors="replace")

    def skip_string(self, what: str) -> None:
        self.skip(self.u64(what), what)

    def value(self, vtype: int, what: str) -> Any:
        fmt = _SCALAR_FORMATS.get(vtype)
        if fmt is not None:
            return self.scalar(fmt, what)
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            return self.array(what)
        raise LocalkvError(
            f"{self.path} is not a valid GGUF file: unknown metadata type {vtype} in {what}; "
            "re-download or re-assemble the model"
        )

    def array(self, what: str) -> Any:
        item_type = self.u32(what)
        length = self.u64(what)
        if length <= MAX_DECODED_ARRAY:
            return [self.value(item_type, what) for _ in range(length)]
        # Long array: skip without building Python objects. Fixed-size items are
        # one seek; strings need their length prefix read one by one.
        fmt = _SCALAR_FORMATS.get(item_type)
        if fmt is not None:
            self.skip(length * struct.calcsize(fmt), what)
        elif item_type == _STRING:
            for _ in range(length):
                self.skip_string(what)
        else:
            for _ in range(length):
                self.value(item_type, what)
        return SkippedArray(_VALUE_TYPE_NAMES.get(item_type, str(item_type)), length)


def _open_checked(path: Path) -> tuple[BinaryIO, int]:
    if not path.exists():
        raise LocalkvError(f"model file {path} does not exist; check the path or run `localkv models list`")
    if path.is_dir():
        raise LocalkvError(f"{path} is a directory, not a GGUF model file; pass the path of the .gguf file")
    try:
        f = open(path, "rb", buffering=1 << 20)
    except OSError as e:
        raise LocalkvError(f"cannot open model file {path}: {e.strerror}; check its permissions") from e
    size = os.fstat(f.fileno()).st_size
    if size == 0:
        f.close()
        raise LocalkvError(f"{path} is empty (0 bytes); re-download or re-assemble the model")
    return f, size


def read_header(path: str | os.PathLike[str]) -> GGUFInfo:
    """Parse the GGUF header of `path` and check the file is long enough.

    Raises LocalkvError (one line) for a missing file, a directory, an empty or
    non-GGUF file, an unsupported version, or a header/data section cut short.
    """
    path = Path(path)
    f, size = _open_checked(path)
    with f:
        r = _Reader(f, path, size)
        magic = f.read(4)
        r.pos = len(magic)
        if magic != GGUF_MAGIC:
            raise LocalkvError(
                f"{path} is not a GGUF model file (starts with {magic!r}, expected b'GGUF'); "
                "pass a .gguf file"
            )
        version = r.u32("the version")
        if version not in SUPPORTED_VERSIONS:
            raise LocalkvError(
                f"{path} uses GGUF version {version}, which localkv does not support "
                f"(only {' and '.join(map(str, SUPPORTED_VERSIONS))}); convert it with a current llama.cpp"
            )
        tensor_count = r.u64("the tensor count")
        kv_count = r.u64("the metadata count")

        metadata: dict[str, Any] = {}
        for i in range(kv_count):
            key = r.string(f"metadata key #{i}")
            vtype = r.u32(f"the type of {key!r}")
            metadata[key] = r.value(vtype, repr(key))

        tensors = []
        for i in range(tensor_count):
            name = r.string(f"tensor #{i}")
            n_dims = r.u32(f"tensor {name!r}")
            if n_dims > _MAX_DIMS:
                raise LocalkvError(
                    f"{path} is not a valid GGUF file: tensor {name!r} has {n_dims} dims; "
                    "re-download or re-assemble the model"
                )
            shape = tuple(r.u64(f"tensor {name!r}") for _ in range(n_dims))
            ggml_type = r.u32(f"tensor {name!r}")
            offset = r.u64(f"tensor {name!r}")
            tensors.append(TensorInfo(name, shape, ggml_type, offset))
        header_end = r.pos

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0:
        alignment = DEFAULT_ALIGNMENT
    data_offset = -(-header_end // alignment) * alignment

    expected: int | None
    if not tensors:
        expected = header_end  # nothing follows the header, not even padding
    else:
        sizes = [t.nbytes for t in tensors]
        expected = None if None in sizes else data_offset + max(
            t.offset + n for t, n in zip(tensors, sizes)
        )
    if expected is not None and size < expected:
        raise LocalkvError(
            f"{path} is truncated: {size} bytes but its header needs {expected}; "
            "re-download or re-assemble the model"
        )

    arch = metadata.get("general.architecture")
    return GGUFInfo(
        path=path,
        version=version,
        architecture=arch if isinstance(arch, str) else None,
        metadata=metadata,
        tensor_count=tensor_count,
        data_offset=data_offset,
        expected_size=expected,
        file_size=size,
        tensors=tensors,
    )


def _arch_int(info: GGUFInfo, suffix: str) -> int | None:
    """`<arch>.<suffix>` as an int. Some architectures store per-layer arrays
    (e.g. head counts); the largest entry is returned, the safe value for sizing."""
    value = info.metadata.get(f"{info.architecture}.{suffix}")
    if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
        return max(value)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def context_length(info: GGUFInfo) -> int | None:
    return _arch_int(info, "context_length")


def block_count(info: GGUFInfo) -> int | None:
    return _arch_int(info, "block_count")


def head_count(info: GGUFInfo) -> int | None:
    return _arch_int(info, "attention.head_count")


def head_count_kv(info: GGUFInfo) -> int | None:
    """KV heads; GGUF omits the key when it equals head_count (no GQA)."""
    return _arch_int(info, "attention.head_count_kv") or head_count(info)


def embedding_length(info: GGUFInfo) -> int | None:
    return _arch_int(info, "embedding_length")


def key_length(info: GGUFInfo) -> int | None:
    """Per-head key dim; defaults to embedding_length / head_count as in llama.cpp."""
    explicit = _arch_int(info, "attention.key_length")
    if explicit:
        return explicit
    n_embd, n_head = embedding_length(info), head_count(info)
    return n_embd // n_head if n_embd and n_head else None
