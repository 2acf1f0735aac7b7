"""Spiking unit models: one tick of a population of units, as pure float32 functions of a params pytree.

Each model is a pytree dataclass of its constants whose :meth:`step` advances
every unit by one tick. All models share one state, :class:`UnitState`
(membrane ``v``, adaptation ``a``, refractory ticks left ``r``, each
``[units]``), so a network can swap models without changing its scan.

* :class:`GIF` is the seed's unit (corinth-canal's "walker"): a generalised
  integrate-and-fire unit with fatigue ``a`` that lowers the drive and raises
  the threshold, reset by subtraction, and a refractory period.
* :class:`LIF` is the leaky integrate-and-fire unit of the standard SNN
  libraries with reset by subtraction.
* :class:`ALIF` adds an adaptive threshold ``theta + kappa * T`` with
  ``T <- gamma * T + (1 - gamma) * s`` (Bellec et al. 2018's ALIF).

Every model spikes on the tick its membrane crosses the threshold (``v >=
theta``) and reads out the membrane after that tick's reset. snnTorch's
``Leaky`` and spyx's ``LIF`` instead decide the spike from the membrane
*before* the update, so their spikes come one tick later; the dynamics are
otherwise the same.

Each step also returns a read-out *score* per unit; the network's "best unit"
of a tick is the argmax of the scores (ties to the lower index).

**Surrogate gradients.** A step given a :class:`~mtijax.snn.surrogate.Surrogate`
computes exactly the same values (bit for bit) but differentiates every use
of a spike ``s = H(v - theta)`` (the reset, the adaptation, the spike train)
with the surrogate's derivative, as snnTorch and spyx do (the reset is not
detached). Without one, the spikes have gradient 0 and gradients flow only
through the membranes.

Arithmetic is float32 in the order each docstring writes it, except that XLA
(CPU and GPU) contracts some ``x * c + y`` into one fused multiply-add, which
rounds once instead of twice. A membrane can therefore differ from an unfused
float32 evaluation in its last bits (the tests check spikes and winners tick
for tick against an independent NumPy loop, and states to 1e-6).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import struct

from mtijax.snn.surrogate import Surrogate


class UnitState(NamedTuple):
    """The state of a population of ``units`` (any leading batch axes allowed).

    Attributes:
      v: membrane potential ``[units]`` float32.
      a: adaptation ``[units]`` float32: the GIF's fatigue, the ALIF's threshold trace ``T``; 0 for the LIF.
      r: refractory ticks left ``[units]`` int32 (only the GIF has a refractory period).
    """

    v: jax.Array
    a: jax.Array
    r: jax.Array


class Step(NamedTuple):
    """What one tick produces besides the new state: ``spikes [units]`` float32 (exactly 0 or 1; carrying the
    surrogate gradient when there is one) and read-out ``score [units]``."""

    spikes: jax.Array
    score: jax.Array


def initial_state(units: int) -> UnitState:
    """All units at rest: ``v = a = 0``, not refractory."""
    zeros = jnp.zeros((units,), jnp.float32)
    return UnitState(zeros, zeros, jnp.zeros((units,), jnp.int32))


def _f32(x) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


def _spike_gradient(surrogate: Surrogate | None, margin: jax.Array) -> jax.Array | None:
    """Zero in value, ``dH(margin)`` in gradient (None without a surrogate)."""
    return None if surrogate is None else surrogate.gradient_only(margin)


@struct.dataclass
class GIF:
    """The seed's generalised integrate-and-fire unit with fatigue (the reference model).

    Per tick, with input current ``I = sum_j W_ij e_j``:

    * refractory (``r > 0``): ``v = 0``, ``a <- fatigue_decay * a``, ``r <- r - 1``;
    * otherwise ``a <- fatigue_decay * a``,
      ``v <- leak * v + gain * I - fatigue_drive * a``,
      ``theta = threshold + fatigue_threshold * a``; if ``v >= theta``: ``v <- v - reset_fraction * theta``,
      ``a <- a + 1`` and the unit is refractory for the next ``refractory_ticks`` ticks.

    The score is ``v - readout_fatigue * a`` (after the tick's update). The
    defaults are corinth-canal's constants.
    """

    leak: float = 0.92
    gain: float = 0.75
    fatigue_drive: float = 0.05
    fatigue_decay: float = 0.94
    threshold: float = 0.65
    fatigue_threshold: float = 0.22
    reset_fraction: float = 0.35
    refractory_ticks: int = 2
    readout_fatigue: float = 0.22

    def step(self, state: UnitState, current: jax.Array,
             surrogate: Surrogate | None = None) -> tuple[UnitState, Step]:
        """One tick for ``current [units]`` float32 (``surrogate``: see the module docstring)."""
        refractory = state.r > 0
        a = _f32(self.fatigue_decay) * state.a
        v = _f32(self.leak) * state.v + _f32(self.gain) * current - _f32(self.fatigue_drive) * a
        theta = _f32(self.threshold) + _f32(self.fatigue_threshold) * a
        spikes = ~refractory & (v >= theta)
        ds = _spike_gradient(surrogate, v - theta)
        new_v = jnp.where(refractory, jnp.float32(0), jnp.where(spikes, v - _f32(self.reset_fraction) * theta, v))
        a = jnp.where(spikes, a + jnp.float32(1), a)
        s = spikes.astype(jnp.float32)
        if ds is not None:
            ds = jnp.where(refractory, jnp.float32(0), ds)
            new_v = new_v - ds * _f32(self.reset_fraction) * theta  # own product: sharing the branch's changes its FMA
            a, s = a + ds, s + ds
        r = jnp.where(spikes, jnp.asarray(self.refractory_ticks, jnp.int32), jnp.maximum(state.r - 1, 0))
        return UnitState(new_v, a, r), Step(s, new_v - _f32(self.readout_fatigue) * a)


@struct.dataclass
class LIF:
    """Leaky integrate-and-fire with reset by subtraction.

    ``v <- leak * v + gain * I``; spike when ``v >= threshold``, then ``v <- v - threshold``.
    The score is ``v``; there is no adaptation and no refractory period.
    """

    leak: float = 0.9
    gain: float = 1.0
    threshold: float = 1.0

    def step(self, state: UnitState, current: jax.Array,
             surrogate: Surrogate | None = None) -> tuple[UnitState, Step]:
        """One tick for ``current [units]`` float32 (``surrogate``: see the module docstring)."""
        v = _f32(self.leak) * state.v + _f32(self.gain) * current
        theta = _f32(self.threshold)
        spikes = v >= theta
        ds = _spike_gradient(surrogate, v - theta)
        new_v = jnp.where(spikes, v - theta, v)
        s = spikes.astype(jnp.float32)
        if ds is not None:
            new_v, s = new_v - theta * ds, s + ds
        return UnitState(new_v, state.a, state.r), Step(s, new_v)


@struct.dataclass
class ALIF:
    """Adaptive leaky integrate-and-fire: the threshold rises with recent spiking.

    ``v <- leak * v + gain * I``; ``theta = threshold + adaptation * T``; spike
    when ``v >= theta``, then ``v <- v - theta``; ``T <- trace_decay * T +
    (1 - trace_decay) * s``. The score is ``v - adaptation * T`` (the margin
    to the threshold, up to the constant ``threshold``).
    """

    leak: float = 0.9
    gain: float = 1.0
    threshold: float = 1.0
    adaptation: float = 1.0
    trace_decay: float = 0.95

    def step(self, state: UnitState, current: jax.Array,
             surrogate: Surrogate | None = None) -> tuple[UnitState, Step]:
        """One tick for ``current [units]`` float32 (``surrogate``: see the module docstring)."""
        v = _f32(self.leak) * state.v + _f32(self.gain) * current
        theta = _f32(self.threshold) + _f32(self.adaptation) * state.a
        spikes = v >= theta
        ds = _spike_gradient(surrogate, v - theta)
        new_v = jnp.where(spikes, v - theta, v)
        s = spikes.astype(jnp.float32)
        if ds is not None:
            new_v, s = new_v - theta * ds, s + ds
        decay = _f32(self.trace_decay)
        a = decay * state.a + (jnp.float32(1) - decay) * s
        return UnitState(new_v, a, state.r), Step(s, new_v - _f32(self.adaptation) * a)


UnitModel = GIF | LIF | ALIF
"""Any unit model."""

UNIT_MODELS: dict[str, type] = {"gif": GIF, "lif": LIF, "alif": ALIF}
"""Unit models by the name the CLI uses."""
