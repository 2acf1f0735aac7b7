"""Quaternion rotation of the hidden state: each group of 4 hidden units is a quaternion ``q``, turned to
``r q r*`` by a unit quaternion ``r`` that depends on the token's content and position.

``r = normalize(p_pos (cos(a/2) + sin(a/2) n))`` with the axis ``n = normalize(W_n h)``, the angle
``a = pi tanh(w_a . h)``, and ``p_pos`` a learned quaternion per position (a table of ``max_positions``
rows initialised near the identity; later positions share the last row). ``r q r*`` keeps each group's
real part and norm and rotates its vector part.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtijax.errors import MtijaxError
from mtijax.fusion import quaternion
from mtijax.fusion.prime import l2_normalize


def position_table_init(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """Rows ``(1, e1, e2, e3)`` with ``e ~ N(0, 0.1^2)``: rotations close to the identity."""
    table = 0.1 * jax.random.normal(key, shape, dtype)
    return table.at[:, 0].set(1.0)


class QuaternionRotation(nn.Module):
    """``x [B, S, D]``, ``positions [B, S]`` -> rotated ``[B, S, D]`` (``D`` a multiple of 4).

    Params: ``axis`` (Dense D -> 3), ``angle`` (Dense D -> 1), ``position_table [max_positions, 4]``.
    """

    max_positions: int = 1000

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        d = x.shape[-1]
        if d % 4:
            raise MtijaxError(f"quaternion rotation needs a hidden size divisible by 4, got {d}")
        axis = l2_normalize(nn.Dense(3, name="axis")(x))
        angle = jnp.pi * jnp.tanh(nn.Dense(1, name="angle")(x)[..., 0])
        table = self.param("position_table", position_table_init, (self.max_positions, 4))
        by_position = quaternion.normalize(table[jnp.clip(positions, 0, self.max_positions - 1)])
        r = quaternion.normalize(quaternion.multiply(by_position, quaternion.from_axis_angle(axis, angle)))
        groups = x.reshape(*x.shape[:-1], d // 4, 4)
        return quaternion.rotate(r[..., None, :], groups).reshape(x.shape)
