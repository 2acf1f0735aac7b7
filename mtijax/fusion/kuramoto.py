"""Kuramoto synchronisation: one phase oscillator per token, coupled to the other tokens.

``theta_i(0) = pi tanh(w . h_i + b)``, ``omega_i = w_omega . h_i + b_omega + i / phi`` (``i`` the token's
position, ``phi`` the golden ratio), ``K = K0 sigmoid(s)``, and ``num_steps`` Euler steps of size ``dt`` of

    d theta_i / dt = omega_i + (K / N_i) sum_j sin(theta_j - theta_i)

(the documented, attractive sign; ``sign="original"`` uses ``sin(theta_i - theta_j)``, what the original
code computes, which pushes phases apart). The order parameter is ``r = |mean_j exp(i theta_j)|``
and the layer outputs ``h + sigmoid(beta) r W [cos theta, sin theta]``.

Which tokens couple (``scope``):

- ``causal`` (default): token ``i`` couples to the tokens ``j <= i`` (``N_i`` of them) and its ``r_i`` is
  taken over them, so no token sees a later one. The sum is
  ``Im(exp(-i theta_i) sum_j exp(i theta_j))``, so the whole thing needs only running sums of
  ``cos theta_j`` and ``sin theta_j`` at each Euler step: O(S), and incremental decoding keeps those
  ``num_steps + 1`` sums and the token count per row (:class:`KuramotoCarry`) and gives exactly the
  full-sequence result.
- ``sequence``: the original's coupling of every token of the call to every other one, with one ``r``
  per sequence. A language model trained this way sees later tokens through the phases. In incremental
  decoding each call is its own population: a single new token has no partner (``r = 1``).

Padding tokens (position -1) neither couple nor count. The original also wrapped phases to
``[-pi, pi)`` after each step; only ``cos`` and ``sin`` of the phases are ever read, so that is omitted.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtijax.fusion.quaternion import safe_norm

PHI = (1 + math.sqrt(5)) / 2


class KuramotoCarry(NamedTuple):
    """What causal coupling needs from earlier tokens of each row.

    Attributes:
      cos, sin: ``[B, num_steps + 1]`` sums of ``cos theta_j(t)``, ``sin theta_j(t)`` over the earlier tokens,
        at each Euler step ``t`` (the last entry: the final phases, for ``r``).
      count: ``[B]`` float32 number of earlier (non-padding) tokens.
    """

    cos: jax.Array
    sin: jax.Array
    count: jax.Array

    @classmethod
    def empty(cls, batch: int, num_steps: int) -> "KuramotoCarry":
        zeros = jnp.zeros((batch, num_steps + 1), jnp.float32)
        return cls(zeros, zeros, jnp.zeros((batch,), jnp.float32))


def order_parameter(phases: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """``r = |mean_j exp(i theta_j)|`` over the last axis (only where ``mask``): 1 for equal phases, 0 for pairs
    half a turn apart."""
    weight = jnp.ones_like(phases) if mask is None else mask.astype(phases.dtype)
    n = jnp.maximum(jnp.sum(weight, axis=-1), 1.0)
    mean = jnp.stack([jnp.sum(weight * jnp.cos(phases), -1), jnp.sum(weight * jnp.sin(phases), -1)], -1)
    return safe_norm(mean) / n


def integrate(theta: jax.Array, omega: jax.Array, valid: jax.Array, coupling: jax.Array, *, num_steps: int,
              dt: float, sign: str = "attractive", scope: str = "causal",
              carry: KuramotoCarry | None = None) -> tuple[jax.Array, jax.Array, KuramotoCarry]:
    """Run the Euler steps.

    Args:
      theta, omega: ``[B, S]`` initial phases and natural frequencies. valid: ``[B, S]`` bool, False on padding.
      coupling: ``K`` (scalar). carry: the earlier tokens (causal scope; None means none).
    Returns:
      final phases ``[B, S]``, order parameter ``[B, S]`` (per token for ``causal``, the sequence's
      broadcast for ``sequence``), and the carry including this call's tokens.
    """
    b = theta.shape[0]
    carry = KuramotoCarry.empty(b, num_steps) if carry is None else carry
    weight = valid.astype(theta.dtype)
    direction = 1.0 if sign == "attractive" else -1.0

    def sums(phases, earlier):
        """Sums of cos and sin of the phases of each token's partners, and their number: ``[B, S]`` or ``[B, 1]``."""
        cos, sin = jnp.cos(phases) * weight, jnp.sin(phases) * weight
        if scope == "causal":
            return (earlier[0][:, None] + jnp.cumsum(cos, axis=1), earlier[1][:, None] + jnp.cumsum(sin, axis=1),
                    carry.count[:, None] + jnp.cumsum(weight, axis=1))
        return (jnp.sum(cos, 1, keepdims=True), jnp.sum(sin, 1, keepdims=True), jnp.sum(weight, 1, keepdims=True))

    def euler(phases, earlier):
        cos_sum, sin_sum, n = sums(phases, earlier)
        # sum_j sin(theta_j - theta_i) / N_i
        pull = (jnp.cos(phases) * sin_sum - jnp.sin(phases) * cos_sum) / jnp.maximum(n, 1.0)
        totals = (jnp.sum(jnp.cos(phases) * weight, axis=1), jnp.sum(jnp.sin(phases) * weight, axis=1))
        return phases + dt * (omega + direction * coupling * pull), totals

    theta, (totals_cos, totals_sin) = jax.lax.scan(euler, theta, (carry.cos[:, :num_steps].T,
                                                                  carry.sin[:, :num_steps].T))
    cos_sum, sin_sum, n = sums(theta, (carry.cos[:, num_steps], carry.sin[:, num_steps]))
    order = jnp.broadcast_to(safe_norm(jnp.stack(jnp.broadcast_arrays(cos_sum, sin_sum), -1)) / jnp.maximum(n, 1.0),
                             theta.shape)
    totals_cos = jnp.concatenate([totals_cos.T, jnp.sum(jnp.cos(theta) * weight, axis=1)[:, None]], axis=1)
    totals_sin = jnp.concatenate([totals_sin.T, jnp.sum(jnp.sin(theta) * weight, axis=1)[:, None]], axis=1)
    if scope == "causal":
        carry = KuramotoCarry(carry.cos + totals_cos, carry.sin + totals_sin, carry.count + jnp.sum(weight, axis=1))
    return theta, order, carry


