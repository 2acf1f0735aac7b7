"""``simulate`` and ``simulate_batch`` as JAX transforms: ``jit`` equals eager, ``vmap`` equals a Python loop
of single calls (over frames, synapses and unit constants), and ``grad`` equals a hand-derived case and
central finite differences."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtijax.errors import MtijaxError
from mtijax.snn import GIF, LIF, Network, Routing, random_synapses, simulate, simulate_batch

WIDTH, UNITS, TICKS = 8, 16, 60


@pytest.fixture(scope="module")
def synapses() -> jax.Array:
    """Strong enough that a unit-scale frame makes the GIF units spike."""
    return random_synapses(0, WIDTH, UNITS) * 4


def frames(seed: int, count: int = 3) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (count, WIDTH), jnp.float32)


def assert_same(got: Routing, want: Routing) -> None:
    """Every field equal, bit for bit."""
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def assert_close(got: Routing, want: Routing) -> None:
    """Integer and boolean fields equal; float fields within float32 rounding (a batch of other shapes is
    another XLA program, whose vectorised sums may round in another order)."""
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        if np.issubdtype(a.dtype, np.floating):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        else:
            np.testing.assert_array_equal(a, b)


def item(batched: Routing, index: int) -> Routing:
    return jax.tree.map(lambda x: x[index], batched)


def test_jit_equals_eager(synapses):
    f = frames(1)
    eager = simulate(Network(synapses), f, TICKS)
    assert int(eager.spike_counts.sum()) > 20  # a regime with spikes, resets and refractory ticks
    assert_same(jax.jit(lambda w, x: simulate(Network(w), x, TICKS))(synapses, f), eager)


def test_vmap_over_frames_is_a_loop_of_single_calls(synapses):
    drivers = jnp.stack([frames(s) for s in (2, 3, 4)])
    batched = jax.vmap(lambda x: simulate(Network(synapses), x, TICKS))(drivers)
    for i in range(3):
        assert_close(item(batched, i), simulate(Network(synapses), drivers[i], TICKS))
    assert len({tuple(np.asarray(batched.best_unit[i])) for i in range(3)}) == 3


def test_vmap_over_synapses_is_a_loop_of_single_calls(synapses):
    stacked = jnp.stack([synapses, synapses * 0.5, random_synapses(7, WIDTH, UNITS) * 4])
    f = frames(5)
    batched = jax.jit(jax.vmap(lambda w: simulate(Network(w), f, TICKS)))(stacked)
    for i in range(3):
        assert_close(item(batched, i), simulate(Network(stacked[i]), f, TICKS))


@pytest.mark.parametrize("make", [lambda c: GIF(threshold=c), lambda c: LIF(leak=c)], ids=["gif_threshold", "lif_leak"])
def test_vmap_over_unit_constants_is_a_loop_of_single_calls(synapses, make):
    constants = jnp.asarray([0.5, 0.65, 0.9], jnp.float32)
    f = frames(6)
    batched = jax.vmap(lambda c: simulate(Network(synapses, make(c)), f, TICKS))(constants)
    for i, c in enumerate([0.5, 0.65, 0.9]):
        assert_close(item(batched, i), simulate(Network(synapses, make(c)), f, TICKS))
    assert len({int(batched.spike_counts[i].sum()) for i in range(3)}) == 3


def test_simulate_batch_under_jit_with_traced_counts_equals_eager(synapses):
    drivers = jnp.stack([frames(8), frames(9)])
    counts = jnp.asarray([3, 1], jnp.int32)
    eager = simulate_batch(Network(synapses), drivers, TICKS, counts)
    assert_same(jax.jit(lambda w, x, n: simulate_batch(Network(w), x, TICKS, n))(synapses, drivers, counts), eager)
    assert_close(item(eager, 1), simulate(Network(synapses), drivers[1, :1], TICKS))


def test_simulate_batch_under_vmap_over_synapses(synapses):
    stacked = jnp.stack([synapses, synapses * 0.7])
    drivers = jnp.stack([frames(10), frames(11)])
    batched = jax.vmap(lambda w: simulate_batch(Network(w), drivers, TICKS))(stacked)
    for i in range(2):
        assert_close(item(batched, i), simulate_batch(Network(stacked[i]), drivers, TICKS))


def test_the_float32_check_still_refuses_traced_float16(synapses):
    with pytest.raises(MtijaxError, match="float16, not float32"):
        jax.jit(lambda x: simulate(Network(synapses), x, TICKS))(frames(1).astype(jnp.float16))


def test_grad_wrt_synapses_of_a_leaky_integrator_by_hand():
    """Below threshold a LIF unit is linear: from rest, ``v_T = gain * (e @ W) * sum_k leak^k`` (k < T),
    so ``d sum(v_T) / dW[j, i] = gain * e_j * (1 - leak^T) / (1 - leak)``."""
    leak, gain, ticks = 0.9, 0.5, 40
    units = LIF(leak=leak, gain=gain, threshold=1e6)
    w = random_synapses(1, WIDTH, UNITS)
    e = frames(12, count=1)

    def loss(w):
        return jnp.sum(simulate(Network(w, units), e, ticks).final.v)

    assert int(simulate(Network(w, units), e, ticks).spike_counts.sum()) == 0
    want = gain * (1 - leak**ticks) / (1 - leak) * np.repeat(np.asarray(e).T, UNITS, axis=1)
    np.testing.assert_allclose(np.asarray(jax.grad(loss)(w)), want, rtol=1e-5)


def central_difference(loss, x: jax.Array, direction: jax.Array, eps: float) -> float:
    return float((loss(x + eps * direction) - loss(x - eps * direction)) / (2 * eps))


@pytest.mark.parametrize("wrt", ["synapses", "frames"])
def test_grad_of_a_spiking_gif_network_equals_finite_differences(synapses, wrt):
    """With the spikes fixed (checked at both ends of the difference) the run is smooth in its inputs."""
    f, ticks = frames(13), 30

    def run(x) -> Routing:
        return simulate(Network(x), f, ticks) if wrt == "synapses" else simulate(Network(synapses), x, ticks)

    def loss(x):
        r = run(x)
        return jnp.sum(r.final.v ** 2) + jnp.sum(r.mean_dvdt * jnp.arange(ticks))

    x = synapses if wrt == "synapses" else f
    direction = jax.random.normal(jax.random.key(15), x.shape, jnp.float32)
    eps = 3e-4
    spikes = [np.asarray(run(x + s * eps * direction).raster) for s in (-1, 0, 1)]
    assert spikes[1].sum() > 20 and all(np.array_equal(s, spikes[1]) for s in spikes)
    grad = jax.grad(loss)(x)
    np.testing.assert_allclose(float(jnp.vdot(grad, direction)), central_difference(loss, x, direction, eps),
                               rtol=5e-3)
