"""Params held in memory as a layer store: the streamer's source when the weights are already a pytree.

A :class:`ParamsStore` gives a :class:`~mtijax.streaming.StreamedModel` the
same reads a :class:`~mtijax.streaming.store.LayerStore` gives from a
checkpoint (one layer, one expert, or the resident parts, as fresh host arrays
of the compute dtype), from a params pytree in the documented layout whose
leaves are host numpy arrays or device arrays. Its "file layout" is the params
layout itself (no leaf is transposed), so a read is one copy of the layer's
slice. Nothing is written anywhere.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np

from mtijax.config import ModelConfig
from mtijax.errors import MtijaxError
from mtijax.models.decoder import family
from mtijax.streaming.store import Leaf, LayerStore, get_leaf, set_leaf
from mtijax.weights.loader import numpy_dtype

Tree = dict[str, Any]


def _flat_shapes(shapes: Mapping[str, Any]) -> list[tuple[tuple[str, ...], tuple[int, ...]]]:
    flat = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))[0]
    return [(tuple(k.key for k in path), tuple(shape)) for path, shape in flat]


def check_params(config: ModelConfig, params: Mapping[str, Any]) -> None:
    """Raise :class:`MtijaxError` naming the first leaf of ``config``'s documented params that ``params`` lacks
    or holds in another shape."""
    for path, shape in _flat_shapes(family(config).param_shapes(config)):
        try:
            value = get_leaf(params, path)
        except (KeyError, TypeError):
            raise MtijaxError(f"params have no leaf {'/'.join(path)} ({config.architecture} needs it)") from None
        if tuple(np.shape(value)) != shape:
            raise MtijaxError(f"params leaf {'/'.join(path)} has shape {list(np.shape(value))}, expected "
                              f"{list(shape)} for this config")


class ParamsStore(LayerStore):
    """``params`` (the documented layout of ``config``'s architecture) read as a :class:`LayerStore` reads a
    checkpoint; the sizes and leaf lists are :class:`LayerStore`'s.

    Args:
      dtype: the compute dtype (``"float32"`` or ``"bfloat16"``; default: the embedding's dtype).
    """

    def __init__(self, config: ModelConfig, params: Mapping[str, Any], dtype: str | None = None):
        check_params(config, params)
        self.config = config
        self.params = params
        self.location = "params in memory"
        self.format = "params"
        self.dtype = np.dtype(params["embed"].dtype) if dtype is None else numpy_dtype(dtype)
        shapes = family(config).param_shapes(config)
        self.leaves = tuple(Leaf(path, shape[1:], False) for path, shape in _flat_shapes(shapes["layers"]))
        self._resident_paths = [path for path, _ in _flat_shapes(shapes) if path[0] != "layers"]

    @property
    def resident_nbytes(self) -> int:
        return sum(int(np.prod(np.shape(get_leaf(self.params, p)))) for p in self._resident_paths) * \
            self.dtype.itemsize

    def layer_files(self, layer: int) -> list[str]:
        """No files: the params are in memory."""
        return []

    def read_layer(self, layer: int, leaves: tuple[Leaf, ...] | None = None) -> Tree:
        out: Tree = {}
        for leaf in self.leaves if leaves is None else leaves:
            set_leaf(out, leaf.path, self._copy(get_leaf(self.params["layers"], leaf.path)[layer]))
        return out

    def read_expert(self, layer: int, expert: int) -> Tree:
        out: Tree = {}
        for leaf in self.expert_leaves():
            set_leaf(out, leaf.path, self._copy(get_leaf(self.params["layers"], leaf.path)[layer, expert]))
        return out

    def read_resident(self) -> Tree:
        return {path[0]: self._copy(get_leaf(self.params, path)) for path in self._resident_paths}

    def _copy(self, value: Any) -> np.ndarray:
        """A fresh C-contiguous host array of the compute dtype."""
        return np.array(value, dtype=self.dtype, order="C", copy=True)
