"""Fill the params pytree from a tensor source, one tensor at a time, with shape checks."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from tqdm.auto import tqdm

from mtijax.config import Gemma3Config
from mtijax.errors import MtijaxError
from mtijax.models.gemma3 import param_shapes
from mtijax.weights.names import gemma3_slots
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



def load_params(config: Gemma3Config, source: TensorSource, dtype: str = "float32",
                progress: bool = True) -> dict[str, Any]:
    """Read every parameter of ``config`` from ``source`` into device arrays of ``dtype``.

    Each stored tensor is checked against the shape the config implies and
    must be finite; the first problem raises :class:`MtijaxError` naming the
    tensor and its file. Host memory peaks at one stacked leaf plus one tensor.
    """
    np_dtype = numpy_dtype(dtype)
    shapes = param_shapes(config)
    host = jax.tree.map(lambda s: np.empty(s, np_dtype), shapes, is_leaf=lambda x: isinstance(x, tuple))
    slots = gemma3_slots(config)
    for slot in tqdm(slots, desc=f"loading {source.location}", unit="tensor", disable=not progress, leave=False):
        target = _leaf(host, slot.path)
        want = target.shape[1:] if slot.layer is not None else target.shape
        stored_want = tuple(reversed(want)) if slot.transpose else want
        got = source.shape(slot)
        if tuple(got) != tuple(stored_want):
            raise MtijaxError(f"shape mismatch: {source.describe(slot)} has shape {list(got)}, "
                              f"expected {list(stored_want)} for this config")
        value = np.asarray(source.read(slot), dtype=np.float32)
        if not np.isfinite(value).all():
            raise MtijaxError(f"{source.describe(slot)} contains NaN or infinite values")
        value = value.T if slot.transpose else value
        if slot.layer is None:
            target[...] = value
        else:
            target[slot.layer] = value
    return jax.tree.map(jnp.asarray, host)


