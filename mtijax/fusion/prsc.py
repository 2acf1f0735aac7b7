"""PRSC (prime resonance semantic composition): compose each token's prime quaternions with its predecessor's.

The PRSC has its own prime projection (quaternion amplitudes). Token ``i``'s amplitudes ``q_i [N, 4]`` are
composed prime by prime with the previous token's, ``normalize(q_{i-1} (x) q_i)`` (Hamilton product; the
first token of a sequence, or one after padding, composes with nothing and gets the identity quaternion),
blended ``(1 - sigmoid(c)) q_i + sigmoid(c) composed`` and projected back to the hidden size; the fusion
layer adds ``prsc_weight`` (0.1) times the result. Its coherence is that of the blended amplitudes.

Only the previous token is read, so this is causal. Incremental decoding keeps the last token's
amplitudes per row (:class:`PRSCCarry`) and gives exactly the full-sequence result. (The original also
computes "binding keys" from a projection it never uses; that projection is left out.)
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtijax.fusion import quaternion
from mtijax.fusion.prime import PrimeProjection, describe


class PRSCCarry(NamedTuple):
    """The last token seen per row: ``previous [B, N, 4]`` amplitudes and ``has_previous [B]`` bool."""

    previous: jax.Array
    has_previous: jax.Array

    @classmethod
    def empty(cls, batch: int, num_primes: int) -> "PRSCCarry":
        return cls(jnp.zeros((batch, num_primes, 4), jnp.float32), jnp.zeros((batch,), bool))


class PRSC(nn.Module):
    """``x [B, S, D]``, ``positions [B, S]`` -> ``(back-projection [B, S, D], coherence [B, S], carry)``.

    Params: ``prime`` (a :class:`PrimeProjection`), ``mix`` (``c``), ``back`` (Dense 4N -> D).
    """

    num_primes: int = 25
    mix: float = 0.1

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array,
                 carry: PRSCCarry | None = None) -> tuple[jax.Array, jax.Array, PRSCCarry]:
        b, s, d = x.shape
        carry = PRSCCarry.empty(b, self.num_primes) if carry is None else carry
        q = PrimeProjection(self.num_primes, quaternion=True, name="prime")(x).amplitudes
        valid = positions >= 0
        left = jnp.concatenate([carry.previous[:, None], q[:, :-1]], axis=1)
        left_valid = jnp.concatenate([carry.has_previous[:, None], valid[:, :-1]], axis=1) & valid
        composed = quaternion.normalize(quaternion.multiply(left, q))
        identity = jnp.broadcast_to(jnp.asarray(quaternion.IDENTITY, q.dtype), q.shape)
        composed = jnp.where(left_valid[..., None, None], composed, identity)
        weight = jax.nn.sigmoid(self.param("mix", nn.initializers.constant(self.mix), ()))
        blended = (1 - weight) * q + weight * composed
        back = nn.Dense(d, kernel_init=nn.initializers.variance_scaling(0.25, "fan_avg", "uniform"),
                        name="back")(blended.reshape(b, s, -1))
        last_valid = valid[:, -1]
        carry = PRSCCarry(jnp.where(last_valid[:, None, None], q[:, -1], carry.previous),
                          carry.has_previous | last_valid)
        return back, describe(blended).coherence, carry
