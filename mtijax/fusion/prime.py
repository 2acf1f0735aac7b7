"""Prime projection: a hidden state read as one amplitude per prime, and the entropy of that distribution.

For the first ``N`` primes ``p``, a linear map sends ``h [D]`` to ``N`` amplitudes of ``A`` components
(``A = 4``: one quaternion per prime; ``A = 2``: one complex number). A learnable phase ``theta_p``
rotates each amplitude (quaternion: the ``(w, i)`` pair by ``theta_p / 2``; complex: by ``theta_p``),
each is scaled by ``w_p = 1 / (1 + ln p - ln 2)``, and the whole ``N A`` vector is L2-normalised per
token. ``P_p = |q_p|^2 / sum |q|^2``, the entropy is ``H = -sum P log2 P`` (bits) and the coherence
``C = clamp(1 - H / log2 N, 0, 1)``: 0 for a uniform distribution over the primes, 1 for a single prime.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mtijax.fusion.quaternion import safe_norm


def first_primes(n: int) -> np.ndarray:
    """The first ``n`` primes, ``[n]`` int64."""
    primes: list[int] = []
    candidate = 2
    while len(primes) < n:
        if all(candidate % p for p in primes if p * p <= candidate):
            primes.append(candidate)
        candidate += 1
    return np.asarray(primes, np.int64)


def prime_weights(n: int) -> np.ndarray:
    """``w_p = 1 / (1 + ln p - ln 2)`` for the first ``n`` primes: ``[n]`` float32 (1 for p = 2, decreasing)."""
    logs = np.log(first_primes(n).astype(np.float64))
    return (1.0 / (1.0 + logs - logs.min())).astype(np.float32)


def rotate_phases(amplitudes: jax.Array, phases: jax.Array) -> jax.Array:
    """Rotate each prime's amplitude by its phase: ``amplitudes [..., N, A]``, ``phases [N]``.

    ``A = 4``: the ``(w, i)`` pair turns by ``theta / 2``, ``(j, k)`` are kept. ``A = 2``: the complex number
    turns by ``theta``.
    """
    angle = phases / 2 if amplitudes.shape[-1] == 4 else phases
    cos, sin = jnp.cos(angle)[:, None], jnp.sin(angle)[:, None]
    w, i = amplitudes[..., 0:1], amplitudes[..., 1:2]
    turned = jnp.concatenate([cos * w - sin * i, sin * w + cos * i], axis=-1)
    return jnp.concatenate([turned, amplitudes[..., 2:]], axis=-1)


def prime_distribution(amplitudes: jax.Array) -> jax.Array:
    """``P_p = |q_p|^2 / sum_p |q_p|^2`` over the prime axis: ``[..., N, A] -> [..., N]`` (uniform if all are 0)."""
    mass = jnp.sum(jnp.square(amplitudes), axis=-1)
    total = jnp.sum(mass, axis=-1, keepdims=True)
    n = mass.shape[-1]
    return jnp.where(total > 0, mass / jnp.where(total > 0, total, 1.0), 1.0 / n)


def entropy_bits(p: jax.Array) -> jax.Array:
    """Shannon entropy ``-sum p log2 p`` over the last axis, with ``0 log 0 = 0`` (and a finite gradient there)."""
    safe = jnp.where(p > 0, p, 1.0)
    return -jnp.sum(jnp.where(p > 0, p * jnp.log2(safe), 0.0), axis=-1)


def coherence(entropy: jax.Array, num_primes: int) -> jax.Array:
    """``C = clamp(1 - H / log2 N, 0, 1)`` (1 when there is a single prime)."""
    if num_primes == 1:
        return jnp.ones_like(entropy)
    return jnp.clip(1.0 - entropy / np.log2(num_primes), 0.0, 1.0)


class PrimeStates(NamedTuple):
    """A prime projection of ``[B, S, D]`` hidden states.

    Attributes:
      amplitudes: ``[B, S, N, A]``, unit L2 norm over ``(N, A)`` per token.
      entropy: ``[B, S]`` bits. coherence: ``[B, S]`` in [0, 1].
    """

    amplitudes: jax.Array
    entropy: jax.Array
    coherence: jax.Array


def describe(amplitudes: jax.Array) -> PrimeStates:
    """Entropy and coherence of ``amplitudes [..., N, A]``."""
    h = entropy_bits(prime_distribution(amplitudes))
    return PrimeStates(amplitudes, h, coherence(h, amplitudes.shape[-2]))


def l2_normalize(x: jax.Array, axis: tuple[int, ...] | int = -1, eps: float = 1e-12) -> jax.Array:
    """``x / max(|x|, eps)`` over ``axis`` (PyTorch's ``F.normalize``)."""
    return x / jnp.maximum(safe_norm(x, axis, keepdims=True), eps)


class PrimeProjection(nn.Module):
    """``h [B, S, D] -> PrimeStates``; params ``proj/{kernel [D, N A], bias}`` and ``phases [N]``.

    The kernel starts as Xavier-uniform with gain 0.5 and the phases at 0, as in the original.
    """

    num_primes: int = 25
    quaternion: bool = True
    learnable_phases: bool = True

    @nn.compact
    def __call__(self, h: jax.Array) -> PrimeStates:
        n, a = self.num_primes, 4 if self.quaternion else 2
        flat = nn.Dense(n * a, kernel_init=nn.initializers.variance_scaling(0.25, "fan_avg", "uniform"),
                        name="proj")(h)
        amplitudes = flat.reshape(*h.shape[:-1], n, a)
        if self.learnable_phases:
            amplitudes = rotate_phases(amplitudes, self.param("phases", nn.initializers.zeros, (n,)))
        amplitudes = amplitudes * jnp.asarray(prime_weights(n))[:, None]
        return describe(l2_normalize(amplitudes, axis=(-2, -1)))
