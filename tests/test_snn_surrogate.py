"""Surrogate gradients: the forward is the exact step, the backward the documented formula, and a simulation
or the spiking gate keeps its values bit for bit while its spikes gain that gradient."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtijax.errors import MtijaxError
from mtijax.snn import ALIF, GIF, LIF, Network, random_synapses, simulate
from mtijax.snn.gate import SEED_GATE, gate_scan
from mtijax.snn.surrogate import heaviside, make_surrogate

POINTS = jnp.asarray([-math.inf, -3.0, -1 / math.pi, -0.04, -0.0, 0.0, 1e-7, 0.1, 0.5, math.inf], jnp.float32)


@pytest.mark.parametrize("name", ["fast_sigmoid", "arctan"])
def test_forward_is_exactly_the_step(name):
    got = np.asarray(heaviside(POINTS, make_surrogate(name)))
    np.testing.assert_array_equal(got, [0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    assert got.dtype == np.float32


# by hand: fast sigmoid 1 / (1 + k|x|)^2 with k = 25; arctan (k/2) / (1 + (pi/2 k x)^2) with k = 2, so at
# x = -1/pi the denominator is 1 + 1
@pytest.mark.parametrize("name, slope, x, want", [
    ("fast_sigmoid", None, 0.0, 1.0), ("fast_sigmoid", None, 0.1, 1 / 3.5**2), ("fast_sigmoid", None, -0.04, 0.25),
    ("fast_sigmoid", 10.0, 0.5, 1 / 36), ("arctan", None, 0.0, 1.0), ("arctan", None, -1 / math.pi, 0.5),
    ("arctan", None, 0.5, 1 / (1 + (math.pi / 2) ** 2)), ("arctan", 4.0, 0.25, 2 / (1 + (math.pi / 2) ** 2)),
])
def test_gradient_is_the_documented_formula(name, slope, x, want):
    spike = make_surrogate(name, slope)
    assert float(jax.grad(lambda v: heaviside(v, spike))(jnp.float32(x))) == pytest.approx(want, rel=1e-6)


def test_without_a_surrogate_the_step_has_no_gradient():
    assert float(jax.grad(lambda v: heaviside(v))(jnp.float32(0.0))) == 0.0


def test_gradient_only_is_zero_in_value_and_the_surrogate_in_gradient():
    spike = make_surrogate("arctan")
    x = jnp.asarray([-0.3, 0.0, 0.2], jnp.float32)
    np.testing.assert_array_equal(np.asarray(spike.gradient_only(x)), [0, 0, 0])
    np.testing.assert_allclose(np.asarray(jax.vmap(jax.grad(spike.gradient_only))(x)),
                               np.asarray(jax.vmap(jax.grad(spike))(x)), rtol=0)


@pytest.mark.parametrize("units", [GIF(), LIF(), ALIF()], ids=["gif", "lif", "alif"])
def test_a_surrogate_leaves_every_value_of_a_simulation_unchanged(units):
    net = Network(random_synapses(0, 16, 32) * 3, units)
    frames = jax.random.normal(jax.random.key(1), (4, 16), jnp.float32)
    plain = simulate(net, frames, 400)
    assert int(plain.spike_counts.sum()) > 100
    for name in ("fast_sigmoid", "arctan"):
        for a, b in zip(jax.tree.leaves(simulate(net, frames, 400, surrogate=name)), jax.tree.leaves(plain)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_the_population_rate_of_one_tick_differentiates_through_the_surrogate():
    """One LIF tick from rest: ``rate = mean_i H(gain * (e @ W)_i - theta)``, so
    ``d rate / dW[j, i] = gain * e_j * H'(gain * (e @ W)_i - theta) / units``."""
    gain, theta, units = 0.8, 0.3, 12
    w = random_synapses(2, 6, units)
    e = jax.random.normal(jax.random.key(3), (1, 6), jnp.float32)

    def rate(w, surrogate):
        return simulate(Network(w, LIF(gain=gain, threshold=theta)), e, 1, surrogate=surrogate).population_rate[0]

    margin = gain * np.asarray(e @ w)[0] - theta
    assert (margin > 0).any() and (margin < 0).any()
    slope = 25.0
    want = gain * np.asarray(e).T * (1 / (1 + slope * np.abs(margin)) ** 2) / units
    np.testing.assert_allclose(np.asarray(jax.grad(rate)(w, "fast_sigmoid")), want, rtol=1e-5, atol=1e-8)
    assert not np.asarray(jax.grad(rate)(w, None)).any()


def test_the_gate_keeps_its_values_and_differentiates_its_reset():
    """One position from rest with ``g = 4``: ``m = 0.18 * 4 = 0.72``, just under the threshold 0.75, so no
    spike. Then ``d m / d gain = g = 4`` without a surrogate, and with the fast sigmoid (slope 25)
    ``g - threshold * g * (H'(m - 0.75) + H'(-m - 0.75)) = 4 - 3 * (1 / 1.75^2 + 1 / 37.75^2)``."""
    logits = jnp.full((1, 1, 1), 4.0, jnp.float32)
    zeros = jnp.zeros((1, 1), jnp.float32)

    def final(gain, surrogate):
        return gate_scan(logits, {**SEED_GATE, "gain": gain}, zeros, surrogate=surrogate)[1][0, 0]

    assert float(jax.grad(final)(jnp.float32(0.18), None)) == pytest.approx(4.0, rel=1e-6)
    want = 4 - 3 * (1 / 1.75**2 + 1 / 37.75**2)
    assert float(jax.grad(final)(jnp.float32(0.18), "fast_sigmoid")) == pytest.approx(want, rel=1e-5)
    many = jnp.asarray(np.random.default_rng(0).normal(scale=4, size=(2, 50, 6)), jnp.float32)
    for a, b in zip(gate_scan(many, SEED_GATE, jnp.zeros((2, 6)), surrogate="arctan"),
                    gate_scan(many, SEED_GATE, jnp.zeros((2, 6)))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_unknown_surrogates_and_bad_slopes_are_refused():
    with pytest.raises(MtijaxError, match="unknown surrogate 'sigmoid'"):
        make_surrogate("sigmoid")
    with pytest.raises(MtijaxError, match="slope must be a positive number"):
        make_surrogate("arctan", -1.0)
    with pytest.raises(MtijaxError, match="a slope needs a surrogate"):
        make_surrogate(None, 3.0)
