"""Placing params, batches and sweep variants on a mesh by the rules.

:func:`shard` is ``mtijax.shard``: every leaf of a params pytree ``device_put`` with the
``NamedSharding`` its logical axes and the rules give (:func:`param_specs`). The other placements name
the dims of activations: :func:`shard_batch` splits the batch rows over ``data``, :func:`spread` splits the
leading variant axis of a sweep over ``data``, and :func:`replicate` puts a pytree whole on every device
(small state such as fusion params and their optimizer state).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mtijax.config import ModelConfig
from mtijax.errors import MtijaxError
from mtijax.sharding.axes import axis_units, leaf_name, param_axes
from mtijax.sharding.rules import Rules, check_mesh, partition, resolve

Params = dict[str, Any]


def _is_axes(x: Any) -> bool:
    return isinstance(x, tuple) and all(isinstance(a, str) for a in x)


def param_specs(config: ModelConfig, mesh: Mesh, rules: Rules | None = None) -> Params:
    """The ``PartitionSpec`` of every parameter of ``config`` on ``mesh`` (the params pytree's structure)."""
    mesh = check_mesh(mesh)
    merged = resolve(rules)
    shapes = jax.tree.leaves(_shapes(config), is_leaf=_is_shape)
    axes, treedef = jax.tree_util.tree_flatten_with_path(param_axes(config), is_leaf=_is_axes)
    specs = [partition(names, shape, mesh, merged, leaf_name(path), lambda a, s: axis_units(config, a, s))
             for (path, names), shape in zip(axes, shapes)]
    return jax.tree.unflatten(treedef, specs)


def _is_shape(x: Any) -> bool:
    return isinstance(x, tuple) and all(isinstance(d, int) for d in x)


def _shapes(config: ModelConfig) -> Params:
    from mtijax.models.decoder import family

    return family(config).param_shapes(config)


def param_shardings(config: ModelConfig, mesh: Mesh, rules: Rules | None = None) -> Params:
    """The ``NamedSharding`` of every parameter (for ``jax.device_put``, ``jit``'s ``out_shardings``, a load)."""
    mesh = check_mesh(mesh)
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), param_specs(config, mesh, rules),
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def shard(config: ModelConfig, params: Params, mesh: Mesh, rules: Rules | None = None) -> Params:
    """``params`` (the documented pytree, on any devices or the host) placed on ``mesh`` by ``rules``
    (default :data:`~mtijax.sharding.rules.DEFAULT_RULES`, merged under the given ones)."""
    shardings = param_shardings(config, mesh, rules)
    expected = jax.tree.structure(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    if jax.tree.structure(params) != expected:
        found = sorted(leaf_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0])
        hint = " (fused_qkv params are a decode-time layout; shard the documented params)" if any(
            n.endswith("qkv_proj") for n in found) else ""
        raise MtijaxError(f"these params do not have the leaves of a {config.architecture} config{hint}: "
                          f"{', '.join(found)}")
    for (path, leaf), shape in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                   jax.tree.leaves(_shapes(config), is_leaf=_is_shape)):
        if tuple(np.shape(leaf)) != tuple(shape):
            raise MtijaxError(f"{leaf_name(path)} has shape {list(np.shape(leaf))}, the config needs {list(shape)}")
    return jax.device_put(params, shardings)


def mesh_of(tree: Any) -> Mesh | None:
    """The mesh of the first leaf of ``tree`` placed with a ``NamedSharding`` over more than one device, or None."""
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh.devices.size > 1:
            return sharding.mesh
    return None


def activation_spec(mesh: Mesh, axes: tuple[str | None, ...], shape: tuple[int, ...],
                    rules: Rules | None = None, where: str = "activation") -> PartitionSpec:
    """The spec of an activation of ``shape`` whose dims are named ``axes`` (``"batch"``, ``"kv_heads"``, ...)."""
    return partition(axes, shape, check_mesh(mesh), resolve(rules), where)


def shard_batch(x: Any, mesh: Mesh, rules: Rules | None = None) -> Any:
    """Every leaf of ``x`` (``[B, ...]``) with its rows split over the batch rule's mesh axis (``data``)."""
    mesh = check_mesh(mesh)
    return jax.tree.map(lambda a: jax.device_put(a, NamedSharding(
        mesh, activation_spec(mesh, ("batch",) + (None,) * (np.ndim(a) - 1), np.shape(a), rules))), x)


def spread(x: Any, mesh: Mesh, rules: Rules | None = None) -> Any:
    """Every leaf of ``x`` (``[K, ...]``, the variants of a sweep) split over the sweep rule's axis (``data``)."""
    mesh = check_mesh(mesh)
    return jax.tree.map(lambda a: jax.device_put(a, NamedSharding(
        mesh, activation_spec(mesh, ("sweep",) + (None,) * (np.ndim(a) - 1), np.shape(a), rules))), x)


def replicate(x: Any, mesh: Mesh) -> Any:
    """``x`` whole on every device of ``mesh``."""
    return jax.device_put(x, NamedSharding(check_mesh(mesh), PartitionSpec()))
