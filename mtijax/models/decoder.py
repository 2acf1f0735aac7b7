"""The decoder's functional API: :func:`forward` and :func:`forward_hidden`, thin calls of the linen module
(``mtijax.models.modules``: embed, one ``lax.scan`` of the block, unembed) over the documented params.

An architecture is a record (``mtijax.models.architecture.Architecture``) that provides
``param_shapes``, ``layer_spec``, ``embed``, ``block`` and
``unembed`` for its config type; :func:`family` picks it from the config.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from mtijax.config import ModelConfig
from mtijax.interventions import Patch, RouterHook
from mtijax.models import cache as kv
from mtijax.models.architecture import Architecture
from mtijax.models.architectures import architecture

Params = dict[str, Any]
ResidualTransform = Callable[[jax.Array, jax.Array], jax.Array]
"""``f(h [B, S, D], positions [B, S]) -> h'``: a function grafted onto the residual stream between blocks."""


class ForwardOutput(NamedTuple):
    """What :func:`forward` returns.

    Attributes:
      logits: ``[B, S, V]`` float32.
      cache: the cache with this call's keys and values written, or None.
      captured: site name -> ``[L, B, S, ...]`` for each captured site.
      router_state: the router hook's state after this call (``[L, B, ...]`` leaves), or None without one.
    """

    logits: jax.Array
    cache: kv.KVCache | None
    captured: dict[str, jax.Array]
    router_state: Any = None


class HiddenOutput(NamedTuple):
    """What :func:`forward_hidden` returns: :class:`ForwardOutput` with the last residual stream ``hidden
    [B, S, D]`` in place of the logits."""

    hidden: jax.Array
    cache: kv.KVCache | None
    captured: dict[str, jax.Array]
    router_state: Any = None


def family(config: ModelConfig) -> Architecture:
    """The record of ``config``'s architecture (``mtijax.models.architectures.architecture``)."""
    return architecture(config)


def init_params(config: ModelConfig, key: jax.Array, dtype: jnp.dtype = jnp.float32, scale: float = 0.02) -> Params:
    """Random parameters in the real shapes of ``config``'s architecture (normal, std ``scale``; norms too),
    for tests and benchmarks. One compiled program draws them all."""
    return _init_params(config, key, jnp.dtype(dtype), float(scale))


@functools.partial(jax.jit, static_argnums=(0, 2, 3))
def _init_params(config: ModelConfig, key: jax.Array, dtype: jnp.dtype, scale: float) -> Params:
    shapes = family(config).param_shapes(config)
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(
        treedef, [jnp.asarray(scale, dtype) * jax.random.normal(k, s, dtype) for k, s in zip(keys, leaves)])


def unembed(config: ModelConfig, params: Params, x: jax.Array) -> jax.Array:
    """Final norm and output head of ``config``'s architecture: ``[..., D]`` -> float32 logits ``[..., V]``."""
    return family(config).unembed(config, params, x)


def forward_hidden(config: ModelConfig, params: Params, tokens: jax.Array, positions: jax.Array | None = None, *,
                   cache: kv.KVCache | None = None, write_index: jax.Array | int = 0,
                   capture: tuple[str, ...] = (), patches: Mapping[str, Patch] | None = None,
                   transforms: Mapping[int, ResidualTransform] | None = None, router: RouterHook | None = None,
                   capture_layers: Sequence[int] | None = None, capture_slots: jax.Array | None = None,
                   keep_kv: bool = False, layout: str = "params", unroll: int | bool = 1) -> HiddenOutput:
    """:func:`forward` without the output head: the last residual stream ``[B, S, D]``, cache, captures and
    router state (:class:`HiddenOutput`); ``module(config, layout).apply(..., method="hidden")``."""
    from mtijax.models.modules import module

    return module(config, layout).apply(
        {"params": params}, tokens, positions, cache=cache, write_index=write_index, capture=capture,
        patches=patches, transforms=transforms, router=router, capture_layers=capture_layers,
        capture_slots=capture_slots, keep_kv=keep_kv, unroll=unroll, method="hidden")


def forward(config: ModelConfig, params: Params, tokens: jax.Array, positions: jax.Array | None = None, *,
            cache: kv.KVCache | None = None, write_index: jax.Array | int = 0,
            capture: tuple[str, ...] = (), patches: Mapping[str, Patch] | None = None,
            transforms: Mapping[int, ResidualTransform] | None = None, router: RouterHook | None = None,
            capture_layers: Sequence[int] | None = None, capture_slots: jax.Array | None = None,
            keep_kv: bool = False, layout: str = "params", unroll: int | bool = 1) -> ForwardOutput:
    """Run the decoder over ``tokens [B, S]``; pure, so ``jax.jit`` it with ``config`` static.

    Args:
      positions: ``[B, S]`` int32 token positions, -1 for padding; default ``0..S-1``.
      cache: if given, the tokens attend to the cache and their keys and values
        are written into it at slots ``write_index .. write_index + S - 1``.
      capture: site names whose activations to return (see ``mtijax.interventions``).
      patches: site name -> :class:`Patch` with a leading ``[L]`` axis.
      transforms: layer ``l`` -> a function ``f(h [B, S, D], positions [B, S]) -> [B, S, D]`` applied to
        the residual stream leaving block ``l`` (after its ``resid_post`` site), before block ``l + 1``.
        For grafted modules with parameters of their own (``mtijax.fusion``): ``f`` closes over them, so
        ``jax.grad`` and ``jax.jit`` of the caller see through it. The layer scan is split at these layers
        (a Python structure, so a different set of layers is a different compile); captures and cache
        have the unsplit scan's layout (and its values, up to float rounding).
      router: a :class:`~mtijax.interventions.RouterHook` replacing a mixture-of-experts router's logits
        (``mtijax.snn.gate.spiking_gate``); its state after this call is ``ForwardOutput.router_state``.
      capture_layers: keep captures of these layers only (sorted; ``captured[site]`` is ``[len(layers), ...]``).
        They are written into a buffer carried through the layer scan, so the other layers' activations are
        never stored.
      capture_slots: ``[B, S']`` (or ``[S']``) int32 slot indices: keep captures at these token slots only
        (``captured[site]`` is ``[..., B, S', ...]``), selected inside the block.
      keep_kv: without a ``cache``, return this call's keys and values as a cache of ``S`` slots (computed
        exactly as without it: the tokens attend to each other only).
      layout: how ``params`` hold their weights: ``"params"`` (the documented layout) or ``"fused_qkv"``
        (:func:`mtijax.models.fused.fuse_qkv`, the decode-time layout).
      unroll: passed to the layer ``lax.scan``; True unrolls it (faster decode on GPU, slower compile).
    """
    from mtijax.models.modules import module

    return module(config, layout).apply(
        {"params": params}, tokens, positions, cache=cache, write_index=write_index, capture=capture,
        patches=patches, transforms=transforms, router=router, capture_layers=capture_layers,
        capture_slots=capture_slots, keep_kv=keep_kv, unroll=unroll)
