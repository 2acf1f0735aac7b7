"""Sharding on ``jax.sharding``: logical axis names per parameter, rules onto a mesh, sharded load and runs.

::

    mesh = jax.make_mesh((2, 4), ("data", "model"))
    params = mtijax.shard(config, params, mesh)                 # tensor parallel over heads and MLP width
    model = mtijax.load(path, "bfloat16", mesh=mesh)            # each device's blocks read from the file
    mtijax.forward(config, params, tokens)                      # jit partitions from the params' shardings
    mtijax.generate(config, params, prompts)                    # KV cache split over batch rows and kv heads

- :mod:`~mtijax.sharding.axes`: :func:`param_axes`, the logical axis names of every parameter;
- :mod:`~mtijax.sharding.rules`: :data:`DEFAULT_RULES`, logical axis -> mesh axis, and what happens when a
  mesh axis does not divide a dim;
- :mod:`~mtijax.sharding.place`: :func:`shard`, :func:`shard_batch`, :func:`spread`, :func:`replicate`;
- :mod:`~mtijax.sharding.load`: the sharded load behind ``mtijax.load(..., mesh=)``;
- :mod:`~mtijax.sharding.generation`: generation over sharded params (the engine's loop, a sharded cache);
- :mod:`~mtijax.sharding.sweeps`: injection-alpha and patch-mask sweeps split over ``data``.
"""

from mtijax.sharding.axes import ACTIVATION_AXES, LOGICAL_AXES, param_axes
from mtijax.sharding.place import (mesh_of, param_shardings, param_specs, replicate, shard, shard_batch,
                                   spread)
from mtijax.sharding.rules import DEFAULT_RULES, MESH_AXES, check_mesh

__all__ = ["ACTIVATION_AXES", "LOGICAL_AXES", "param_axes", "mesh_of", "param_shardings", "param_specs",
           "replicate", "shard", "shard_batch", "spread", "DEFAULT_RULES", "MESH_AXES", "check_mesh"]
