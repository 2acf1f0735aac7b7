"""Logical axis names of every parameter: the table that sharding rules map onto a mesh.

Each parameter's dims are named from :data:`LOGICAL_AXES`. :func:`param_axes` returns the same pytree as the
architecture's ``param_shapes(config)``, with a tuple of names (one per dim) at each leaf, e.g.
``layers/attn/q_proj [L, D, N*H] -> ("layers", "embed", "heads")``. An axis named ``heads`` or ``kv_heads``
packs whole heads (``N*H`` or ``K*H`` columns, head-major), so splitting it ``n`` ways on head boundaries needs
the head count, not the column count, to be divisible by ``n`` (:mod:`mtijax.sharding.rules`).

When an architecture module defines ``param_axes(config)`` itself, that one is used; otherwise the table
below, keyed by leaf path.

The decode-time ``fused_qkv`` layout (``mtijax.models.fused``) has no axes: its ``qkv_proj`` concatenates q, k
and v on the last axis, so an even split of that axis would cut across the q | k | v boundaries instead of
giving every device its own heads of each. Sharded generation therefore runs the documented layout
(``mtijax.sharding.generation``): under tensor parallelism each device's q, k and v matrices are already
``1/tp`` of the size that made fusing them pay on one device.
"""

from __future__ import annotations

from typing import Any

import jax

from mtijax.config import ModelConfig
from mtijax.errors import MtijaxError
from mtijax.models.decoder import family

LOGICAL_AXES = ("vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "experts", "layers")
"""The names a parameter dim may carry."""
ACTIVATION_AXES = ("batch", "length", "sweep")
"""The names of activation and cache dims that rules may also map: the batch rows, the token/slot axis, and
the leading variant axis of a vmapped sweep."""

_COMMON = {
    "embed": ("vocab", "embed"),
    "unembed": ("embed", "vocab"),
    "final_norm": ("embed",),
    "layers/input_norm": ("layers", "embed"),
    "layers/post_attn_norm": ("layers", "embed"),
    "layers/attn/q_proj": ("layers", "embed", "heads"),
    "layers/attn/k_proj": ("layers", "embed", "kv_heads"),
    "layers/attn/v_proj": ("layers", "embed", "kv_heads"),
    "layers/attn/o_proj": ("layers", "heads", "embed"),
}
_TABLES = {
    "gemma3": {
        **_COMMON,
        "layers/pre_mlp_norm": ("layers", "embed"),
        "layers/post_mlp_norm": ("layers", "embed"),
        "layers/attn/q_norm": ("layers", "head_dim"),
        "layers/attn/k_norm": ("layers", "head_dim"),
        "layers/mlp/gate_proj": ("layers", "embed", "mlp"),
        "layers/mlp/up_proj": ("layers", "embed", "mlp"),
        "layers/mlp/down_proj": ("layers", "mlp", "embed"),
    },
    "olmoe": {
        **_COMMON,
        "layers/attn/q_norm": ("layers", "heads"),
        "layers/attn/k_norm": ("layers", "kv_heads"),
        "layers/moe/router": ("layers", "embed", "experts"),
        "layers/moe/gate_proj": ("layers", "experts", "embed", "mlp"),
        "layers/moe/up_proj": ("layers", "experts", "embed", "mlp"),
        "layers/moe/down_proj": ("layers", "experts", "mlp", "embed"),
    },
}


def leaf_name(path: tuple) -> str:
    """``"layers/attn/q_proj"`` from a ``jax.tree_util`` key path."""
    return "/".join(str(getattr(k, "key", k)) for k in path)


def _is_shape(x: Any) -> bool:
    return isinstance(x, tuple) and all(isinstance(d, int) for d in x)


def param_axes(config: ModelConfig) -> dict[str, Any]:
    """The logical axis names of every parameter of ``config``'s architecture: the pytree of
    ``param_shapes(config)`` with a tuple of names from :data:`LOGICAL_AXES` per leaf (one per dim)."""
    arch = family(config)
    own = getattr(arch, "param_axes", None)
    if own is not None:
        return own(config)
    table = _TABLES.get(config.architecture)
    if table is None:
        raise MtijaxError(f"no logical axes known for architecture {config.architecture!r}")

    def name(path: tuple, shape: tuple[int, ...]) -> tuple[str, ...]:
        axes = table[leaf_name(path)]
        if len(axes) != len(shape):
            raise MtijaxError(f"{leaf_name(path)} has {len(shape)} dims but {len(axes)} axis names")
        return axes

    return jax.tree_util.tree_map_with_path(name, arch.param_shapes(config), is_leaf=_is_shape)


def axis_units(config: ModelConfig, axis: str, size: int) -> int:
    """How many indivisible units a dim of ``size`` named ``axis`` holds: heads for ``heads`` and ``kv_heads``
    (a head's columns stay on one device), the dim's size otherwise."""
    if axis == "heads":
        return config.num_heads
    if axis == "kv_heads":
        return config.num_kv_heads
    return size