class KuramotoSync(nn.Module):
    """``x [B, S, D] -> (x + sigmoid(beta) r W [cos theta, sin theta], r [B, S], carry)``.

    Params: ``phase``, ``frequency`` (Dense D -> 1), ``coupling_scale`` (init 1), ``blend`` (``beta``),
    ``to_hidden`` (Dense 2 -> D).
    """

    coupling: float = 1.0
    num_steps: int = 5
    dt: float = 0.01
    sign: str = "attractive"
    causal: bool = True
    blend: float = 0.1

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array,
                 carry: KuramotoCarry | None = None) -> tuple[jax.Array, jax.Array, KuramotoCarry]:
        theta = jnp.pi * jnp.tanh(nn.Dense(1, name="phase")(x)[..., 0])
        omega = nn.Dense(1, name="frequency")(x)[..., 0] + positions.astype(x.dtype) / PHI
        scale = self.param("coupling_scale", nn.initializers.constant(1.0), ())
        theta, order, carry = integrate(theta, omega, positions >= 0, self.coupling * jax.nn.sigmoid(scale),
                                        num_steps=self.num_steps, dt=self.dt, sign=self.sign,
                                        scope="causal" if self.causal else "sequence",
                                        carry=carry)
        beta = self.param("blend", nn.initializers.constant(self.blend), ())
        wave = nn.Dense(x.shape[-1], name="to_hidden")(jnp.stack([jnp.cos(theta), jnp.sin(theta)], axis=-1))
        return x + jax.nn.sigmoid(beta) * order[..., None] * wave, order, carry
