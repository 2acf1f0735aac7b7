"""Tensor sources: a Hugging Face checkpoint directory or a GGUF file, read one tensor at a time.

A source answers ``shape(slot)`` and ``read(slot)`` for the :class:`TensorSlot`
table of ``mtijax.weights.names`` and says where a tensor came from, so the
loader can check shapes and report errors with file names.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

import numpy as np

from mtijax.errors import MtijaxError
from mtijax.weights.names import HF_TEXT_PREFIXES, TensorSlot
from mtijax.weights.safetensors_file import SafetensorsFile


class TensorSource(Protocol):
    """Somewhere tensors are read from."""

    location: str
    format: str
    """``"hf"`` or ``"gguf"``: which names :func:`mtijax.weights.names.slots` gives."""

    def shape(self, slot: TensorSlot) -> tuple[int, ...]:
        """Stored shape of the slot's tensor; raises MtijaxError if it is missing."""

    def read(self, slot: TensorSlot) -> np.ndarray:
        """The slot's tensor as stored (any float dtype), before transposes or shifts."""

    def read_block(self, slot: TensorSlot, block: tuple[slice, ...]) -> np.ndarray:
        """``read(slot)[block]`` (one ``slice(start, stop)`` per stored dim), reading only that block's bytes."""


def _shard_files(directory: Path) -> tuple[dict[str, str], list[Path]]:
    """Tensor name -> shard file name, and the shard files, from the index or a lone file."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
            raise MtijaxError(f"{index}: corrupt index (no weight_map)") from None
        files = sorted({directory / name for name in weight_map.values()})
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise MtijaxError(f"{missing[0]}: shard file is missing (named by {index.name})")
        return weight_map, files
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise MtijaxError(f"{directory}: no *.safetensors files")
    return {}, files


class HFDirectory:
    """The safetensors shards of a Hugging Face model directory (lazy, memory-mapped).

    Opening reads every shard's header. Each tensor is read from the shard that holds it; an index entry
    whose shard does not hold its tensor is followed to the shard that does, and one that no shard holds
    is an error naming the tensor.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.location = str(self.directory)
        self.format = "hf"
        weight_map, files = _shard_files(self.directory)
        self.files = {f.name: SafetensorsFile(f) for f in files}
        self.where: dict[str, SafetensorsFile] = {}
        for shard in self.files.values():
            for name in shard.entries:
                self.where.setdefault(name, shard)
        for name, shard in weight_map.items():
            if name not in self.where:
                raise MtijaxError(f"tensor {name!r} is missing from {self.files[shard].path} (where "
                                  f"model.safetensors.index.json puts it), and no other shard holds it")
            if name in self.files[shard]:
                self.where[name] = self.files[shard]
        self.prefix = next((p for p in HF_TEXT_PREFIXES if p + "embed_tokens.weight" in self.where), "model.")

    def locate(self, slot: TensorSlot) -> tuple[str, SafetensorsFile]:
        """The slot's full tensor name and the shard holding it; raises MtijaxError if it is missing."""
        name = slot.name if slot.name.startswith("lm_head.") else self.prefix + slot.name
        shard = self.where.get(name)
        if shard is None:
            raise MtijaxError(f"tensor {name!r} is missing from {self.location}")
        return name, shard

    def shape(self, slot: TensorSlot) -> tuple[int, ...]:
        name, shard = self.locate(slot)
        return shard.shape(name)

    def read(self, slot: TensorSlot) -> np.ndarray:
        name, shard = self.locate(slot)
        return shard.get(name)

    def read_block(self, slot: TensorSlot, block: tuple[slice, ...]) -> np.ndarray:
        """A copy of ``read(slot)[block]``: only the block is copied out of the memory map."""
        name, shard = self.locate(slot)
        return np.array(shard.get(name)[block])

    def describe(self, slot: TensorSlot) -> str:
        """``tensor 'name' in shard file``."""
        name, shard = self.locate(slot)
        return f"tensor {name!r} in {shard.path}"
