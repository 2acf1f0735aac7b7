"""``gate_scan``: the spiking gate from given membranes, returning the final ones, with padding left out.

A prefix and its suffix with the membranes carried between them give one call
over the whole text; padding positions move no membrane; and the recurrence
from non-zero membranes matches an independent NumPy loop.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from mtijax.errors import MtijaxError
from mtijax.snn.gate import SEED_GATE, gate_logits, gate_scan


def router_logits(seed: int, batch: int = 2, length: int = 30, experts: int = 6) -> np.ndarray:
    """Logits large enough that the seed's membranes cross ±0.75 both ways."""
    return np.random.default_rng(seed).normal(scale=4.0, size=(batch, length, experts)).astype(np.float32)


def numpy_scan(logits: np.ndarray, m: np.ndarray, valid: np.ndarray, decay: float, gain: float,
               threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """The seed's gate one position at a time (float32), skipping invalid positions."""
    f = np.float32
    m = m.astype(f).copy()
    out = logits.astype(f).copy()
    for s in range(logits.shape[1]):
        new = f(decay) * m + f(gain) * logits[:, s]
        spike = np.where(new > f(threshold), f(1), np.where(new < -f(threshold), f(-1), f(0)))
        new = np.where(spike != 0, new - f(threshold) * spike, new)
        routed = np.where(spike != 0, new + f(threshold) * spike, new)
        ok = valid[:, s, None]
        out[:, s] = np.where(ok, routed, out[:, s])
        m = np.where(ok, new, m)
    return out, m


def test_from_given_membranes_with_padding_against_numpy():
    logits = router_logits(0)
    rng = np.random.default_rng(1)
    start = rng.normal(scale=0.5, size=(2, 6)).astype(np.float32)
    valid = rng.random((2, 30)) < 0.7
    routed, final = gate_scan(jnp.asarray(logits), SEED_GATE, jnp.asarray(start), jnp.asarray(valid))
    want_routed, want_final = numpy_scan(logits, start, valid, **SEED_GATE)
    np.testing.assert_allclose(np.asarray(routed), want_routed, rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(final), want_final, rtol=0, atol=1e-6)
    assert (np.abs(want_final) > 0).all() and (np.abs(want_routed[valid]) > SEED_GATE["threshold"]).any()


def test_prefix_then_suffix_with_carried_membranes_is_one_call():
    logits = jnp.asarray(router_logits(2, length=40))
    whole, whole_final = gate_scan(logits, SEED_GATE, jnp.zeros((2, 6), jnp.float32))
    for cut in (1, 17, 39):
        head, carried = gate_scan(logits[:, :cut], SEED_GATE, jnp.zeros((2, 6), jnp.float32))
        tail, final = gate_scan(logits[:, cut:], SEED_GATE, carried)
        np.testing.assert_allclose(np.concatenate([np.asarray(head), np.asarray(tail)], axis=1),
                                   np.asarray(whole), rtol=0, atol=1e-6)
        np.testing.assert_allclose(np.asarray(final), np.asarray(whole_final), rtol=0, atol=1e-6)
    # the suffix does depend on the carried membranes: from zeros it routes differently
    fresh, _ = gate_scan(logits[:, 17:], SEED_GATE, jnp.zeros((2, 6), jnp.float32))
    assert np.abs(np.asarray(fresh) - np.asarray(whole)[:, 17:]).max() > 0.1


def test_padding_does_not_move_the_membrane():
    logits = router_logits(3, length=12)
    start = np.full((2, 6), 0.3, np.float32)
    valid = np.ones((2, 12), bool)
    valid[0, 4:9] = False  # a run of padding inside row 0
    valid[1] = False  # row 1 is all padding
    routed, final = gate_scan(jnp.asarray(logits), SEED_GATE, jnp.asarray(start), jnp.asarray(valid))
    np.testing.assert_array_equal(np.asarray(final)[1], start[1])
    np.testing.assert_array_equal(np.asarray(routed)[~valid], logits[~valid])
    # row 0 equals the same text with its padding cut out
    kept = np.concatenate([logits[:1, :4], logits[:1, 9:]], axis=1)
    cut, cut_final = gate_scan(jnp.asarray(kept), SEED_GATE, jnp.asarray(start[:1]))
    np.testing.assert_allclose(np.asarray(routed)[0, valid[0]], np.asarray(cut)[0], rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(final)[0], np.asarray(cut_final)[0], rtol=0, atol=1e-6)
    assert np.abs(np.asarray(final)[0] - start[0]).max() > 0.1  # row 0's valid positions did move it


def test_gate_logits_is_the_scan_from_zeros():
    logits = router_logits(4)
    want, _ = numpy_scan(logits, np.zeros((2, 6), np.float32), np.ones((2, 30), bool), **SEED_GATE)
    np.testing.assert_allclose(np.asarray(gate_logits(jnp.asarray(logits), SEED_GATE)), want, rtol=0, atol=1e-6)


def test_membranes_of_the_wrong_shape_are_refused():
    with pytest.raises(MtijaxError, match=r"membranes must be \[B, E\] = \[2, 6\]"):
        gate_scan(jnp.asarray(router_logits(5)), SEED_GATE, jnp.zeros((2, 5), jnp.float32))
