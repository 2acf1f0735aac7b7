"""A GGUF file as a tensor source: metadata, config and dequantised tensors.

Opening a file parses only its header, with a reader of our own: the metadata (the vocabulary
arrays included, since Gemma 3's 262k token strings hold the special tokens) and the tensor
table. The ``gguf`` package's ``GGUFReader`` builds a numpy view for every token string, which
takes about 20 s for Gemma 3 270M on a loaded 2-core machine; this reader takes well under one.
Each tensor's extent is checked against the file's size before any tensor is touched, so a
truncated file is reported as "truncated at tensor T". ``reader`` (the ``gguf`` package's
reader) is still built on first use, for the tokenizer conversion.

Every tensor type the ``gguf`` package can dequantize is supported (the embedded Gemma 3 270M
holds F32, Q8_0, Q5_0, Q4_K and Q6_K). Tensors are dequantised one at a time from the
memory-mapped file.
"""

from __future__ import annotations

import functools
import struct
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf.quants import quant_shape_to_byte_shape

from mtijax.models.architecture import ModelConfig
from mtijax.weights.configs import config_from_gguf
from mtijax.errors import MtijaxError
from mtijax.weights.names import TensorSlot

SKIPPED_FIELDS = {"tokenizer.ggml.scores", "tokenizer.ggml.merges"}
"""Vocabulary arrays the header parse walks past without keeping (the tokenizer conversion reads them through
:attr:`GGUFFile.reader`). The tokens and their types are :attr:`GGUFFile.tokens` and :attr:`GGUFFile.token_types`;
neither is in :attr:`GGUFFile.metadata`."""
_SCALARS = {
    gguf.GGUFValueType.UINT8: "<B", gguf.GGUFValueType.INT8: "<b", gguf.GGUFValueType.UINT16: "<H",
    gguf.GGUFValueType.INT16: "<h", gguf.GGUFValueType.UINT32: "<I", gguf.GGUFValueType.INT32: "<i",
    gguf.GGUFValueType.FLOAT32: "<f", gguf.GGUFValueType.BOOL: "<?", gguf.GGUFValueType.UINT64: "<Q",
    gguf.GGUFValueType.INT64: "<q", gguf.GGUFValueType.FLOAT64: "<d",
}
_PLAIN_TYPES = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16,
                gguf.GGMLQuantizationType.F64: np.float64, gguf.GGMLQuantizationType.I8: np.int8,
                gguf.GGMLQuantizationType.I16: np.int16, gguf.GGMLQuantizationType.I32: np.int32,
                gguf.GGMLQuantizationType.I64: np.int64}


class _Truncated(Exception):
    """The header ends before a field does."""


class _Header:
    """A cursor over the header bytes, reading GGUF's little-endian scalars, strings and arrays."""

    def __init__(self, data: memoryview):
        self.data, self.at = data, 0

    def take(self, n: int) -> memoryview:
        if self.at + n > len(self.data):
            raise _Truncated
        view = self.data[self.at:self.at + n]
        self.at += n
        return view

    def scalar(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self, keep: bool = True) -> str | None:
        raw = self.take(self.scalar("<Q"))
        return bytes(raw).decode("utf-8", errors="replace") if keep else None

    def value(self, kind: int, keep: bool = True) -> Any:
        """One value of GGUF type ``kind``: a scalar, a string, a numpy array (arrays of numbers) or a list;
        ``keep=False`` walks past it and returns None."""
        kind = gguf.GGUFValueType(kind)
        if kind == gguf.GGUFValueType.STRING:
            return self.string(keep)
        if kind != gguf.GGUFValueType.ARRAY:
            return self.scalar(_SCALARS[kind])
        item, count = gguf.GGUFValueType(self.scalar("<I")), self.scalar("<Q")
        if item in _SCALARS:
            dtype = np.dtype(_SCALARS[item])
            raw = self.take(count * dtype.itemsize)
            return np.frombuffer(raw, dtype).copy() if keep else None
        if item == gguf.GGUFValueType.STRING:
            return self.strings(count, keep)
        values = [self.value(item, keep) for _ in range(count)]
        return values if keep else None

    def strings(self, count: int, keep: bool) -> list[str] | None:
        """``count`` strings in a row (a vocabulary: 262k for Gemma 3), in one tight loop."""
        data, at, size, out = self.data, self.at, len(self.data), []
        unpack = struct.Struct("<Q").unpack_from
        for _ in range(count):
            if at + 8 > size:
                raise _Truncated
            (n,) = unpack(data, at)
            at += 8 + n
            if at > size:
                raise _Truncated
            if keep:
                out.append(str(data[at - n:at], "utf-8", "replace"))
        self.at = at
        return out if keep else None


