"""KV-cache patching: put a source run's keys and values into a target run's cache.

Caches are laid out as ``generate`` and :func:`mtijax.patching.capture` make
them: each row's prompt is left-padded and ends at slot ``end`` (its slots
``end - n .. end - 1`` hold positions ``0 .. n - 1``; empty slots hold
position -1). Keys are stored normed and rotated, so a key carries the
position it was computed at. Two policies:

``"whole"``
    The target's prompt area becomes the source's cache: slots
    ``end - source_end .. end - 1`` receive every source slot *with its
    position*, earlier slots are emptied. The target then continues after the
    source's positions (the next token is at position ``n_source``): it is the
    source's context, and only what the target feeds next is its own.
    Replacing only some layers needs prompts of the same length (the cache
    holds one position per slot, shared by all layers).

``"last_min"`` (the original's)
    In each row, the last ``m = min(n_target, n_source)`` prompt slots of the
    target receive the source's last ``m`` keys and values; the target's
    positions are kept. Where the source is shorter, the target's first
    ``n_target - m`` tokens stay; where it is longer, its first ``n_source - m``
    tokens are dropped. The moved keys keep the source's rotation, so when
    the lengths differ a key's rotary position (source position ``q``) and
    its slot's position (``q + n_target - n_source``, used by the causal and
    sliding-window masks) disagree by the length difference, exactly as in
    the original's ``DynamicCache`` surgery.
"""

from __future__ import annotations

from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from mtijax.errors import MtijaxError
from mtijax.interventions import layer_mask
from mtijax.models.cache import KVCache

POLICIES = ("whole", "last_min")


def check_caches(target: KVCache, source: KVCache) -> None:
    """Raise a one-line error unless ``source`` can patch ``target`` (same layers, kv heads and head size; a
    batch of 1 or the target's)."""
    if source.k.ndim != 5 or source.k.shape != source.v.shape:
        raise MtijaxError(f"the source cache must hold k and v of shape [layers, batch, slots, kv_heads, head_dim], "
                          f"got {tuple(source.k.shape)} and {tuple(source.v.shape)}")
    (lt, bt, _, kt, ht), (ls, bs, ts, ks, hs) = target.k.shape, source.k.shape
    if (lt, kt, ht) != (ls, ks, hs):
        raise MtijaxError(f"the source cache is from another architecture or model: {ls} layers x {ks} kv heads x "
                          f"{hs} head size, the target's is {lt} x {kt} x {ht}")
    if bs not in (1, bt):
        raise MtijaxError(f"the source cache has batch {bs}; it must be 1 or the target's {bt}")
    if source.positions.shape != (bs, ts):
        raise MtijaxError(f"the source cache's positions have shape {tuple(source.positions.shape)}, expected "
                          f"{(bs, ts)}")


def layer_weights(num_layers: int, layers: Iterable[int] | jax.Array | None) -> jax.Array:
    """``[L]`` float32 mask from layer indices (None: every layer) or a mask."""
    if layers is None:
        return jnp.ones((num_layers,), jnp.float32)
    if isinstance(layers, (jax.Array, np.ndarray)) and np.shape(layers) == (num_layers,) \
            and jnp.asarray(layers).dtype.kind == "f":
        return jnp.asarray(layers, jnp.float32)
    return layer_mask(num_layers, layers)


def _rows(source: jax.Array, batch: int) -> jax.Array:
    return jnp.broadcast_to(source, (source.shape[0], batch, *source.shape[2:]))


def _gather_slots(values: jax.Array, slots: jax.Array) -> jax.Array:
    """``values [L, B, T, ...]``, ``slots [B, S]`` -> ``[L, B, S, ...]``."""
    return jax.vmap(lambda rows, index: rows[:, index], in_axes=(1, 0), out_axes=1)(values, slots)


def replace_kv(target: KVCache, source: KVCache, *, policy: str = "whole",
               layers: Iterable[int] | jax.Array | None = None, target_end: int | jax.Array | None = None,
               source_end: int | None = None) -> KVCache:
    """The target cache with the source's keys and values put in (see the module docstring). Pure.

    Args:
      policy: ``"whole"`` or ``"last_min"``.
      layers: layer indices or an ``[L]`` 0/1 mask (data: vmap it for a sweep); None = every layer.
      target_end: the slot after the target's prompt (default: its last slot + 1); slots from there on (room
        for generated tokens) are untouched. A traced int32 scalar works too (inside a compiled function:
        the generation engine's ``CacheEdit``), without the range checks.
      source_end: the slot after the source's prompt (default: the source cache's length).
    """
    check_caches(target, source)
    if policy not in POLICIES:
        raise MtijaxError(f"unknown KV policy {policy!r}; policies are {', '.join(POLICIES)}")
    target_end = target.length if target_end is None else target_end
    concrete = not isinstance(target_end, jax.core.Tracer)
    source_end = source.length if source_end is None else int(source_end)
    if concrete:
        target_end = int(target_end)
        if not 0 < target_end <= target.length or not 0 < source_end <= source.length:
            raise MtijaxError(f"prompt ends at slots {target_end} (target, {target.length} slots) and {source_end} "
                              f"(source, {source.length} slots): out of range")
        if policy == "whole" and source_end > target_end:
            raise MtijaxError(f"whole-cache replacement: the source's prompt area ({source_end} slots) does not fit "
                              f"the target's ({target_end} slots)")
    num_layers, batch = target.k.shape[:2]
    weights = layer_weights(num_layers, layers)
    slots = jnp.arange(target.length, dtype=jnp.int32)[None, :]
    region = slots < target_end
    index = jnp.broadcast_to(jnp.clip(slots - target_end + source_end, 0, source_end - 1), (batch, target.length))
    src_pos = jnp.broadcast_to(source.positions, (batch, source.length))
    if policy == "last_min":
        old_pos = jnp.where(region, target.positions, -1)
        m = jnp.minimum(jnp.sum(old_pos >= 0, -1), jnp.sum(src_pos[:, :source_end] >= 0, -1))[:, None]
        moved = region & (slots >= target_end - m)
        positions = target.positions
    else:
        moved = region & (slots >= target_end - source_end)
        positions = jnp.where(region, jnp.where(moved, jnp.take_along_axis(src_pos, index, axis=1), -1),
                              target.positions)
        if concrete and not any(isinstance(x, jax.core.Tracer) for x in (weights, target.positions, positions)) \
                and not bool(jnp.all(weights == 1)) and not bool(jnp.all(positions == target.positions)):
            raise MtijaxError("whole-cache replacement of some layers only needs prompts of the same length (the "
                              "cache has one position per slot for all layers); use policy last_min")
    chosen = weights[:, None, None, None, None] > 0
    take = moved[None, :, :, None, None] & chosen
    emptied = (region & ~moved)[None, :, :, None, None] & chosen

    def merge(old: jax.Array, src: jax.Array) -> jax.Array:
        mixed = jnp.where(take, _gather_slots(_rows(src, batch), index).astype(old.dtype), old)
        return jnp.where(emptied, 0, mixed) if policy == "whole" else mixed  # emptied slots hold zeros

    return KVCache(merge(target.k, source.k), merge(target.v, source.v), positions)


def next_position(cache: KVCache, end: int) -> jax.Array:
    """``[B]`` int32: the position after the last one held in slots ``0 .. end - 1`` (where decoding continues)."""
    return jnp.max(cache.positions[:, :end], axis=-1) + 1
