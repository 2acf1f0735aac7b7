"""A sharded load: each device's block of every parameter read straight from the file.

``mtijax.load(path, dtype, mesh=mesh)`` calls :func:`load_params`. Each leaf is built with
``jax.make_array_from_callback``: for every block of the leaf that a device of this process holds, the
callback reads the stored tensors (or the part of a stored tensor) that fall in the block, through the
source's ``read_block`` (``mtijax.weights.sources``), which copies only the block's bytes out of the
memory-mapped safetensors shard or GGUF file. Quantised GGUF tensors are dequantised over the block's rows
and the run of whole quant blocks (32 or 256 values of a row) covering its columns, then cut to the block.
No host array ever holds a whole sharded parameter; a replicated one is read once per process (devices
that hold the same block share one read). Host memory peaks at the blocks of one leaf that this process's
devices hold. The checks are the unsharded loader's: every stored shape before any tensor is read, and each
block finite (``mtijax.weights.loader``).

In a multi-host run (``jax.distributed.initialize``, one process per host), each process calls
``mtijax.load(..., mesh=mesh)`` with the same global mesh and reads only its own devices' blocks.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from tqdm.auto import tqdm

from mtijax.config import ModelConfig
from mtijax.models.decoder import family
from mtijax.sharding.axes import leaf_name
from mtijax.sharding.place import param_shardings
from mtijax.sharding.rules import Rules
from mtijax.weights.loader import check_finite, check_shape, numpy_dtype
from mtijax.weights.names import TensorSlot, slots
from mtijax.weights.sources import TensorSource

Params = dict[str, Any]


def _ranges(index: tuple[slice, ...], shape: tuple[int, ...]) -> list[tuple[int, int]]:
    """``(start, stop)`` of each dim of a block given as ``make_array_from_callback``'s index."""
    return [s.indices(n)[:2] for s, n in zip(index, shape)]


def read_block(source: TensorSource, slot: TensorSlot, ranges: list[tuple[int, int]]) -> np.ndarray:
    """The block ``ranges`` (per dim of the leaf's ``slot.index``-th entry, in the leaf's orientation) of the
    slot's tensor: float32, transposed as the leaf keeps it, finite (or :class:`MtijaxError`)."""
    stored = list(ranges)
    if slot.transpose:
        stored[-1], stored[-2] = stored[-2], stored[-1]
    value = np.asarray(source.read_block(slot, tuple(slice(a, b) for a, b in stored)), np.float32)
    check_finite(source, slot, value)
    return np.swapaxes(value, -1, -2) if slot.transpose else value


def _block(source: TensorSource, leaf_slots: list[TensorSlot], shape: tuple[int, ...], index: tuple[slice, ...],
           np_dtype: np.dtype) -> np.ndarray:
    """One device's block of a leaf of ``shape``, filled from the slots whose leading index falls inside it."""
    ranges = _ranges(index, shape)
    out = np.empty([b - a for a, b in ranges], np_dtype)
    for slot in leaf_slots:
        lead = len(slot.index)
        if all(a <= i < b for i, (a, b) in zip(slot.index, ranges)):
            local = tuple(i - a for i, (a, _) in zip(slot.index, ranges))
            out[local] = read_block(source, slot, ranges[lead:])
    return out


def load_params(config: ModelConfig, source: TensorSource, dtype: str, mesh: Mesh, rules: Rules | None = None,
                progress: bool = True) -> Params:
    """Every parameter of ``config`` read from ``source`` onto ``mesh`` by ``rules`` (see the module docstring)."""
    np_dtype = numpy_dtype(dtype)
    shardings = param_shardings(config, mesh, rules)
    shapes = family(config).param_shapes(config)
    by_leaf: dict[tuple[str, ...], list[TensorSlot]] = defaultdict(list)
    for slot in slots(config, source.format):
        leaf = shapes
        for key in slot.path:
            leaf = leaf[key]
        want = leaf[len(slot.index):]
        check_shape(source, slot, source.shape(slot), (*want[:-2], want[-1], want[-2]) if slot.transpose else want)
        by_leaf[slot.path].append(slot)

    flat, treedef = jax.tree_util.tree_flatten_with_path(
        shapes, is_leaf=lambda x: isinstance(x, tuple) and all(isinstance(d, int) for d in x))
    leaves = []
    for (path, shape), sharding in tqdm(list(zip(flat, jax.tree.leaves(
            shardings, is_leaf=lambda x: isinstance(x, NamedSharding)))), desc=f"loading {source.location}",
            unit="tensor", disable=not progress, leave=False):
        leaf_slots = by_leaf[tuple(leaf_name(path).split("/"))]
        done: dict[tuple, np.ndarray] = {}

        def callback(index: tuple[slice, ...]) -> np.ndarray:
            key = tuple(_ranges(index, shape))
            if key not in done:
                done[key] = _block(source, leaf_slots, shape, index, np_dtype)
            return done[key]

        leaves.append(jax.make_array_from_callback(tuple(shape), sharding, callback))
    return jax.tree.unflatten(treedef, leaves)
