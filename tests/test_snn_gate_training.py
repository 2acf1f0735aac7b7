"""Training the spiking gate's constants: the agreement it reports is the top-k overlap counted by hand, and
a few optax steps through the surrogate raise it on held-out logits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtijax.errors import MtijaxError
from mtijax.snn import gate_training
from mtijax.snn.gate import gate_scan

LAYERS, EXPERTS, K = 2, 6, 2


def logits(seed: int) -> jax.Array:
    """Router logits ``[L, B, S, E]`` with a per-layer bias, so some experts are favoured throughout."""
    rng = np.random.default_rng(seed)
    bias = np.random.default_rng(99).normal(scale=1.0, size=(LAYERS, 1, 1, EXPERTS))
    return jnp.asarray(rng.normal(scale=2.0, size=(LAYERS, 4, 24, EXPERTS)) + bias, jnp.float32)


def overlap_by_hand(routed: np.ndarray, router: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Per layer: mean over valid tokens of |top-k(routed) & top-k(router)| / k, with NumPy's sort."""
    mine = np.argsort(-routed, axis=-1, kind="stable")[..., :K]
    theirs = np.argsort(-router, axis=-1, kind="stable")[..., :K]
    hits = (mine[..., :, None] == theirs[..., None, :]).any(-1).sum(-1) / K  # [L, B, S]
    return np.asarray([hits[layer][valid].mean() for layer in range(LAYERS)])


def test_agreement_is_the_top_k_overlap_over_valid_tokens():
    x = logits(0)
    constants = gate_training.seed_constants(LAYERS)
    valid = np.random.default_rng(1).random((4, 24)) < 0.8
    routed = np.stack([np.asarray(gate_scan(x[layer], {k: v[layer] for k, v in constants.items()},
                                            jnp.zeros((4, EXPERTS)), jnp.asarray(valid))[0])
                       for layer in range(LAYERS)])
    got = np.asarray(gate_training.agreement(x, constants, K, jnp.asarray(valid)))
    np.testing.assert_allclose(got, overlap_by_hand(routed, np.asarray(x), valid), rtol=1e-6)
    assert (got < 0.95).all()  # the seed's gate disagrees with the router on these logits
    limit = {"decay": jnp.zeros(LAYERS), "gain": jnp.ones(LAYERS), "threshold": jnp.full(LAYERS, 1e6)}
    np.testing.assert_array_equal(np.asarray(gate_training.agreement(x, limit, K)), [1.0, 1.0])


def test_a_few_steps_through_the_surrogate_raise_held_out_agreement():
    train, held_out = logits(2), logits(3)
    seed = gate_training.seed_constants(LAYERS)
    before = np.asarray(gate_training.agreement(held_out, seed, K))
    fit = gate_training.train_gate(train, K, steps=25, learning_rate=0.05, surrogate="arctan")
    after = np.asarray(gate_training.agreement(held_out, fit.constants, K))
    assert fit.losses[-1] < fit.losses[0]
    assert (after > before + 0.1).all(), (before, after)


def test_the_loss_reaches_every_constant_through_the_surrogate():
    grads = jax.grad(gate_training.agreement_loss)(gate_training.seed_constants(LAYERS), logits(4), K,
                                                   surrogate="fast_sigmoid")
    assert all(np.abs(np.asarray(g)).min() > 0 for g in grads.values())
    plain = jax.grad(gate_training.agreement_loss)(gate_training.seed_constants(LAYERS), logits(4), K,
                                                   surrogate=None)
    assert not np.allclose(np.asarray(plain["threshold"]), np.asarray(grads["threshold"]))


def test_held_constants_stay_and_bad_arguments_are_refused():
    fit = gate_training.train_gate(logits(5), K, steps=3, trainable=("gain",))
    np.testing.assert_array_equal(np.asarray(fit.constants["decay"]), np.float32(0.91))
    np.testing.assert_array_equal(np.asarray(fit.constants["threshold"]), np.float32(0.75))
    with pytest.raises(MtijaxError, match="k must be in 1..5"):
        gate_training.train_gate(logits(5), 6)
    with pytest.raises(MtijaxError, match="trainable names some of"):
        gate_training.train_gate(logits(5), K, trainable=("leak",))
