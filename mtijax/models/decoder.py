"""The decoder forward pass shared by every architecture: embed, one ``lax.scan`` of the block, unembed.

An architecture is a record (``mtijax.models.architecture.Architecture``) that provides
``param_shapes``, ``layer_spec``, ``embed``, ``block`` and
``unembed`` for its config type; :func:`family` picks it from the config.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mtijax.config import ModelConfig
from mtijax.errors import MtijaxError
from mtijax.interventions import Patch, RouterHook, Sites, check_sites
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


def _keep_layers(num_layers: int, layers: Sequence[int] | None) -> np.ndarray | None:
    """For ``capture_layers``: ``[L]`` int32, the row of each kept layer in the capture buffer, -1 if not kept."""
    if layers is None:
        return None
    chosen = sorted(set(int(l) for l in layers))
    bad = [l for l in chosen if not 0 <= l < num_layers]
    if bad or not chosen:
        raise MtijaxError(f"capture layer {bad[0]} is out of range: the model has layers 0..{num_layers - 1}"
                          if bad else "capture_layers is empty")
    index = np.full((num_layers,), -1, np.int32)
    index[chosen] = np.arange(len(chosen), dtype=np.int32)
    return index


def _slot_selector(slots: jax.Array | None, batch: int) -> Callable[[jax.Array], jax.Array]:
    """For ``capture_slots [B, S']``: a function keeping those slots of an activation ``[B, S, ...]``."""
    if slots is None:
        return lambda value: value
    slots = jnp.broadcast_to(jnp.asarray(slots, jnp.int32), (batch, jnp.shape(slots)[-1]))
    return lambda value: jax.vmap(lambda row, index: row[index])(value, slots)


def _store(buffer: jax.Array, value: jax.Array, index: jax.Array) -> jax.Array:
    """Write ``value`` as row ``index`` of ``buffer`` (unchanged when ``index`` is -1)."""
    row = jnp.maximum(index, 0)
    old = jax.lax.dynamic_index_in_dim(buffer, row, keepdims=False)
    return jax.lax.dynamic_update_index_in_dim(buffer, jnp.where(index >= 0, value, old), row, 0)


def forward_hidden(config: ModelConfig, params: Params, tokens: jax.Array, positions: jax.Array | None = None, *,
                   cache: kv.KVCache | None = None, write_index: jax.Array | int = 0,
                   capture: tuple[str, ...] = (), patches: Mapping[str, Patch] | None = None,
                   transforms: Mapping[int, ResidualTransform] | None = None, router: RouterHook | None = None,
                   capture_layers: Sequence[int] | None = None, capture_slots: jax.Array | None = None,
                   keep_kv: bool = False, layout: str = "params", unroll: int | bool = 1) -> HiddenOutput:
    """:func:`forward` without the output head: the last residual stream ``[B, S, D]``, cache, captures and
    router state (:class:`HiddenOutput`)."""
    capture = check_sites(capture)
    keep_layers = _keep_layers(config.num_layers, capture_layers)
    check_sites((patches or {}).keys(), patching=True)
    b, s = tokens.shape
    if cache is not None and isinstance(write_index, int) and not 0 <= write_index <= cache.length - s:
        raise MtijaxError(f"cannot write {s} tokens at slot {write_index} of a {cache.length}-slot cache")
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    arch = family(config)
    spec = jax.tree.map(jnp.asarray, arch.layer_spec(config))
    transforms = dict(transforms or {})
    bad = [l for l in transforms if not (isinstance(l, int) and 0 <= l < config.num_layers)]
    if bad:
        raise MtijaxError(f"transform at layer {bad[0]!r} is out of range: the model has layers "
                          f"0..{config.num_layers - 1}")
    x = arch.embed(config, params, tokens)
    cache_xs = None if cache is None else (cache.k, cache.v)
    visited: set[str] = set()
    keep = _slot_selector(capture_slots, b)

    def layer_step(x, layer, layer_spec_l, layer_cache, layer_patches, layer_router):
        cache_kv = None if layer_cache is None else (*layer_cache, cache.positions)
        sites = Sites(capture, layer_patches, None if router is None else (router.fn, *layer_router))
        x, new_kv = arch.block(config, layer, layer_spec_l, x, positions, cache_kv, sites, layout)
        visited.update(sites.visited)
        return x, new_kv, {name: keep(value) for name, value in sites.captured.items()}, sites.router_state

    def step(carry, xs):
        x, kept = carry
        layer, layer_spec_l, layer_cache, layer_patches, layer_router, keep_index = xs
        x, new_kv, captured, router_state = layer_step(x, layer, layer_spec_l, layer_cache, layer_patches,
                                                       layer_router)
        if keep_layers is None:
            return (x, kept), (new_kv, captured, router_state)
        return (x, {n: _store(kept[n], captured[n], keep_index) for n in kept}), (new_kv, {}, router_state)

    if router is not None and router.state is None:
        router = router.start(b)
    router_xs = None if router is None else (router.params, router.state)
    xs = (params["layers"], spec, cache_xs, dict(patches or {}), router_xs,
          None if keep_layers is None else keep_layers)
    kept = {}
    if keep_layers is not None:
        first = jax.tree.map(lambda a: a[0], xs)
        shapes = jax.eval_shape(lambda: layer_step(x, *first[:5])[2])
        count = int((keep_layers >= 0).sum())
        kept = {n: jnp.zeros((count, *v.shape), v.dtype) for n, v in shapes.items()}
    segments = []
    start = 0
    for stop in sorted(transforms) + [config.num_layers - 1]:
        if stop < start:
            continue
        (x, kept), ys = jax.lax.scan(step, (x, kept), jax.tree.map(lambda a: a[start:stop + 1], xs),
                                     unroll=unroll)
        segments.append(ys)
        if stop in transforms:
            x = transforms[stop](x, positions)
        start = stop + 1
    new_kv, captured, router_state = segments[0] if len(segments) == 1 else jax.tree.map(
        lambda *parts: jnp.concatenate(parts), *segments)
    if keep_layers is not None:
        captured = kept
    missing = sorted((set(capture) | set(patches or {})) - visited)
    if missing:
        raise MtijaxError(f"{config.architecture} has no activation site {missing[0]!r}")
    if router is not None and "router" not in visited:
        raise MtijaxError(f"a router hook needs a mixture-of-experts model; {config.architecture} has no router")
    if cache is not None:
        cache = kv.write(cache, *new_kv, positions, write_index)
    elif keep_kv:
        cache = kv.KVCache(*new_kv, positions)
    return HiddenOutput(x, cache, captured, router_state)


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
    out = forward_hidden(config, params, tokens, positions, cache=cache, write_index=write_index, capture=capture,
                         patches=patches, transforms=transforms, router=router, capture_layers=capture_layers,
                         capture_slots=capture_slots, keep_kv=keep_kv, layout=layout, unroll=unroll)
    return ForwardOutput(unembed(config, params, out.hidden), out.cache, out.captured, out.router_state)
