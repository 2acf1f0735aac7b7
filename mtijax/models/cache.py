"""The KV cache: a plain pytree of keys, values and the position of every slot.

Slots hold tokens at the positions in ``positions``; ``-1`` marks an empty
slot (never written, or left padding). Attention masks are built from these
positions, never from slot indices, so left-padded batches and the rolling
layout below stay correct.

**Rolling layout.** When a cache is longer than the window of its sliding layers (:func:`rolling_window`),
:func:`init_cache` gives those layers a ring of ``window`` slots (``KVCache.ring``): slot ``i`` of the cache
is ring slot ``i % window``, so a sliding layer keeps exactly the tokens its queries may still see, and a
decode step reads ``window`` slots there instead of ``T``. The full-attention layers keep every slot.
``positions`` always records all ``T`` slots.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class KVCache(NamedTuple):
    """Keys and values of every layer.

    Attributes:
      k: ``[L, B, T, K, H]`` keys, already normed and rotated (RoPE applied); with a ``ring``, only the
        full-attention layers' (``[L_full, ...]``, in layer order).
      v: values, as ``k``.
      positions: ``[B, T]`` int32 token position held by each slot, -1 if empty.
      ring: None, or the sliding layers' rolling cache: a ``KVCache`` with ``k, v [L_sliding, B, W, K, H]`` (in
        layer order) and ``positions [B, W]``, ring slot ``i % W`` holding cache slot ``i``.
    """

    k: jax.Array
    v: jax.Array
    positions: jax.Array
    ring: "KVCache | None" = None

    @property
    def length(self) -> int:
        """Number of slots T."""
        return self.positions.shape[1]


def rolling_window(windows: np.ndarray, length: int) -> int | None:
    """The ring size for a cache of ``length`` slots over layers with attention ``windows [L]`` (a layer's
    ``layer_spec`` window; ``NO_WINDOW`` or more on full-attention layers): the sliding layers' one window
    when it is shorter than ``length``, else None (no ring: every layer keeps all slots)."""
    sliding = set(int(w) for w in np.asarray(windows) if w < length)
    return sliding.pop() if len(sliding) == 1 else None


def init_cache(num_layers: int, batch: int, length: int, num_kv_heads: int, head_dim: int,
               dtype: jnp.dtype = jnp.float32, windows: np.ndarray | tuple[int, ...] | None = None) -> KVCache:
    """An empty cache of ``length`` slots; with the layers' ``windows [L]``, in the rolling layout when
    :func:`rolling_window` gives a ring size."""
    window = None if windows is None else rolling_window(windows, length)
    if window is None:
        shape = (num_layers, batch, length, num_kv_heads, head_dim)
        return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.full((batch, length), -1, jnp.int32))
    sliding = int((np.asarray(windows) == window).sum())
    full = init_cache(num_layers - sliding, batch, length, num_kv_heads, head_dim, dtype)
    return full._replace(ring=init_cache(sliding, batch, window, num_kv_heads, head_dim, dtype))


def sliding_layers(cache: KVCache, windows: np.ndarray) -> np.ndarray:
    """``[L]`` bool: which layers live in ``cache.ring`` (none without one)."""
    windows = np.asarray(windows)
    if cache.ring is None:
        return np.zeros(windows.shape, bool)
    return windows == cache.ring.length


def layer_slot(sliding: np.ndarray, layer: int) -> tuple[bool, int]:
    """Where layer ``layer`` keeps its keys: ``(in the ring, its index in the ring's or the full part's stack)``."""
    in_ring = bool(sliding[layer])
    return in_ring, int((sliding[:layer] == in_ring).sum())


def write(cache: KVCache, k_new: jax.Array, v_new: jax.Array, positions: jax.Array, index: jax.Array,
          sliding: np.ndarray | None = None) -> KVCache:
    """Write ``S`` new entries at slots ``index .. index + S - 1``, modulo the cache's ``T`` slots (an engine
    request's decode slots wrap into its left padding: ``mtijax.engine.request``).

    Args:
      k_new, v_new: ``[L, B, S, K, H]`` (every layer, in order). positions: ``[B, S]``. index: int32 scalar.
      sliding: ``[L]`` bool, the layers of ``cache.ring`` (:func:`sliding_layers`); needed with a ring.
    """
    if cache.ring is not None:
        ring_layers, full_layers = np.flatnonzero(sliding), np.flatnonzero(~sliding)
        full = write(cache._replace(ring=None), k_new[full_layers], v_new[full_layers], positions, index)
        return full._replace(ring=_write_ring(cache.ring, k_new[ring_layers], v_new[ring_layers], positions, index))
    zero = jnp.zeros((), jnp.int32)
    index = jnp.asarray(index, jnp.int32) % cache.length
    start = (zero, zero, index, zero, zero)
    return KVCache(
        jax.lax.dynamic_update_slice(cache.k, k_new.astype(cache.k.dtype), start),
        jax.lax.dynamic_update_slice(cache.v, v_new.astype(cache.v.dtype), start),
        jax.lax.dynamic_update_slice(cache.positions, positions.astype(jnp.int32), (zero, index)),
    )


def _write_ring(ring: KVCache, k_new: jax.Array, v_new: jax.Array, positions: jax.Array,
                index: jax.Array) -> KVCache:
    """Cache slots ``index .. index + S - 1`` written at ring slots ``(index + s) % W``; of more than ``W``
    new entries only the last ``W`` are kept (the earlier ones would be overwritten within this write)."""
    s, w = k_new.shape[2], ring.length
    keep = min(s, w)
    k_new, v_new, positions = k_new[:, :, s - keep:], v_new[:, :, s - keep:], positions[:, s - keep:]
    first = (jnp.asarray(index, jnp.int32) + (s - keep)) % w
    if keep == 1:  # a decode step: one slot, updated in place
        return write(ring, k_new, v_new, positions, first)
    slots = (first + jnp.arange(keep, dtype=jnp.int32)) % w
    return KVCache(ring.k.at[:, :, slots].set(k_new.astype(ring.k.dtype)),
                   ring.v.at[:, :, slots].set(v_new.astype(ring.v.dtype)),
                   ring.positions.at[:, slots].set(positions.astype(jnp.int32)))
