"""Fusion layers grafted onto a frozen base model through ``forward(transforms=...)``.

The fusion variables are a Flax-style dict beside the base params, one entry per fused layer::

    {"params": {"layers": {"6": {...}, "12": {...}}},   # trained
     "memory": {"layers": {"6": {"smf": {...}}}}}       # SMF banks, only for layers that have one

:func:`fused_forward` builds one residual transform per fused layer: a closure over that layer's
(possibly traced) params which applies the :class:`FusionLayer` to the residual stream leaving the base
block and records the layer's metrics, carry and memory into a dict that the function returns. Nothing is
global, so ``jax.jit`` and ``jax.grad`` with respect to the fusion params see straight through, and the
base params are only read.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mtijax.config import ModelConfig
from mtijax.errors import MtijaxError
from mtijax.fusion.config import FusionConfig, check_against_model
from mtijax.fusion.layer import FusionLayer, LayerCarry
from mtijax.interventions import Patch, RouterHook
from mtijax.models.cache import KVCache
from mtijax.models.decoder import forward_hidden, unembed

Variables = dict[str, Any]
Carry = dict[int, LayerCarry]
"""Fused layer -> what its token-coupled components keep between incremental calls."""


class FusedOutput(NamedTuple):
    """What :func:`fused_forward` returns.

    Attributes:
      logits: ``[B, S, V]`` float32 (``fused_hidden``: the last residual stream ``[B, S, D]``).
      cache: the KV cache with this call written, or None.
      metrics: fused layer -> metric name -> ``[B, S]`` per token (``fusion_alpha``: a scalar); see
        ``mtijax.fusion.layer.METRICS``.
      carry: fused layer -> :class:`LayerCarry` after this call (pass it to the next incremental call).
      memory: the memory collection after this call (changed only with ``store_memory``).
      captured: site name -> ``[L, B, S, ...]`` for each captured site (``capture``).
      router_state: the router hook's state after this call (``router``), or None.
    """

    logits: jax.Array
    cache: KVCache | None
    metrics: dict[int, dict[str, jax.Array]]
    carry: Carry
    memory: dict[str, Any]
    captured: dict[str, jax.Array] = {}
    router_state: Any = None


def init_fusion(fusion: FusionConfig, config: ModelConfig, key: jax.Array) -> Variables:
    """Fresh fusion variables for base model ``config`` (its hidden size and depth)."""
    check_against_model(fusion, config)
    return init_layers(fusion, config.hidden_size, key)


def init_layers(fusion: FusionConfig, hidden_size: int, key: jax.Array) -> Variables:
    """Fresh fusion variables for a residual stream of width ``hidden_size``."""
    init = jax.jit(FusionLayer(fusion).init)  # one compile, instead of running the init op by op
    h, positions = jnp.zeros((1, 2, hidden_size), jnp.float32), jnp.zeros((1, 2), jnp.int32)
    params, memory = {}, {}
    for position, sub in zip(fusion.positions, jax.random.split(key, len(fusion.positions))):
        variables = init(sub, h, positions, LayerCarry.empty(fusion, 1))
        params[str(position)] = variables["params"]
        if "memory" in variables:
            memory[str(position)] = variables["memory"]
    return {"params": {"layers": params}, "memory": {"layers": memory} if memory else {}}


def variable_shapes(fusion: FusionConfig, hidden_size: int) -> Variables:
    """The shapes and dtypes (``jax.ShapeDtypeStruct``) of :func:`init_layers`' variables, without computing them."""
    return jax.eval_shape(lambda k: init_layers(fusion, hidden_size, k), jax.random.key(0))


def check_variables(fusion: FusionConfig, config: ModelConfig, variables: Variables) -> None:
    """Raise if the variables do not fit ``fusion`` and the base model ``config`` (layers, names, shapes)."""
    check_against_model(fusion, config)
    layers = variables.get("params", {}).get("layers", {})
    if set(layers) != {str(p) for p in fusion.positions}:
        raise MtijaxError(f"the fusion params are for layers {sorted(int(k) for k in layers)}, the config says "
                          f"{sorted(fusion.positions)}")
    expected = dict(jax.tree_util.tree_flatten_with_path(variable_shapes(fusion, config.hidden_size))[0])
    found = dict(jax.tree_util.tree_flatten_with_path(variables)[0])
    for path in sorted(set(expected) | set(found), key=jax.tree_util.keystr):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        if path not in found or path not in expected:
            raise MtijaxError(f"fusion variable {name} is {'missing' if path not in found else 'unexpected'} "
                              f"for this fusion config")
        if tuple(found[path].shape) != tuple(expected[path].shape):
            raise MtijaxError(f"fusion variable {name} has shape {tuple(found[path].shape)}, but a base model of "
                              f"hidden size {config.hidden_size} needs {tuple(expected[path].shape)}")


