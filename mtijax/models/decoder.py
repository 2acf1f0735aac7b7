"""The decoder forward pass shared by every architecture: embed, one ``lax.scan`` of the block, unembed.

An architecture is a module (``mtijax.models.gemma3``, ...) that provides
``param_shapes``, ``layer_spec``, ``embed``, ``block`` and
``unembed`` for its config type; :func:`family` picks it from the config.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp

from mtijax.config import ModelConfig
from mtijax.errors import MtijaxError
from mtijax.interventions import Patch, Sites, check_sites
from mtijax.models import cache as kv

Params = dict[str, Any]
ResidualTransform = Callable[[jax.Array, jax.Array], jax.Array]
"""``f(h [B, S, D], positions [B, S]) -> h'``: a function grafted onto the residual stream between blocks."""


class ForwardOutput(NamedTuple):
    """What :func:`forward` returns.

    Attributes:
      logits: ``[B, S, V]`` float32.
      cache: the cache with this call's keys and values written, or None.
      captured: site name -> ``[L, B, S, ...]`` for each captured site.
    """

    logits: jax.Array
    cache: kv.KVCache | None
    captured: dict[str, jax.Array]


def family(config: ModelConfig) -> ModuleType:
    """The module implementing ``config``'s architecture."""
    from mtijax.models import gemma3, olmoe

    families = {"gemma3": gemma3, "olmoe": olmoe}
    try:
        return families[config.architecture]
    except KeyError:
        raise MtijaxError(f"unknown architecture {config.architecture!r}") from None


def init_params(config: ModelConfig, key: jax.Array, dtype: jnp.dtype = jnp.float32, scale: float = 0.02) -> Params:
    """Random parameters in the real shapes of ``config``'s architecture (normal, std ``scale``; norms too),
    for tests and benchmarks."""
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
                   transforms: Mapping[int, ResidualTransform] | None = None,
                   unroll: int | bool = 1) -> tuple[jax.Array, kv.KVCache | None, dict[str, jax.Array]]:
    """:func:`forward` without the output head: returns the last residual stream ``[B, S, D]``, cache, captures.

    ``unroll`` is passed to the layer ``lax.scan`` (True: straight-line code, one copy of the block per layer).
    """
    capture = check_sites(capture)
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

    def step(x, xs):
        layer, layer_spec_l, layer_cache, layer_patches = xs
        cache_kv = None if layer_cache is None else (*layer_cache, cache.positions)
        sites = Sites(capture, layer_patches)
        x, new_kv = arch.block(config, layer, layer_spec_l, x, positions, cache_kv, sites)
        visited.update(sites.visited)
        return x, (new_kv, sites.captured)

    xs = (params["layers"], spec, cache_xs, dict(patches or {}))
    segments = []
    start = 0
    for stop in sorted(transforms) + [config.num_layers - 1]:
        if stop < start:
            continue
        x, ys = jax.lax.scan(step, x, jax.tree.map(lambda a: a[start:stop + 1], xs), unroll=unroll)
        segments.append(ys)
        if stop in transforms:
            x = transforms[stop](x, positions)
        start = stop + 1
    new_kv, captured = segments[0] if len(segments) == 1 else jax.tree.map(
        lambda *parts: jnp.concatenate(parts), *segments)
    missing = sorted((set(capture) | set(patches or {})) - visited)
    if missing:
        raise MtijaxError(f"{config.architecture} has no activation site {missing[0]!r}")
    if cache is not None:
        cache = kv.write(cache, *new_kv, positions, write_index)
    return x, cache, captured


def forward(config: ModelConfig, params: Params, tokens: jax.Array, positions: jax.Array | None = None, *,
            cache: kv.KVCache | None = None, write_index: jax.Array | int = 0,
            capture: tuple[str, ...] = (), patches: Mapping[str, Patch] | None = None,
            transforms: Mapping[int, ResidualTransform] | None = None,
            unroll: int | bool = 1) -> ForwardOutput:
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
      unroll: passed to the layer ``lax.scan``; True unrolls it (faster decode on GPU, slower compile).
    """
    x, cache, captured = forward_hidden(config, params, tokens, positions, cache=cache, write_index=write_index,
                                        capture=capture, patches=patches, transforms=transforms, unroll=unroll)
    return ForwardOutput(unembed(config, params, x), cache, captured)
