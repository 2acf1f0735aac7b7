"""The on-disk layer store: every tensor of every layer indexed across a checkpoint's files, read one layer at a time.

Opening a store reads only headers: for each layer it records which tensor
fills which leaf, in which file (a Hugging Face checkpoint's layers are often
split across shards; see :meth:`LayerStore.layer_files`), and checks every
tensor's presence and shape, so a bad checkpoint fails before any work.

The first read of each tensor checks that it is finite, as the resident loader does
(:func:`mtijax.weights.loader.check_finite`), so a NaN in a checkpoint stops a streamed run with the
same error line as ``mtijax.load``; later reads of the same bytes are not checked again.

A layer is read into host arrays of the compute dtype **in the file's layout**:
matrices stay ``[out, in]`` as stored (``[E, out, in]`` for stacked experts),
so reading is a plain copy from the page cache (``pread`` into the array, or
one cast when the file's dtype differs). The device step swaps the last two
axes of the leaves marked ``transpose`` before calling the block; XLA folds
that into the matmul. GGUF tensors are dequantised one at a time.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, NamedTuple

import gguf
import jax
import numpy as np

from mtijax.api import resolve
from mtijax.config import ModelConfig, OlmoeConfig, read_hf_config
from mtijax.errors import MtijaxError
from mtijax.models.decoder import family
from mtijax.weights.gguf_file import GGUFFile
from mtijax.weights.loader import check_finite, check_shape, numpy_dtype
from mtijax.weights.names import TensorSlot, slots
from mtijax.weights.sources import HFDirectory

Tree = dict[str, Any]
EXPERT_LEAVES = (("moe", "gate_proj"), ("moe", "up_proj"), ("moe", "down_proj"))
"""The leaves of an OLMoE layer that hold its experts (``[E, ...]``)."""


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One leaf of a layer as the store holds it.

    Attributes:
      path: keys inside a layer, e.g. ``("attn", "q_proj")``.
      shape: the host (file-layout) shape, e.g. ``[N*H, D]`` for ``q_proj``.
      transpose: the params leaf is this with its last two axes swapped.
    """

    path: tuple[str, ...]
    shape: tuple[int, ...]
    transpose: bool


class _Record(NamedTuple):
    """One stored tensor of a layer: its slot, the leaf (and index in it) it fills, its file and size."""

    slot: TensorSlot
    leaf: tuple[str, ...]
    where: tuple[int, ...]
    file: str
    nbytes: int


def set_leaf(tree: Tree, path: tuple[str, ...], value: Any) -> None:
    """``tree[path[0]]...[path[-1]] = value``, making the dicts on the way."""
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def get_leaf(tree: Tree, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def to_params_layout(stored: Tree, leaves: tuple[Leaf, ...]) -> Tree:
    """A layer in the file layout -> the params layout the block takes (swap the last two axes where marked).

    Works on host or device arrays, and inside ``jit``.
    """
    out: Tree = {}
    for leaf in leaves:
        value = get_leaf(stored, leaf.path)
        set_leaf(out, leaf.path, value.swapaxes(-1, -2) if leaf.transpose else value)
    return out


def layer_leaves(config: ModelConfig, fmt: str) -> tuple[Leaf, ...]:
    """Every leaf of one layer of ``config`` in format ``fmt``, in the params' order."""
    shapes = family(config).param_shapes(config)["layers"]
    flat = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))[0]
    transposed = {s.path[1:]: s.transpose for s in slots(config, fmt) if s.path[0] == "layers" and s.index[0] == 0}
    leaves = []
    for key_path, shape in flat:
        path = tuple(k.key for k in key_path)
        layer_shape = tuple(shape[1:])
        transpose = transposed[path]
        if transpose:
            layer_shape = (*layer_shape[:-2], layer_shape[-1], layer_shape[-2])
        leaves.append(Leaf(path, layer_shape, transpose))
    return tuple(leaves)


