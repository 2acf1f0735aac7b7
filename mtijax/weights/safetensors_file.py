"""A memory-mapped reader of one ``.safetensors`` file, with its header checked.

The format: an 8-byte little-endian header length, a JSON header mapping each
tensor name to ``dtype``, ``shape`` and ``data_offsets`` (relative to the end
of the header), then the raw little-endian bytes. We parse it ourselves so
that a truncated or corrupt file is reported with its name before any tensor
is read, and so that bfloat16 comes back as an ``ml_dtypes.bfloat16`` view
without a copy.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import threading
from pathlib import Path

import ml_dtypes
import numpy as np

from mtijax.errors import MtijaxError

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


class SafetensorsFile:
    """The tensors of one file; :meth:`get` returns a read-only memory-mapped array."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise MtijaxError(f"{self.path}: shard file is missing")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise MtijaxError(f"{self.path}: corrupt or truncated safetensors file ({size} bytes)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > size - 8:
                raise MtijaxError(f"{self.path}: corrupt or truncated safetensors file (header of {header_len} "
                                  f"bytes in a file of {size})")
            try:
                header = json.loads(f.read(header_len))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise MtijaxError(f"{self.path}: corrupt safetensors header (not JSON)") from None
        if not isinstance(header, dict):
            raise MtijaxError(f"{self.path}: corrupt safetensors header")
        header.pop("__metadata__", None)
        self._data_start = 8 + header_len
        self.entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            try:
                dtype = np.dtype(DTYPES[info["dtype"]])
                shape = tuple(int(d) for d in info["shape"])
                begin, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise MtijaxError(f"{self.path}: corrupt safetensors header entry for {name!r}") from None
            if end - begin != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
                raise MtijaxError(f"{self.path}: tensor {name!r} has {end - begin} bytes for shape {list(shape)}")
            if self._data_start + end > size:
                raise MtijaxError(f"{self.path}: truncated: tensor {name!r} ends at byte {self._data_start + end} "
                                  f"of a {size}-byte file")
            self.entries[name] = (dtype, shape, begin, end)
        self._mmap: mmap.mmap | None = None
        self._fd: int | None = None
        self._fd_lock = threading.Lock()

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of tensor ``name`` as stored."""
        return self.entries[name][1]

    def get(self, name: str) -> np.ndarray:
        """Tensor ``name`` as a read-only array backed by the memory map."""
        if self._mmap is None:
            with open(self.path, "rb") as f:
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        dtype, shape, begin, end = self.entries[name]
        return np.frombuffer(self._mmap, dtype=dtype, count=(end - begin) // dtype.itemsize,
                             offset=self._data_start + begin).reshape(shape)

    def byte_range(self, name: str) -> tuple[int, int]:
        """``(offset, nbytes)`` of tensor ``name``'s data from the start of the file."""
        _, _, begin, end = self.entries[name]
        return self._data_start + begin, end - begin

    def read_into(self, name: str, out: np.ndarray) -> None:
        """Copy tensor ``name``'s bytes into ``out`` (C-contiguous, same dtype and size) with ``pread``.

        Unlike :meth:`get`, a file that was truncated after it was opened raises
        :class:`MtijaxError` naming the file and tensor instead of crashing the
        process on a memory-map access past the end. Thread-safe.
        """
        dtype, shape, _, _ = self.entries[name]
        offset, nbytes = self.byte_range(name)
        if out.dtype != dtype or out.nbytes != nbytes or not out.flags.c_contiguous:
            raise ValueError(f"read_into({name!r}): need a C-contiguous {dtype} array of shape {list(shape)}")
        if self._fd is None:
            with self._fd_lock:
                if self._fd is None:
                    self._fd = os.open(self.path, os.O_RDONLY)
        view = memoryview(out.reshape(-1).view(np.uint8))
        done = 0
        while done < nbytes:
            got = os.preadv(self._fd, [view[done:]], offset + done)
            if got == 0:
                size = os.fstat(self._fd).st_size
                raise MtijaxError(f"{self.path}: truncated while in use: tensor {name!r} needs bytes up to "
                                  f"{offset + nbytes}, the file now has {size}")
            done += got
