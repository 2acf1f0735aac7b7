"""Patched forward passes and vmapped sweeps over batches of patch specs.

:func:`sweep` runs a batch of specs (a leading ``K`` axis on their ``layers``,
``span`` or ``coef``) through ``jax.vmap`` of one jitted forward: every single
layer, every pair, every coefficient in one call and one compile, with the
source values shared, not copied per spec.
"""

from __future__ import annotations

import itertools
from functools import partial
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mtijax.config import ModelConfig
from mtijax.errors import MtijaxError
from mtijax.models import cache as kv
from mtijax.models.decoder import ForwardOutput, Params, forward
from mtijax.patching.spec import PatchSpec, check_span, to_patches

UNBATCHED_NDIM = {"layers": 1, "span": 1, "coef": 0}
"""Fields a sweep may batch, with their rank in one spec."""


def _positions(tokens: jax.Array, positions: jax.Array | None) -> jax.Array:
    if positions is None:
        return jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    return jnp.asarray(positions, jnp.int32)


@partial(jax.jit, static_argnames=("config", "capture"))
def _forward(config, params, tokens, positions, specs, cache, write_index, capture):
    return forward(config, params, tokens, positions, cache=cache, write_index=write_index, capture=capture,
                   patches=to_patches(specs, positions))


def patched_forward(config: ModelConfig, params: Params, tokens: jax.Array, specs: Sequence[PatchSpec],
                    positions: jax.Array | None = None, *, cache: kv.KVCache | None = None,
                    write_index: jax.Array | int = 0, capture: tuple[str, ...] = ()) -> ForwardOutput:
    """``forward`` with ``specs`` applied (one per site); a position range outside a row's prompt, or without
    aligned source tokens, is an error."""
    tokens = jnp.asarray(tokens, jnp.int32)
    positions = _positions(tokens, positions)
    specs = list(specs)
    for spec in specs:
        check_span(spec, np.asarray(positions))
    return _forward(config, params, tokens, positions, specs, cache, write_index, tuple(capture))


def _axes(spec: PatchSpec) -> tuple[PatchSpec, int | None]:
    """The vmap axes of a spec (0 on batched fields) and its batch size (None if unbatched)."""
    axes, size = {}, None
    for name, ndim in UNBATCHED_NDIM.items():
        value = getattr(spec, name)
        if np.ndim(value) == ndim + 1:
            axes[name] = 0
            size = size or np.shape(value)[0]
            if np.shape(value)[0] != size:
                raise MtijaxError(f"sweep: batched fields of the specs have different sizes ({size} and "
                                  f"{np.shape(value)[0]})")
        elif np.ndim(value) == ndim:
            axes[name] = None
        else:
            raise MtijaxError(f"sweep: {spec.site} {name} has rank {np.ndim(value)}, expected {ndim} or {ndim + 1}")
    return spec.replace(source=None, source_positions=None, **axes), size


@partial(jax.jit, static_argnames=("config", "in_axes", "final_only"))
def _sweep(config, params, tokens, positions, specs, cache, write_index, in_axes, final_only):
    def one(specs):
        logits = forward(config, params, tokens, positions, cache=cache, write_index=write_index,
                         patches=to_patches(specs, positions)).logits
        return logits[:, -1] if final_only else logits
    return jax.vmap(one, in_axes=(list(in_axes),))(specs)


def sweep(config: ModelConfig, params: Params, tokens: jax.Array, specs: Sequence[PatchSpec],
          positions: jax.Array | None = None, *, cache: kv.KVCache | None = None, write_index: jax.Array | int = 0,
          final_only: bool = True) -> jax.Array:
    """Logits of every spec in a batch: ``[K, B, V]`` at the last slot (``final_only``) or ``[K, B, S, V]``.

    A spec is batched when its ``layers`` is ``[K, L]``, its ``span`` ``[K, 2]`` or its ``coef`` ``[K]``;
    unbatched specs apply the same in every run.
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    positions = _positions(tokens, positions)
    specs = list(specs)
    axes = [_axes(spec) for spec in specs]
    sizes = {size for _, size in axes if size is not None}
    if len(sizes) != 1:
        raise MtijaxError("sweep: give specs with a batch axis of one size (e.g. layers [K, L])"
                          if not sizes else f"sweep: specs are batched with different sizes {sorted(sizes)}")
    for spec in specs:
        first = spec.replace(**{n: getattr(spec, n)[0] for n, nd in UNBATCHED_NDIM.items()
                                if np.ndim(getattr(spec, n)) == nd + 1})
        check_span(first, np.asarray(positions))
    in_axes = tuple(a for a, _ in axes)
    return _sweep(config, params, tokens, positions, specs, cache, write_index, in_axes, final_only)


def single_layers(num_layers: int) -> np.ndarray:
    """``[L, L]`` masks, one per layer."""
    return np.eye(num_layers, dtype=np.float32)


def layer_pairs(num_layers: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """``[P, L]`` masks of every pair of distinct layers, and the pairs (``P = L (L - 1) / 2``)."""
    pairs = list(itertools.combinations(range(num_layers), 2))
    masks = np.zeros((len(pairs), num_layers), np.float32)
    for row, (a, b) in enumerate(pairs):
        masks[row, [a, b]] = 1.0
    return masks, pairs
