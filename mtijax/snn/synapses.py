"""Synaptic matrices ``[width, units]`` float32: a model's own tensor, random, identity, or shuffled (a null model).

A spec string names one (the CLI's ``--synapses``):

* ``layers/attn/q_proj:0``: a params-tree path, and the layer for stacked
  ``[L, ...]`` tensors (the seed used layer 0's q-projection). Matrices are
  ``[in, out]`` in mtijax, so the units are the tensor's outputs.
* ``random:SEED``: normal entries with std ``1 / sqrt(width)``.
* ``identity``: unit ``i`` reads input ``i`` (no projection).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from mtijax.errors import MtijaxError

DEFAULT_SPEC = "layers/attn/q_proj:0"


def model_synapses(params: dict[str, Any], path: str = "layers/attn/q_proj", layer: int | None = 0) -> jax.Array:
    """The tensor at ``path`` (``/``-separated) of a params tree, at ``layer`` if it is stacked, as float32.

    The cast to float32 is explicit here: a bfloat16 model gives float32 synapses.
    """
    node: Any = params
    for key in path.split("/"):
        if not isinstance(node, dict) or key not in node:
            raise MtijaxError(f"the model has no tensor {path!r} (no {key!r} there)")
        node = node[key]
    if not hasattr(node, "shape"):
        raise MtijaxError(f"{path!r} is a group of tensors, not one tensor")
    if path.startswith("layers/"):
        if layer is None or not 0 <= layer < node.shape[0]:
            raise MtijaxError(f"{path!r} needs a layer in 0..{node.shape[0] - 1}, got {layer}")
        node = node[layer]
    if node.ndim != 2:
        raise MtijaxError(f"{path!r} is {node.ndim}-D {tuple(node.shape)}; synapses must be a [in, out] matrix")
    return jnp.asarray(node).astype(jnp.float32)


def random_synapses(seed: int, width: int, units: int, scale: float | None = None) -> jax.Array:
    """Normal ``[width, units]`` with std ``scale`` (default ``1 / sqrt(width)``); the same seed, the same matrix."""
    std = width ** -0.5 if scale is None else scale
    return jnp.float32(std) * jax.random.normal(jax.random.key(seed), (width, units), jnp.float32)


def identity_synapses(width: int, units: int) -> jax.Array:
    """Unit ``i`` reads input ``i``: ``[width, units]`` with ones on the diagonal; needs ``units <= width``."""
    if units > width:
        raise MtijaxError(f"{units} units but the driver is only {width} wide, and identity synapses have no "
                          "projection to more units: use --units <= width, or model or random synapses")
    return jnp.eye(width, units, dtype=jnp.float32)


def shuffled_synapses(synapses: jax.Array, seed: int) -> jax.Array:
    """The same entries in a random order: a null network with exactly the real weight distribution."""
    flat = jax.random.permutation(jax.random.key(seed), synapses.reshape(-1))
    return flat.reshape(synapses.shape)


def parse_synapses(spec: str, params: dict[str, Any] | None, width: int, units: int | None) -> jax.Array:
    """The synapses a spec string names (see the module docstring), keeping the first ``units`` columns.

    ``units`` defaults to all the tensor's outputs (model), or ``width`` (random, identity).
    """
    if units is not None and units < 1:
        raise MtijaxError(f"units must be at least 1, got {units}")
    kind, _, arg = spec.partition(":")
    if kind == "identity" and not arg:
        return identity_synapses(width, width if units is None else units)
    if kind == "random":
        try:
            seed = int(arg or 0)
        except ValueError:
            raise MtijaxError(f"random synapses take an integer seed (random:SEED), got {spec!r}") from None
        return random_synapses(seed, width, width if units is None else units)
    if params is None:
        raise MtijaxError(f"synapses {spec!r} name a model tensor but no model is loaded")
    try:
        layer = int(arg) if arg else 0
    except ValueError:
        raise MtijaxError(f"synapses {spec!r}: expected PATH[:LAYER], random[:SEED] or identity") from None
    matrix = model_synapses(params, kind, layer)
    if matrix.shape[0] != width:
        raise MtijaxError(f"synapses {spec!r} read {matrix.shape[0]} inputs but the driver is {width} wide")
    if units is not None:
        if units > matrix.shape[1]:
            raise MtijaxError(f"{units} units but {spec!r} has only {matrix.shape[1]} outputs")
        matrix = matrix[:, :units]
    return matrix
