"""Where each tensor of a GGUF file lies: the header read without building its metadata.

`gguf.GGUFReader` turns every metadata value into numpy views, 150k vocabulary strings
included, which takes most of a minute on two cores for a Qwen file; the packed loader needs
only the architecture and the tensor table (the tokenizer comes from transformers, once).
This reads the header with `struct`, skipping values it does not keep, and checks that every
tensor's bytes lie inside the file, naming the tensor that does not (a truncated copy).

Layout (GGUF v2/v3, little-endian): magic "GGUF", u32 version, u64 tensor count, u64 metadata
count; metadata as (string key, u32 type, value); tensor infos as (string name, u32 dims,
u64 dims..., u32 ggml type, u64 offset); then the data, aligned to `general.alignment` (32).
"""
from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

# Fixed sizes of GGUF metadata value types (8 = string, 9 = array are read separately).
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9


class GGUFFormatError(ValueError):
    """The file is not a GGUF file this reader understands, or a tensor is cut short."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    qtype: gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # outermost first (rows, columns), as torch orders it
    offset: int  # absolute byte offset in the file
    n_bytes: int


class GGUFDirectory:
    def __init__(self, path: Path) -> None:
        self.path = path
        with open(path, "rb") as f:
            try:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except ValueError:  # an empty file cannot be mapped
                raise GGUFFormatError(f"{path} is empty") from None
        self._pos = 0
        try:
            self.metadata, self.tensors = self._read()
        except struct.error:
            raise GGUFFormatError(f"{path}: the header is cut short (a truncated file?)") from None
        finally:
            self._map.close()  # only the header was read through it

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def array(self, info: TensorInfo) -> np.ndarray:
        """A copy of the tensor's bytes: quantized types as uint8 [rows, row_bytes], float
        types as their numpy dtype in `shape`. Read with a plain file read, not through the
        map: mapped pages would count once more in the process's resident memory."""
        dtype = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16}.get(info.qtype)
        raw = np.empty(info.n_bytes, dtype=np.uint8)
        with open(self.path, "rb") as f:
            f.seek(info.offset)
            if f.readinto(memoryview(raw)) != info.n_bytes:
                raise GGUFFormatError(f"{self.path}: tensor {info.name!r} could not be read whole")
        if dtype is not None:
            return raw.view(dtype).reshape(info.shape)
        return raw.reshape(info.shape[:-1] + (-1,)) if len(info.shape) > 1 else raw

    def _unpack(self, fmt: str):
        values = struct.unpack_from("<" + fmt, self._map, self._pos)
        self._pos += struct.calcsize("<" + fmt)
        return values if len(values) > 1 else values[0]

    def _string(self) -> str:
        n = self._unpack("Q")
        s = bytes(self._map[self._pos:self._pos + n])
        self._pos += n
        return s.decode("utf-8", errors="replace")

    def _value(self, kind: int, keep: bool):
        if kind == _STRING:
            return self._string()
        if kind == _ARRAY:
            item, count = self._unpack("IQ")
            if item in _SCALAR_SIZES:
                self._pos += _SCALAR_SIZES[item] * count
            else:
                for _ in range(count):
                    self._value(item, False)
            return None
        if kind not in _SCALAR_SIZES:
            raise GGUFFormatError(f"{self.path}: unknown metadata value type {kind}")
        fmt = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}[kind]
        value = self._unpack(fmt)
        return value if keep else None

    def _read(self):
        if bytes(self._map[:4]) != b"GGUF":
            raise GGUFFormatError(f"{self.path} is not a GGUF file (no GGUF magic)")
        self._pos = 4
        version, n_tensors, n_kv = self._unpack("IQQ")
        if version not in (2, 3):
            raise GGUFFormatError(f"{self.path}: GGUF version {version} is not supported (2 or 3; a "
                                  "big-endian file reads as a huge version)")
        metadata = {}
        for _ in range(n_kv):
            key = self._string()
            kind = self._unpack("I")
            value = self._value(kind, keep=True)
            if value is not None:
                metadata[key] = value
        raw = []
        for _ in range(n_tensors):
            name = self._string()
            n_dims = self._unpack("I")
            dims = [self._unpack("Q") for _ in range(n_dims)]
            qtype, offset = self._unpack("IQ")
            raw.append((name, dims, qtype, offset))
        alignment = int(metadata.get("general.alignment", 32))
        start = -(-self._pos // alignment) * alignment
        tensors = {}
        for name, dims, qtype, offset in raw:
            try:
                kind = gguf.GGMLQuantizationType(qtype)
            except ValueError:
                raise GGUFFormatError(f"{self.path}: tensor {name!r} has unknown ggml type {qtype}") from None
            elems, size = gguf.GGML_QUANT_SIZES[kind]
            count = int(np.prod(dims)) if dims else 1
            if dims and dims[0] % elems:
                raise GGUFFormatError(f"{self.path}: tensor {name!r} rows of {dims[0]} are not whole "
                                      f"{kind.name} blocks of {elems}")
            info = TensorInfo(name, kind, tuple(reversed(dims)), start + offset, count // elems * size)
            if info.offset + info.n_bytes > len(self._map):
                raise GGUFFormatError(
                    f"{self.path}: tensor {name!r} is truncated: its data ends at byte "
                    f"{info.offset + info.n_bytes:,} of a {len(self._map):,}-byte file (an incomplete "
                    "download or copy?)")
            tensors[name] = info
        return metadata, tensors
