"""Quaternion algebra on arrays whose last axis is ``(w, x, y, z)``.

A quaternion ``q = w + x i + y j + z k`` is stored as a length-4 last axis.
Everything broadcasts over the leading axes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

IDENTITY = (1.0, 0.0, 0.0, 0.0)


def _hamilton_table() -> np.ndarray:
    """``T[a, b, c]``: the coefficient of unit ``c`` in the product of units ``a`` and ``b`` (1, i, j, k)."""
    table = np.zeros((4, 4, 4), np.float32)
    for a, b, c, sign in [(0, 0, 0, 1), (0, 1, 1, 1), (0, 2, 2, 1), (0, 3, 3, 1), (1, 0, 1, 1), (1, 1, 0, -1),
                          (1, 2, 3, 1), (1, 3, 2, -1), (2, 0, 2, 1), (2, 1, 3, -1), (2, 2, 0, -1), (2, 3, 1, 1),
                          (3, 0, 3, 1), (3, 1, 2, 1), (3, 2, 1, -1), (3, 3, 0, -1)]:
        table[a, b, c] = sign
    return table


HAMILTON = _hamilton_table()


def multiply(q1: jax.Array, q2: jax.Array) -> jax.Array:
    """The Hamilton product ``q1 q2`` (``i^2 = j^2 = k^2 = ijk = -1``): ``[..., 4]`` (broadcasting)."""
    q1, q2 = jnp.broadcast_arrays(q1, q2)
    outer = q1[..., :, None] * q2[..., None, :]  # [..., 4, 4]
    return jnp.einsum("...ab,abc->...c", outer, jnp.asarray(HAMILTON, outer.dtype))


def conjugate(q: jax.Array) -> jax.Array:
    """``q* = w - x i - y j - z k``."""
    return q * jnp.asarray([1.0, -1.0, -1.0, -1.0], q.dtype)


def safe_norm(x: jax.Array, axis: int | tuple[int, ...] = -1, keepdims: bool = False) -> jax.Array:
    """The L2 norm over ``axis``, with a zero (not NaN) gradient at the zero vector."""
    squares = jnp.sum(jnp.square(x), axis=axis, keepdims=keepdims)
    positive = squares > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, squares, 1.0)), 0.0)


def normalize(q: jax.Array, eps: float = 1e-8) -> jax.Array:
    """``q / (|q| + eps)`` (``eps`` keeps the zero quaternion finite)."""
    return q / (safe_norm(q, keepdims=True) + eps)


def from_axis_angle(axis: jax.Array, angle: jax.Array) -> jax.Array:
    """The unit quaternion ``cos(angle/2) + sin(angle/2) (axis . (i, j, k))`` for a unit ``axis [..., 3]`` and
    ``angle [...]``: the rotation by ``angle`` about ``axis``."""
    half = angle[..., None] / 2
    return jnp.concatenate([jnp.cos(half), jnp.sin(half) * axis], axis=-1)


def rotate(r: jax.Array, q: jax.Array) -> jax.Array:
    """``r q r*``: for a unit ``r`` this rotates the vector part of ``q`` and keeps its real part and norm."""
    return multiply(multiply(r, q), conjugate(r))


def inner(q1: jax.Array, q2: jax.Array) -> jax.Array:
    """The quaternion inner product ``Re(q1* q2)`` (equal to the Euclidean dot product of the 4-vectors): ``[...]``."""
    return multiply(conjugate(q1), q2)[..., 0]
