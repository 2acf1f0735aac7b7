"""Rules: which mesh axis each logical axis is split over, and the partition spec they give a dim list.

A rule maps a logical axis name (:data:`mtijax.sharding.axes.LOGICAL_AXES` and
:data:`~mtijax.sharding.axes.ACTIVATION_AXES`) to a mesh axis name from :data:`MESH_AXES`, or to None
(replicated). :data:`DEFAULT_RULES` gives tensor parallelism over heads, kv heads and the MLP width
(``model``), expert parallelism (``expert``) and data parallelism over batch rows and sweep variants
(``data``); everything else is replicated. Rules given by a caller are merged over the defaults, so
``{"vocab": "model"}`` also splits the embedding and output head.

A rule naming a mesh axis that the mesh does not have replicates that dim (a ``(data, model)`` mesh runs
OLMoE with every expert on every device). When the mesh axis does not divide a dim:

- ``heads`` and ``kv_heads``: the dim is replicated (a head's columns never straddle two devices); e.g.
  Gemma 3 270M's single kv head is replicated at tp = 2, so are its k and v projections and KV cache;
- ``batch``, ``length`` and ``sweep`` (activations): replicated (a batch of 1 on a 2-way data axis);
- any other parameter dim: :class:`MtijaxError` naming the leaf, the dim and the sizes.
"""

from __future__ import annotations

from typing import Callable, Mapping

from jax.sharding import AxisType, Mesh, PartitionSpec

from mtijax.errors import MtijaxError
from mtijax.sharding.axes import ACTIVATION_AXES, LOGICAL_AXES

MESH_AXES = ("data", "expert", "model")
"""The mesh axis names mtijax places on."""
DEFAULT_RULES: dict[str, str | None] = {
    "batch": "data", "sweep": "data", "length": None,
    "vocab": None, "embed": None, "heads": "model", "kv_heads": "model", "head_dim": None, "mlp": "model",
    "experts": "expert", "layers": None,
}
REPLICATE_WHEN_INDIVISIBLE = ("heads", "kv_heads", *ACTIVATION_AXES)
"""Logical axes that fall back to replication when the mesh axis does not divide them (see the module docstring)."""

Rules = Mapping[str, "str | None"]


def check_mesh(mesh: Mesh) -> Mesh:
    """``mesh`` with every axis of type ``Auto``; raises :class:`MtijaxError` unless its axis names are distinct
    names from :data:`MESH_AXES`.

    mtijax shards by propagation: the params (and the cache, batch and sweep axes) are placed, and XLA's
    partitioner lays out everything between. ``jax.make_mesh`` makes ``Explicit`` axes by default, under which
    every contraction over a split dim would need an ``out_sharding`` in the model code; the same devices and
    names with ``Auto`` axes give the same placement of the params.
    """
    names = tuple(mesh.axis_names)
    unknown = [n for n in names if n not in MESH_AXES]
    if unknown or len(set(names)) != len(names):
        raise MtijaxError(f"mesh axes {list(names)}: mtijax places on a mesh whose axes are a subset of "
                          f"{', '.join(MESH_AXES)}" + (f" (unknown: {unknown[0]!r})" if unknown else ""))
    if all(t == AxisType.Auto for t in mesh.axis_types):
        return mesh
    return Mesh(mesh.devices, names, axis_types=(AxisType.Auto,) * len(names))


def resolve(rules: Rules | None) -> dict[str, str | None]:
    """:data:`DEFAULT_RULES` with ``rules`` merged over them, checked: known logical axes, known mesh axes."""
    merged = dict(DEFAULT_RULES)
    for logical, mesh_axis in (rules or {}).items():
        if logical not in LOGICAL_AXES + ACTIVATION_AXES:
            raise MtijaxError(f"sharding rule for unknown logical axis {logical!r}; the axes are "
                              f"{', '.join(LOGICAL_AXES + ACTIVATION_AXES)}")
        if mesh_axis is not None and mesh_axis not in MESH_AXES:
            raise MtijaxError(f"sharding rule {logical!r} -> {mesh_axis!r}: the mesh axes are "
                              f"{', '.join(MESH_AXES)} (or None)")
        merged[logical] = mesh_axis
    return merged


def partition(axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh, rules: Mapping[str, str | None],
              where: str, units: Callable[[str, int], int] = lambda axis, size: size) -> PartitionSpec:
    """The partition spec of an array ``shape`` whose dims are named ``axes`` (None: never split).

    ``units(axis, size)`` is how many indivisible pieces a dim holds (heads, for the head axes). ``where``
    names the array in errors (``"layers/mlp/gate_proj"``). Two dims of one array never take the same mesh axis.
    """
    sizes = dict(zip(mesh.axis_names, mesh.devices.shape))
    spec: list[str | None] = []
    used: dict[str, str] = {}
    for dim, (axis, size) in enumerate(zip(axes, shape)):
        mesh_axis = None if axis is None else rules.get(axis)
        if mesh_axis is None or sizes.get(mesh_axis, 1) == 1:
            spec.append(None)
            continue
        if mesh_axis in used:
            raise MtijaxError(f"{where}: dims {used[mesh_axis]!r} and {axis!r} both map to mesh axis "
                              f"{mesh_axis!r}; a mesh axis can split one dim of an array")
        count = units(axis, size)
        if count % sizes[mesh_axis]:
            if axis in REPLICATE_WHEN_INDIVISIBLE:
                spec.append(None)
                continue
            raise MtijaxError(f"{where}: dim {dim} ({axis!r}, size {size}) does not divide over mesh axis "
                              f"{mesh_axis!r} of size {sizes[mesh_axis]}; change the mesh or map {axis!r} to None")
        used[mesh_axis] = axis
        spec.append(mesh_axis)
    return PartitionSpec(*spec)