class GGUFTensor:
    """One tensor of the file: name, ``tensor_type``, ``shape`` (GGUF order: fastest axis first), byte size and
    offset, and ``data`` (a memory-mapped view shaped as the ``gguf`` package's reader shapes it)."""

    def __init__(self, file: "GGUFFile", name: str, tensor_type: gguf.GGMLQuantizationType, shape: np.ndarray,
                 data_offset: int):
        block, type_size = gguf.GGML_QUANT_SIZES[tensor_type]
        self.name, self.tensor_type, self.shape, self.data_offset = name, tensor_type, shape, data_offset
        self.n_elements = int(np.prod(shape, dtype=np.int64))
        self.n_bytes = self.n_elements * type_size // block
        self._file = file

    @property
    def data(self) -> np.ndarray:
        dims = tuple(int(d) for d in reversed(self.shape.tolist()))
        raw = self._file.mapped[self.data_offset:self.data_offset + self.n_bytes]
        if self.tensor_type in _PLAIN_TYPES:
            return raw.view(_PLAIN_TYPES[self.tensor_type]).reshape(dims)
        return raw.reshape(quant_shape_to_byte_shape(dims, self.tensor_type))


class GGUFFile:
    """One GGUF file: ``metadata`` (without the vocabulary arrays), ``tokens``, ``token_types``, ``config()``,
    and tensors."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.location = str(self.path)
        self.format = "gguf"
        if not self.path.is_file():
            raise MtijaxError(f"{self.path}: GGUF file is missing")
        with open(self.path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise MtijaxError(f"{self.path}: not a GGUF file (a model is a Hugging Face directory or a .gguf file)")
        self.mapped = np.memmap(self.path, mode="r")
        try:
            self._parse(_Header(memoryview(self.mapped)))
        except _Truncated:
            raise MtijaxError(f"{self.path}: truncated GGUF file: it ends inside its header "
                              f"({self.mapped.size} bytes)") from None
        except (ValueError, KeyError, UnicodeDecodeError, OverflowError, MemoryError):
            raise MtijaxError(f"{self.path}: corrupt GGUF header (a field has an unknown type or an "
                              "impossible size)") from None

    def _parse(self, header: _Header) -> None:
        header.take(4)
        version = header.scalar("<I")
        if version not in (2, 3):
            raise MtijaxError(f"{self.path}: GGUF version {version} is not supported (2 and 3 are; "
                              "a big-endian file reads as a huge version)")
        tensor_count, kv_count = header.scalar("<Q"), header.scalar("<Q")
        self.metadata: dict[str, Any] = {}
        self.tokens: list[str] = []
        self.token_types = np.zeros(0, np.int32)
        for _ in range(kv_count):
            key = header.string()
            kind = header.scalar("<I")
            value = header.value(kind, keep=key not in SKIPPED_FIELDS)
            if key == "tokenizer.ggml.tokens":
                self.tokens = value
            elif key == "tokenizer.ggml.token_type":
                self.token_types = np.asarray(value, np.int32)
            elif key not in SKIPPED_FIELDS:
                self.metadata[key] = value.tolist() if isinstance(value, np.ndarray) else value
        infos = []
        for _ in range(tensor_count):
            name = header.string()
            dims = np.array([header.scalar("<Q") for _ in range(header.scalar("<I"))], np.uint64)
            infos.append((name, gguf.GGMLQuantizationType(header.scalar("<I")), dims, header.scalar("<Q")))
        alignment = int(self.metadata.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT))
        if alignment <= 0 or alignment & (alignment - 1):
            raise MtijaxError(f"{self.path}: corrupt GGUF header (alignment {alignment} is not a power of two)")
        start = -(-header.at // alignment) * alignment
        self.tensors: dict[str, GGUFTensor] = {}
        for name, kind, dims, offset in infos:
            if name in self.tensors:
                raise MtijaxError(f"{self.path}: corrupt GGUF header (tensor {name!r} is listed twice)")
            tensor = GGUFTensor(self, name, kind, dims, start + offset)
            end = tensor.data_offset + tensor.n_bytes
            if end > self.mapped.size:
                raise MtijaxError(f"{self.path}: truncated at tensor {name!r}: its data ends at byte {end}, "
                                  f"the file has {self.mapped.size}")
            self.tensors[name] = tensor

    @functools.cached_property
    def reader(self) -> gguf.GGUFReader:
        """The ``gguf`` package's reader of the file (slow to build: for the tokenizer conversion only)."""
        return gguf.GGUFReader(self.path)

    def token(self, index: int) -> str:
        """The vocabulary entry ``index`` as text."""
        return self.tokens[index]

    def config(self) -> ModelConfig:
        """The model config from the metadata; the vocabulary size from the embedding."""
        embed = self.tensors.get("token_embd.weight")
        if embed is None:
            raise MtijaxError(f"{self.path}: tensor 'token_embd.weight' is missing")
        extra_eos = [i for i in range(min(256, int(embed.shape[1]), len(self.tokens)))
                     if self.tokens[i] == "<end_of_turn>"]
        return config_from_gguf(self.metadata, int(embed.shape[1]), str(self.path), tuple(extra_eos))

    def _tensor(self, slot: TensorSlot) -> GGUFTensor:
        tensor = self.tensors.get(slot.name)
        if tensor is None:
            raise MtijaxError(f"tensor {slot.name!r} is missing from {self.path}")
        return tensor

    def shape(self, slot: TensorSlot) -> tuple[int, ...]:
        return tuple(int(d) for d in reversed(self._tensor(slot).shape.tolist()))

    def read(self, slot: TensorSlot) -> np.ndarray:
        tensor = self._tensor(slot)
        try:
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError:
            raise MtijaxError(f"{self.path}: tensor {slot.name!r} has type {tensor.tensor_type.name}, "
                              "which the gguf package cannot dequantize") from None
        values = values.reshape(self.shape(slot))
        return values - np.float32(1.0) if slot.norm_shift else values

    def read_block(self, slot: TensorSlot, block: tuple[slice, ...]) -> np.ndarray:
        """``read(slot)[block]`` (one ``slice(start, stop)`` per dim, numpy order), dequantising only the quantised
        blocks that hold it: the rows of ``block``, and in each row the run of whole quant blocks (32 or 256
        values) that covers its columns; the values outside ``block`` in the first and last of them are dropped."""
        tensor = self._tensor(slot)
        *rows, cols = block
        if tensor.tensor_type in _PLAIN_TYPES:
            values = np.array(tensor.data[block], np.float32)
        else:
            size, type_size = gguf.GGML_QUANT_SIZES[tensor.tensor_type]
            first, last = cols.start // size, -(-cols.stop // size)
            raw = np.ascontiguousarray(tensor.data[(*rows, slice(first * type_size, last * type_size))])
            try:
                values = gguf.quants.dequantize(raw, tensor.tensor_type)
            except NotImplementedError:
                raise MtijaxError(f"{self.path}: tensor {slot.name!r} has type {tensor.tensor_type.name}, "
                                  "which the gguf package cannot dequantize") from None
            values = values[..., cols.start - first * size:cols.stop - first * size]
        return values - np.float32(1.0) if slot.norm_shift else values

    def describe(self, slot: TensorSlot) -> str:
        """``tensor 'name' in file``."""
        return f"tensor {slot.name!r} in {self.path}"