class LayerStore:
    """A checkpoint (Hugging Face directory or GGUF file) read one layer, or one expert, at a time.

    Args:
      model: a Hugging Face model directory, a ``.gguf`` file, or ``"gemma3-270m"`` (the embedded default).
      dtype: the compute dtype of the host arrays, ``"float32"`` or ``"bfloat16"``.
    """

    def __init__(self, model: str | Path | None, dtype: str = "float32"):
        path = resolve(model)
        self.location = str(path)
        self.dtype = numpy_dtype(dtype)
        if path.is_dir():
            self.config: ModelConfig = read_hf_config(path)
            self.source: HFDirectory | GGUFFile = HFDirectory(path)
        else:
            self.source = GGUFFile(path)
            self.config = self.source.config()
        self.format = self.source.format
        self.leaves = layer_leaves(self.config, self.format)
        self._leaf = {leaf.path: leaf for leaf in self.leaves}
        self._layers: list[list[_Record]] = [[] for _ in range(self.config.num_layers)]
        self._checked: set[tuple[str, tuple[int, ...]]] = set()
        self._resident: list[_Record] = []
        for slot in slots(self.config, self.format):
            record = self._index(slot)
            (self._layers[slot.index[0]] if slot.path[0] == "layers" else self._resident).append(record)

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    @property
    def streams_experts(self) -> bool:
        """Whether layers have experts that can be streamed one by one (OLMoE)."""
        return isinstance(self.config, OlmoeConfig)

    def core_leaves(self) -> tuple[Leaf, ...]:
        """The leaves of a layer without its experts (all of them for a dense model)."""
        return tuple(leaf for leaf in self.leaves if leaf.path not in EXPERT_LEAVES)

    def expert_leaves(self) -> tuple[Leaf, ...]:
        """The expert leaves of a layer (empty for a dense model)."""
        return tuple(leaf for leaf in self.leaves if leaf.path in EXPERT_LEAVES)

    def nbytes(self, leaves: tuple[Leaf, ...]) -> int:
        """Host bytes of one layer's ``leaves`` in the compute dtype."""
        return sum(int(np.prod(leaf.shape)) for leaf in leaves) * self.dtype.itemsize

    @property
    def layer_nbytes(self) -> int:
        """Host (and device) bytes of one whole layer in the compute dtype (every layer has the same shapes)."""
        return self.nbytes(self.leaves)

    @property
    def expert_nbytes(self) -> int:
        """Bytes of one expert of one layer (OLMoE), in the compute dtype."""
        return sum(int(np.prod(leaf.shape[1:])) for leaf in self.expert_leaves()) * self.dtype.itemsize

    @property
    def resident_nbytes(self) -> int:
        """Bytes of the parts that stay on the device (embedding, final norm, output head)."""
        shapes = family(self.config).param_shapes(self.config)
        return sum(int(np.prod(shapes[r.slot.path[0]])) for r in self._resident) * self.dtype.itemsize

    def layer_files(self, layer: int) -> list[str]:
        """The files holding layer ``layer``'s tensors (more than one when it spans shards)."""
        return sorted({r.file for r in self._layers[layer]})

    def read_layer(self, layer: int, leaves: tuple[Leaf, ...] | None = None) -> Tree:
        """Layer ``layer``'s ``leaves`` (default: all) as fresh host arrays in the file layout and compute dtype."""
        leaves = self.leaves if leaves is None else leaves
        wanted = {leaf.path for leaf in leaves}
        out: Tree = {}
        for leaf in leaves:
            set_leaf(out, leaf.path, np.empty(leaf.shape, self.dtype))
        for record in self._layers[layer]:
            if record.leaf in wanted:
                self._read(record, get_leaf(out, record.leaf)[record.where[1:]])
        return out

    def read_expert(self, layer: int, expert: int) -> Tree:
        """One expert of one OLMoE layer: ``{"moe": {"gate_proj", "up_proj", "down_proj"}}`` in the file layout."""
        out: Tree = {}
        for leaf in self.expert_leaves():
            target = np.empty(leaf.shape[1:], self.dtype)
            record = next(r for r in self._layers[layer] if r.leaf == leaf.path and r.where[1:] in ((), (expert,)))
            if record.where[1:] == (expert,):
                self._read(record, target)
            else:  # GGUF: the layer's experts are stacked in one tensor; dequantise only this one's rows
                self._read_stacked_expert(record, expert, target)
            set_leaf(out, leaf.path, target)
        return out

    def read_resident(self) -> Tree:
        """The embedding, final norm and output head in the params layout, as host arrays of the compute dtype."""
        shapes = family(self.config).param_shapes(self.config)
        out: Tree = {}
        for record in self._resident:
            name = record.slot.path[0]
            shape = tuple(shapes[name])
            stored = np.empty(shape[::-1] if record.slot.transpose else shape, self.dtype)
            self._read(record, stored)
            out[name] = np.ascontiguousarray(stored.T) if record.slot.transpose else stored
        return out

    def _index(self, slot: TensorSlot) -> _Record:
        """Locate ``slot``'s tensor and check its shape against the config."""
        if slot.path[0] == "layers":
            leaf, where = slot.path[1:], slot.index
            shape = self._leaf[leaf].shape[len(where) - 1:]
        else:
            leaf, where = slot.path, ()
            shape = tuple(family(self.config).param_shapes(self.config)[slot.path[0]])
            shape = shape[::-1] if slot.transpose else shape
        check_shape(self.source, slot, self.source.shape(slot), shape)
        if isinstance(self.source, HFDirectory):
            name, shard = self.source.locate(slot)
            if shard.entries[name][0].kind != "f" and shard.entries[name][0] != np.dtype("bfloat16"):
                raise MtijaxError(f"{self.source.describe(slot)} has dtype {shard.entries[name][0]}, not a float type")
            return _Record(slot, leaf, where, str(shard.path), shard.byte_range(name)[1])
        tensor = self.source.tensors[slot.name]
        return _Record(slot, leaf, where, str(self.source.path), int(tensor.n_bytes))

    def _read(self, record: _Record, target: np.ndarray) -> None:
        """Fill ``target`` (file layout, compute dtype) with ``record``'s tensor, checked on its first read."""
        self._fill(record, target)
        self._check_once(record.slot, target)

    def _check_once(self, slot: TensorSlot, value: np.ndarray) -> None:
        """The resident loader's finiteness check, once per tensor (or per expert of a stacked GGUF tensor)."""
        key = (slot.name, slot.index)
        if key not in self._checked:
            check_finite(self.source, slot, value)
            self._checked.add(key)

    def _fill(self, record: _Record, target: np.ndarray) -> None:
        if isinstance(self.source, HFDirectory):
            name, shard = self.source.locate(record.slot)
            stored_dtype = shard.entries[name][0]
            if stored_dtype == target.dtype and target.flags.c_contiguous:
                shard.read_into(name, target)
            else:
                staging = np.empty(target.shape, stored_dtype)
                shard.read_into(name, staging)
                target[...] = staging
            return
        self._check_gguf_size(record.slot)
        target[...] = self.source.read(record.slot)

    def _read_stacked_expert(self, record: _Record, expert: int, target: np.ndarray) -> None:
        self._check_gguf_size(record.slot)
        tensor = self.source.tensors[record.slot.name]
        target[...] = gguf.quants.dequantize(tensor.data[expert], tensor.tensor_type).reshape(target.shape)
        self._check_once(record.slot._replace(index=(*record.slot.index, expert)), target)

    def _check_gguf_size(self, slot: TensorSlot) -> None:
        """A GGUF file is memory-mapped: refuse to touch a tensor past its current end (which would crash)."""
        tensor = self.source.tensors[slot.name]
        size = os.stat(self.source.path).st_size
        end = int(tensor.data_offset) + int(tensor.n_bytes)
        if size < end:
            raise MtijaxError(f"{self.source.path}: truncated while in use: tensor {slot.name!r} needs bytes up to "
                              f"{end}, the file now has {size}")
