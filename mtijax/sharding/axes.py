"""Logical axis names of every parameter: the table that sharding rules map onto a mesh.

Each parameter's dims are named from :data:`LOGICAL_AXES`. :func:`param_axes` returns the same pytree as the
architecture's ``param_shapes(config)``, with a tuple of names (one per dim) at each leaf, e.g.
``layers/attn/q_proj [L, D, N*H] -> ("layers", "embed", "heads")``. An axis named ``heads`` or ``kv_heads``
packs whole heads (``N*H`` or ``K*H`` columns, head-major), so splitting it ``n`` ways on head boundaries needs
the head count, not the column count, to be divisible by ``n`` (:mod:`mtijax.sharding.rules`).

The names come from each architecture's record (``Architecture.param_axes``, beside its ``param_shapes``):
this module only reads them.

The decode-time ``fused_qkv`` layout (``mtijax.models.fused``) has no axes: its ``qkv_proj`` concatenates q, k
and v on the last axis, so an even split of that axis would cut across the q | k | v boundaries instead of
giving every device its own heads of each. Sharded generation therefore runs the documented layout
(``mtijax.sharding.generation``): under tensor parallelism each device's q, k and v matrices are already
``1/tp`` of the size that made fusing them pay on one device.
"""

from __future__ import annotations

from typing import Any

from mtijax.config import ModelConfig
from mtijax.models.architecture import AXES
from mtijax.models.decoder import family

LOGICAL_AXES = AXES
"""The names a parameter dim may carry."""
ACTIVATION_AXES = ("batch", "length", "sweep")
"""The names of activation and cache dims that rules may also map: the batch rows, the token/slot axis, and
the leading variant axis of a vmapped sweep."""

def leaf_name(path: tuple) -> str:
    """``"layers/attn/q_proj"`` from a ``jax.tree_util`` key path."""
    return "/".join(str(getattr(k, "key", k)) for k in path)


def param_axes(config: ModelConfig) -> dict[str, Any]:
    """The logical axis names of every parameter of ``config``'s architecture: the pytree of
    ``param_shapes(config)`` with a tuple of names from :data:`LOGICAL_AXES` per leaf (one per dim)."""
    return family(config).param_axes(config)


def axis_units(config: ModelConfig, axis: str, size: int) -> int:
    """How many indivisible units a dim of ``size`` named ``axis`` holds: heads for ``heads`` and ``kv_heads``
    (a head's columns stay on one device), the dim's size otherwise."""
    if axis == "heads":
        return config.num_heads
    if axis == "kv_heads":
        return config.num_kv_heads
    return size
