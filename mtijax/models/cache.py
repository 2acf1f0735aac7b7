"""The KV cache: a plain pytree of keys, values and the position of every slot.

Slots hold tokens at the positions in ``positions``; ``-1`` marks an empty
slot (never written, or left padding). Attention masks are built from these
positions, never from slot indices, so left-padded batches and any future
slot layout stay correct.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class KVCache(NamedTuple):
    """Keys and values of every layer.

    Attributes:
      k: ``[L, B, T, K, H]`` keys, already normed and rotated (RoPE applied).
      v: ``[L, B, T, K, H]`` values.
      positions: ``[B, T]`` int32 token position held by each slot, -1 if empty.
    """

    k: jax.Array
    v: jax.Array
    positions: jax.Array

    @property
    def length(self) -> int:
        """Number of slots T."""
        return self.positions.shape[1]


def init_cache(num_layers: int, batch: int, length: int, num_kv_heads: int, head_dim: int,
               dtype: jnp.dtype = jnp.float32) -> KVCache:
    """An empty cache of ``length`` slots."""
    shape = (num_layers, batch, length, num_kv_heads, head_dim)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.full((batch, length), -1, jnp.int32))


def write(cache: KVCache, k_new: jax.Array, v_new: jax.Array, positions: jax.Array, index: jax.Array) -> KVCache:
    """Write ``S`` new entries at slots ``index .. index + S - 1``.

    Args:
      k_new, v_new: ``[L, B, S, K, H]``. positions: ``[B, S]``. index: int32 scalar.
    """
    zero = jnp.zeros((), jnp.int32)
    index = jnp.asarray(index, jnp.int32)
    start = (zero, zero, index, zero, zero)
    return KVCache(
        jax.lax.dynamic_update_slice(cache.k, k_new.astype(cache.k.dtype), start),
        jax.lax.dynamic_update_slice(cache.v, v_new.astype(cache.v.dtype), start),
        jax.lax.dynamic_update_slice(cache.positions, positions.astype(jnp.int32), (zero, index)),
    )
