"""Quaternion attention, as the original's README documents it (a standalone module, not part of a fusion layer).

Each head's queries and keys are read as quaternions (groups of 4 of its ``head_dim`` units), the score of
query ``i`` and key ``j`` is the quaternion inner product ``sum_groups Re(q_i* k_j) / sqrt(head_dim)``, and
with ``golden_ratio_heads`` head ``h``'s keys are first rotated, ``k -> r_h k r_h*``, about its own axis
``(cos(h pi / phi), sin(h pi / phi), 0)`` by a learned angle (initialised to a quarter turn).

What this is and is not: ``Re(q* k)`` equals the Euclidean dot product of the two 4-vectors, so without the
head rotations this *is* ordinary dot-product attention. The original's ``QuaternionAttention`` computed
exactly that and built its golden-ratio axes without ever using them; here they are applied. A fixed rotation
of the keys could be folded into the key projection, so the rotations change the layer's geometry at
initialisation and give each head one extra learned angle; they do not make it more expressive.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtijax.errors import MtijaxError
from mtijax.fusion import quaternion
from mtijax.fusion.kuramoto import PHI


def head_axes(num_heads: int) -> jax.Array:
    """The golden-ratio-spaced unit axes ``(cos(h pi / phi), sin(h pi / phi), 0)``: ``[num_heads, 3]``."""
    angles = jnp.arange(num_heads, dtype=jnp.float32) * jnp.pi / PHI
    return jnp.stack([jnp.cos(angles), jnp.sin(angles), jnp.zeros_like(angles)], axis=-1)


class QuaternionAttention(nn.Module):
    """Self-attention ``x [B, S, D] -> (out [B, S, D], weights [B, heads, S, S])``.

    ``positions [B, S]`` (default ``0..S-1``) mask padding (position -1) and, with ``causal``, later tokens.
    Params: ``query``, ``key``, ``value``, ``out`` (Dense D -> D) and ``head_angles [heads]``.
    """

    num_heads: int = 4
    golden_ratio_heads: bool = True
    causal: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        b, s, d = x.shape
        if d % (4 * self.num_heads):
            raise MtijaxError(f"quaternion attention needs a hidden size divisible by 4 x {self.num_heads} heads, "
                              f"got {d}")
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(s), (b, s))
        head_dim = d // self.num_heads
        split = lambda t: t.reshape(b, s, self.num_heads, head_dim // 4, 4)
        q, k = split(nn.Dense(d, name="query")(x)), split(nn.Dense(d, name="key")(x))
        v = nn.Dense(d, name="value")(x).reshape(b, s, self.num_heads, head_dim)
        if self.golden_ratio_heads:
            angles = self.param("head_angles", nn.initializers.constant(jnp.pi / 2), (self.num_heads,))
            r = quaternion.from_axis_angle(head_axes(self.num_heads), angles)  # [heads, 4]
            k = quaternion.rotate(r[:, None, :], k)
        scores = jnp.einsum("bihqc,bjhqc->bhij", q, k) / math.sqrt(head_dim)  # sum of Re(q* k) over groups
        allowed = (positions[:, None, None, :] >= 0)
        if self.causal:
            allowed = allowed & (positions[:, None, None, :] <= positions[:, None, :, None])
        scores = jnp.where(allowed, scores, jnp.finfo(scores.dtype).min)
        weights = jax.nn.softmax(scores, axis=-1)
        weights = jnp.where(allowed.any(-1, keepdims=True), weights, 0.0)
        out = jnp.einsum("bhij,bjhd->bihd", weights, v).reshape(b, s, d)
        return nn.Dense(d, name="out")(out), weights
