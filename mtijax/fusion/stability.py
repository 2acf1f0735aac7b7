"""Stability monitoring of generation from the fusion layers' metrics, and the temperature it suggests.

Per generated token ``t`` (the token just fed to the model), with ``S_t`` its prime entropy and ``C_t``
its gate coherence, each averaged over the fused layers:

- Lyapunov estimate ``lambda_t = 0.9 lambda_{t-1} + 0.1 (S_t - S_{t-1})`` (``lambda_0 = 0``);
- stable when ``lambda_t < 0.1`` and ``C_t > 0.2``;
- suggested temperature ``0.7 + 0.3 C_t`` when stable, else ``max(0.3, 0.7 - lambda_t)``, clamped to
  [0.3, 1.5]; the temperature used is ``0.7 T_{t-1} + 0.3 suggested`` (``T_{-1}`` the requested
  temperature), clamped to [0.3, 1.5];
- diverging when ``lambda_t > 0.1``: with ``stop_on_instability`` the row stops there (the original's
  criterion; low coherence alone lowers the temperature but does not stop generation).

Without a prime projection ``S_t = 0``; without a gate ``C_t`` is the prime coherence, else 0.5 (as the
original).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, NamedTuple

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class StabilityConfig:
    """The thresholds and temperature range of :func:`update`."""

    lyapunov_threshold: float = 0.1
    coherence_threshold: float = 0.2
    min_temperature: float = 0.3
    max_temperature: float = 1.5
    smoothing: float = 0.7
    decay: float = 0.9


class StabilityState(NamedTuple):
    """Per row ``[B]``: the previous entropy, the Lyapunov estimate, the temperature and the steps seen."""

    entropy: jax.Array
    lyapunov: jax.Array
    temperature: jax.Array
    steps: jax.Array

    @classmethod
    def start(cls, batch: int, temperature: float | jax.Array) -> "StabilityState":
        zeros = jnp.zeros((batch,), jnp.float32)
        return cls(zeros, zeros, jnp.full((batch,), temperature, jnp.float32), jnp.zeros((batch,), jnp.int32))


class StabilityStep(NamedTuple):
    """One step's reading, ``[B]`` each: entropy ``S_t``, coherence ``C_t``, Kuramoto order ``r_t`` (0 without
    Kuramoto), ``lyapunov``, ``stable``, ``diverging`` and the ``temperature`` it leads to."""

    entropy: jax.Array
    coherence: jax.Array
    kuramoto_order: jax.Array
    lyapunov: jax.Array
    stable: jax.Array
    diverging: jax.Array
    temperature: jax.Array


def token_readings(metrics: Mapping[int, Mapping[str, jax.Array]], batch: int,
                   index: int = -1) -> tuple[jax.Array, ...]:
    """``(S, C, r)`` ``[B]`` of token ``index`` of each row, averaged over the fused layers that report them."""
    def mean(name: str):
        values = [m[name][:, index] for m in metrics.values() if name in m]
        return jnp.mean(jnp.stack(values), axis=0) if values else None

    entropy = mean("prime_entropy")
    coherence = mean("gate_coherence")
    coherence = mean("prime_coherence") if coherence is None else coherence
    order = mean("kuramoto_order")
    fill = lambda value, default: jnp.full((batch,), default, jnp.float32) if value is None else value
    return fill(entropy, 0.0), fill(coherence, 0.5), fill(order, 0.0)


def update(state: StabilityState, entropy: jax.Array, coherence: jax.Array, order: jax.Array,
           config: StabilityConfig = StabilityConfig()) -> tuple[StabilityState, StabilityStep]:
    """Fold one step's ``S_t``, ``C_t`` (and ``r_t``, reported only) into the state."""
    seen = state.steps > 0
    lyapunov = jnp.where(seen, config.decay * state.lyapunov + (1 - config.decay) * (entropy - state.entropy), 0.0)
    stable = (lyapunov < config.lyapunov_threshold) & (coherence > config.coherence_threshold)
    suggested = jnp.where(stable, 0.7 + 0.3 * coherence, jnp.maximum(config.min_temperature, 0.7 - lyapunov))
    suggested = jnp.clip(suggested, config.min_temperature, config.max_temperature)
    temperature = jnp.clip(config.smoothing * state.temperature + (1 - config.smoothing) * suggested,
                           config.min_temperature, config.max_temperature)
    new = StabilityState(entropy, lyapunov, temperature, state.steps + 1)
    return new, StabilityStep(entropy, coherence, order, lyapunov, stable, lyapunov > config.lyapunov_threshold,
                              temperature)
