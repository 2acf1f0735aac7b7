"""The compiled pieces of a streamed pass: one layer's block on its streamed weights, and the small functions
around the layers.

:func:`layer_step` is the resident layer scan's body (the model's one-layer linen module,
``mtijax.models.modules.Block``), called once per layer
from the host: it takes the layer index as data and slices every per-layer
intervention at it exactly as ``lax.scan`` slices them (patch values and masks
``[L, ...]`` -> ``[...]``, the router hook's params and state ``[L, ...]`` ->
``[...]``), so one compiled step serves every layer, and a streamed layer with
the same weights, cache and interventions computes what the resident scan's
layer ``l`` computes. Grafts (transforms on the residual stream leaving block
``l``) run between steps, as the resident forward runs them between scan
segments.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from mtijax.config import ModelConfig
from mtijax.engine.interventions import Graft, Interventions, chunk_patches
from mtijax.errors import MtijaxError
from mtijax.interventions import Patch, RouterHook, Sites
from mtijax.models.decoder import family
from mtijax.models.modules import block_apply
from mtijax.streaming.store import Leaf, to_params_layout

Tree = dict[str, Any]


def _sites(capture: tuple[str, ...], patches: Mapping[str, Patch], hook: RouterHook | None, router_state: Any,
           layer: jax.Array) -> Sites:
    """Layer ``layer``'s slice of the patches and of the router hook, as the block's :class:`Sites`."""
    at = lambda a: jax.lax.dynamic_index_in_dim(a, layer, keepdims=False)  # noqa: E731
    router = None if hook is None else (hook.fn, jax.tree.map(at, hook.params), jax.tree.map(at, router_state))
    return Sites(capture, jax.tree.map(at, dict(patches)), router)


def _check_visited(config: ModelConfig, sites: Sites, patches: Mapping[str, Patch], hook: RouterHook | None) -> None:
    """Refuse (at trace time) a router hook on a model without a router (site names are checked before, against
    the architecture's sites: ``mtijax.interventions.check_sites``)."""
    if hook is not None and "router" not in sites.visited:
        raise MtijaxError(f"a router hook needs a mixture-of-experts model; {config.architecture} has no router")


def layer_step(config: ModelConfig, leaves: tuple[Leaf, ...], capture: tuple[str, ...], stored: Tree, spec: Tree,
               x: jax.Array, positions: jax.Array, cache_k: jax.Array, cache_v: jax.Array,
               cache_positions: jax.Array, layer: jax.Array, write_index: jax.Array, patches: Mapping[str, Patch],
               hook: RouterHook | None, router_state: Any) -> tuple[jax.Array, jax.Array, jax.Array, dict, Any]:
    """Layer ``layer``: the model's block on this layer's weights (``stored``, file layout) and cache.

    ``x [B, S, D]`` at ``positions [B, S]``; the cache ``[L, B, T, K, H]`` (``cache_positions [B, T]``: before this
    call). Writes the layer's new keys and values at ``[layer, :, write_index]``. ``hook`` is the router hook
    without its state; ``router_state`` its ``[L, ...]`` state. Returns ``(x, cache_k, cache_v, captured,
    router_state)`` (``captured``: site -> ``[B, S, ...]`` of the ``capture`` sites; the router state with layer
    ``layer`` updated).
    """
    sites = _sites(capture, patches, hook, router_state, layer)
    x, (k, v) = block_apply(config, to_params_layout(stored, leaves), spec, x, positions,
                            (cache_k[layer], cache_v[layer], cache_positions), sites)
    _check_visited(config, sites, patches, hook)
    zero = jnp.zeros((), jnp.int32)
    at = (layer, zero, write_index, zero, zero)
    cache_k = jax.lax.dynamic_update_slice(cache_k, k[None].astype(cache_k.dtype), at)
    cache_v = jax.lax.dynamic_update_slice(cache_v, v[None].astype(cache_v.dtype), at)
    if hook is not None:
        router_state = jax.tree.map(lambda full, new: jax.lax.dynamic_update_index_in_dim(full, new, layer, 0),
                                    router_state, sites.router_state)
    return x, cache_k, cache_v, sites.captured, router_state


def route_step(config: ModelConfig, leaves: tuple[Leaf, ...], capture: tuple[str, ...], stored: Tree, spec: Tree,
               x: jax.Array, positions: jax.Array, cache_k: jax.Array, cache_v: jax.Array,
               cache_positions: jax.Array, layer: jax.Array, write_index: jax.Array, patches: Mapping[str, Patch],
               hook: RouterHook | None, router_state: Any) -> jax.Array:
    """The experts :func:`layer_step` routes this layer's tokens to: ``[B, S, k]`` (its other outputs unused)."""
    sites = _sites(("router_experts",), patches, hook, router_state, layer)
    block_apply(config, to_params_layout(stored, leaves), spec, x, positions,
                (cache_k[layer], cache_v[layer], cache_positions), sites)
    return sites.captured["router_experts"]


STEP_DONATE = (4, 5)
""":func:`layer_step`'s donated arguments after ``config, leaves, capture``: the cache's keys and values."""


@functools.partial(jax.jit, static_argnums=0)
def embed(config: ModelConfig, resident: Tree, tokens: jax.Array) -> jax.Array:
    """The model's embedding of ``tokens [B, S]`` from the resident params."""
    return family(config).embed(config, resident, tokens)


@functools.partial(jax.jit, static_argnums=0)
def logits(config: ModelConfig, resident: Tree, x: jax.Array) -> jax.Array:
    """The final norm and output head from the resident params: ``[..., D]`` -> float32 ``[..., V]``."""
    return family(config).unembed(config, resident, x)


@functools.partial(jax.jit, donate_argnums=0)
def write_positions(cache_positions: jax.Array, positions: jax.Array, write_index: jax.Array) -> jax.Array:
    """The cache's slot positions ``[B, T]`` with ``positions [B, S]`` written at ``write_index`` (after a pass)."""
    zero = jnp.zeros((), jnp.int32)
    return jax.lax.dynamic_update_slice(cache_positions, positions.astype(jnp.int32),
                                        (zero, jnp.asarray(write_index, jnp.int32)))


@jax.jit
def apply_graft(graft: Graft, h: jax.Array, positions: jax.Array, carry: Any) -> tuple[jax.Array, Any, dict]:
    """``graft`` on the residual stream ``h [B, S, D]``: ``(h', carry', metrics)``."""
    return graft.module(graft.variables, h, positions, carry)


@functools.partial(jax.jit, static_argnums=2)
def prefill_patches(interventions: Interventions, start: jax.Array, size: int) -> dict[str, Patch]:
    """The patches of the prefill chunk at slots ``start .. start + size - 1`` (static and prompt patches)."""
    return {**interventions.patches, **chunk_patches(interventions.prompt_patches, start, size)}


@jax.jit
def decode_patches(interventions: Interventions, step: jax.Array) -> dict[str, Patch]:
    """The patches of decode call ``step`` (static and step patches)."""
    return {**interventions.patches, **{site: p.at(step) for site, p in interventions.step_patches.items()}}