def empty_carry(fusion: FusionConfig, batch: int) -> Carry:
    """The carry before any token (every fused layer)."""
    return {p: LayerCarry.empty(fusion, batch) for p in fusion.positions}


def fused_hidden(config: ModelConfig, params: Mapping[str, Any], fusion: FusionConfig, variables: Variables,
                 tokens: jax.Array, positions: jax.Array | None = None, *, cache: KVCache | None = None,
                 write_index: jax.Array | int = 0, carry: Carry | None = None, store_memory: bool = False,
                 patches: Mapping[str, Patch] | None = None, capture: tuple[str, ...] = (),
                 router: RouterHook | None = None, unroll: int | bool = 1) -> FusedOutput:
    """:func:`fused_forward` without the output head (``logits`` holds the last residual stream)."""
    check_against_model(fusion, config)
    b, s = tokens.shape
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    carry = empty_carry(fusion, b) if carry is None else carry
    layer = FusionLayer(fusion)
    layers, memories = variables["params"]["layers"], variables.get("memory", {}).get("layers", {})
    records: dict[int, tuple] = {}

    def graft(position: int):
        def transform(h, token_positions):
            collections = {"params": layers[str(position)]}
            if str(position) in memories:
                collections["memory"] = memories[str(position)]
            if store_memory and "memory" in collections:
                (out, metrics, new_carry), changed = layer.apply(collections, h, token_positions, carry[position],
                                                                  True, mutable=["memory"])
                memory = changed["memory"]
            else:
                out, metrics, new_carry = layer.apply(collections, h, token_positions, carry[position])
                memory = collections.get("memory")
            records[position] = (metrics, new_carry, memory)
            return out
        return transform

    out = forward_hidden(config, params, tokens, positions, cache=cache, write_index=write_index,
                         transforms={p: graft(p) for p in fusion.positions}, patches=patches, capture=capture,
                         router=router, unroll=unroll)
    metrics = {p: records[p][0] for p in fusion.positions}
    new_carry = {p: records[p][1] for p in fusion.positions}
    memory = {"layers": {str(p): records[p][2] for p in fusion.positions if records[p][2] is not None}}
    return FusedOutput(out.hidden, out.cache, metrics, new_carry, memory if memory["layers"] else {}, out.captured,
                       out.router_state)


def fused_forward(config: ModelConfig, params: Mapping[str, Any], fusion: FusionConfig, variables: Variables,
                  tokens: jax.Array, positions: jax.Array | None = None, *, cache: KVCache | None = None,
                  write_index: jax.Array | int = 0, carry: Carry | None = None, store_memory: bool = False,
                  patches: Mapping[str, Patch] | None = None, capture: tuple[str, ...] = (),
                  router: RouterHook | None = None, unroll: int | bool = 1) -> FusedOutput:
    """The base model with fusion layers after the blocks ``fusion.positions``: pure, ``jax.jit`` it with
    ``config`` and ``fusion`` static.

    Args:
      params: the base model's params (only read). variables: from :func:`init_fusion` or a checkpoint.
      tokens, positions, cache, write_index: as ``mtijax.forward``.
      carry: the carry returned by the previous incremental call (None: no earlier tokens).
      store_memory: write the SMF banks (training steps only).
      patches, capture, router: as ``mtijax.forward`` (activation patches and captures at the base model's
        sites, a router hook), composed with the fusion layers in the same forward.
    """
    out = fused_hidden(config, params, fusion, variables, tokens, positions, cache=cache, write_index=write_index,
                       carry=carry, store_memory=store_memory, patches=patches, capture=capture, router=router,
                       unroll=unroll)
    return out._replace(logits=unembed(config, params, out.logits))


def summarize(metrics: Mapping[int, Mapping[str, jax.Array]], valid: jax.Array) -> dict[str, jax.Array]:
    """Each metric averaged over the non-padding tokens (``valid [B, S]``) and then over the fused layers that
    report it (``fusion_alpha``: over layers): name -> scalar."""
    weight = valid.astype(jnp.float32)
    total = jnp.maximum(jnp.sum(weight), 1.0)
    per_name: dict[str, list[jax.Array]] = {}
    for layer_metrics in metrics.values():
        for name, value in layer_metrics.items():
            per_name.setdefault(name, []).append(value if value.ndim == 0 else jnp.sum(value * weight) / total)
    return {name: jnp.mean(jnp.stack(values)) for name, values in per_name.items()}


def param_count(fusion: FusionConfig, hidden_size: int) -> int:
    """Number of trained fusion parameters for a residual stream of width ``hidden_size`` (memory banks excluded)."""
    return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(variable_shapes(fusion, hidden_size)["params"])))
