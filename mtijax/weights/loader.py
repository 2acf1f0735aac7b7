"""Fill the params pytree from a tensor source, one tensor at a time, with shape checks."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from tqdm.auto import tqdm

from mtijax.config import ModelConfig
from mtijax.errors import MtijaxError
from mtijax.models.decoder import family
from mtijax.weights.names import TensorSlot, slots
from mtijax.weights.sources import TensorSource

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


def numpy_dtype(dtype: str) -> np.dtype:
    """The numpy dtype of a compute dtype name (``float32`` or ``bfloat16``)."""
    try:
        return np.dtype(DTYPES[dtype])
    except KeyError:
        raise MtijaxError(f"unknown dtype {dtype!r} (float32 or bfloat16)") from None


def _leaf(tree: dict, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def check_shape(source: TensorSource, slot: TensorSlot, got: tuple[int, ...], want: tuple[int, ...]) -> None:
    """Raise :class:`MtijaxError` naming the tensor and its file when its stored shape ``got`` is not ``want``."""
    if tuple(got) != tuple(want):
        raise MtijaxError(f"shape mismatch: {source.describe(slot)} has shape {list(got)}, "
                          f"expected {list(want)} for this config")


def check_finite(source: TensorSource, slot: TensorSlot, value: np.ndarray) -> None:
    """Raise :class:`MtijaxError` naming the tensor and its file when ``value`` holds a NaN or an infinity."""
    if not np.isfinite(value).all():
        raise MtijaxError(f"{source.describe(slot)} contains NaN or infinite values")


def load_params(config: ModelConfig, source: TensorSource, dtype: str = "float32",
                progress: bool = True) -> dict[str, Any]:
    """Read every parameter of ``config`` from ``source`` into device arrays of ``dtype``.

    Each stored tensor is checked against the shape the config implies and
    must be finite (:func:`check_shape`, :func:`check_finite`; the streamer's
    store runs the same checks); the first problem raises :class:`MtijaxError`
    naming the tensor and its file. The tensors are gathered into host arrays
    of the params' shapes, then moved to the device one leaf at a time, each host
    array released once its device copy exists: memory peaks at the params plus
    their largest leaf, not twice the params. ``progress`` shows a tqdm bar over
    the tensors on stderr.
    """
    np_dtype = numpy_dtype(dtype)
    shapes = family(config).param_shapes(config)
    host = jax.tree.map(lambda s: np.empty(s, np_dtype), shapes, is_leaf=lambda x: isinstance(x, tuple))
    todo = slots(config, source.format)
    for slot in tqdm(todo, desc=f"loading {source.location}", unit="tensor", disable=not progress, leave=False):
        target = _leaf(host, slot.path)
        want = target.shape[len(slot.index):]
        stored_want = (*want[:-2], want[-1], want[-2]) if slot.transpose else want
        check_shape(source, slot, source.shape(slot), stored_want)
        value = np.asarray(source.read(slot), dtype=np.float32)
        check_finite(source, slot, value)
        target[slot.index] = np.swapaxes(value, -1, -2) if slot.transpose else value
    leaves, treedef = jax.tree.flatten(host)
    del host
    moved = []
    for index in range(len(leaves)):
        moved.append(jnp.asarray(leaves[index]))
        leaves[index] = None
    return jax.tree.unflatten(treedef, moved)


