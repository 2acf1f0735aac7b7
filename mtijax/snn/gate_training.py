"""Fitting the spiking gate's per-layer constants to the softmax router, by surrogate gradients and optax.

**Teacher forcing.** The router logits ``[L, B, S, E]`` come from the plain
(softmax-routed) forward, captured at ``router_logits``; each layer's gate
runs :func:`~mtijax.snn.gate.gate_scan` over its own layer's logits from
zero membranes. What the gate's routing would change in the layers after it
is not part of the objective.

**Agreement** of a layer is the mean over valid tokens of ``|G ∩ R| / k``,
where ``G`` are the ``k`` experts the gate routes to (the top-k of its
routing logits, which is the top-k of their softmax) and ``R`` the softmax
router's ``k``. Chance is ``k / E``.

**Loss** (differentiable through the surrogate): the cross-entropy of the
gate's routing softmax against the router's top-k set, each of its experts
weighted ``1 / k``, averaged over valid tokens and layers. It rises when the
gate puts probability outside ``R``.

**Constants** are a dict ``{"decay", "gain", "threshold"}`` of ``[L]``
float32, the layout of ``spiking_gate(...).params``. After every
optimiser step they are projected back to ``decay`` in ``[0, 1]``,
``gain >= 0`` and ``threshold >= 1e-3``, where the gate's recurrence is the
seed's (a leaky membrane, a positive threshold).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtijax.errors import MtijaxError
from mtijax.snn.gate import SEED_GATE, gate_scan

Constants = dict[str, jax.Array]
"""``{"decay", "gain", "threshold"}``, each ``[L]`` float32."""
NAMES = ("decay", "gain", "threshold")
RANDOM_RANGES = {"decay": (0.0, 1.0), "gain": (0.02, 1.0), "threshold": (0.1, 2.0)}
"""The uniform ranges of :func:`random_constants` (the seed's constants lie inside each)."""


def seed_constants(num_layers: int) -> Constants:
    """The seed's constants (decay 0.91, gain 0.18, threshold 0.75) for every layer."""
    return {k: jnp.full((num_layers,), SEED_GATE[k], jnp.float32) for k in NAMES}


def random_constants(key: jax.Array, num_layers: int) -> Constants:
    """Constants drawn uniformly from :data:`RANDOM_RANGES`, independently per layer (a control)."""
    keys = jax.random.split(key, len(NAMES))
    return {k: jax.random.uniform(keys[i], (num_layers,), jnp.float32, *RANDOM_RANGES[k])
            for i, k in enumerate(NAMES)}


def project(constants: Constants) -> Constants:
    """``decay`` clipped to ``[0, 1]``, ``gain`` to ``>= 0``, ``threshold`` to ``>= 1e-3`` (module docstring)."""
    return {"decay": jnp.clip(constants["decay"], 0.0, 1.0), "gain": jnp.maximum(constants["gain"], 0.0),
            "threshold": jnp.maximum(constants["threshold"], 1e-3)}


def gate_routing(router_logits: jax.Array, constants: Constants, valid: jax.Array | None = None,
                 surrogate: str | None = None, slope: float | None = None) -> jax.Array:
    """Each layer's gate over its own router logits ``[L, B, S, E]`` from zero membranes: routing logits, same shape."""
    _, b, _, e = router_logits.shape
    start = jnp.zeros((b, e), jnp.float32)

    def layer(logits: jax.Array, gate: Constants) -> jax.Array:
        return gate_scan(logits, gate, start, valid, surrogate, slope=slope)[0]

    return jax.vmap(layer)(router_logits, constants)


def top_k_mask(logits: jax.Array, k: int) -> jax.Array:
    """``[..., E]`` float32: 1 on the ``k`` largest logits of each row (ties to the lower index), else 0."""
    _, chosen = jax.lax.top_k(logits, k)
    return jnp.sum(jax.nn.one_hot(chosen, logits.shape[-1], dtype=jnp.float32), axis=-2)


def _valid_weights(router_logits: jax.Array, valid: jax.Array | None) -> jax.Array:
    """``[B, S]`` float32 weights summing to 1 over the valid tokens."""
    ok = jnp.ones(router_logits.shape[1:3], jnp.float32) if valid is None else jnp.asarray(valid, jnp.float32)
    return ok / jnp.sum(ok)


@functools.partial(jax.jit, static_argnames=("k",))
def agreement(router_logits: jax.Array, constants: Constants, k: int, valid: jax.Array | None = None) -> jax.Array:
    """``[L]``: mean over valid tokens of ``|gate top-k ∩ router top-k| / k`` (module docstring)."""
    routed = gate_routing(router_logits, constants, valid)
    hits = jnp.sum(top_k_mask(routed, k) * top_k_mask(router_logits, k), axis=-1)  # [L, B, S] shared experts
    ok = jnp.ones(router_logits.shape[1:3], jnp.float32) if valid is None else jnp.asarray(valid, jnp.float32)
    return jnp.sum(hits * ok, axis=(1, 2)) / (k * jnp.sum(ok))


def agreement_loss(constants: Constants, router_logits: jax.Array, k: int, valid: jax.Array | None = None,
                   surrogate: str | None = "fast_sigmoid", slope: float | None = None) -> jax.Array:
    """Cross-entropy of the gate's routing softmax against the router's top-k set (module docstring), a scalar."""
    routed = gate_routing(router_logits, constants, valid, surrogate, slope)
    target = top_k_mask(router_logits, k) / k
    per_token = -jnp.sum(target * jax.nn.log_softmax(routed, axis=-1), axis=-1)  # [L, B, S]
    return jnp.mean(jnp.sum(per_token * _valid_weights(router_logits, valid), axis=(1, 2)))


class Training(NamedTuple):
    """What :func:`train_gate` returns: the fitted ``constants`` and the loss before each step ``[steps]``."""

    constants: Constants
    losses: np.ndarray


@functools.partial(jax.jit, static_argnames=("k", "learning_rate", "surrogate", "slope"))
def _step(constants, opt_state, router_logits, valid, mask, k, learning_rate, surrogate, slope):
    loss, grads = jax.value_and_grad(agreement_loss)(constants, router_logits, k, valid, surrogate, slope)
    grads = {name: g * mask[name] for name, g in grads.items()}
    updates, opt_state = optax.adam(learning_rate).update(grads, opt_state, constants)
    return project(optax.apply_updates(constants, updates)), opt_state, loss


def train_gate(router_logits: jax.Array, k: int, *, valid: jax.Array | None = None,
               init: Constants | None = None, steps: int = 200, learning_rate: float = 0.02,
               surrogate: str | None = "fast_sigmoid", slope: float | None = None,
               trainable: tuple[str, ...] = NAMES) -> Training:
    """Fit the per-layer constants to the router's top-k on ``router_logits [L, B, S, E]`` with Adam.

    Full batch: every step sees all the given tokens. ``init`` defaults to
    :func:`seed_constants`; ``surrogate`` is the spikes' gradient
    (``mtijax.snn.surrogate``; ``None`` trains through the membranes only);
    the constants not named in ``trainable`` keep their ``init`` values.
    """
    if router_logits.ndim != 4:
        raise MtijaxError(f"router logits must be [L, B, S, E], got shape {tuple(router_logits.shape)}")
    if not 1 <= k < router_logits.shape[-1]:
        raise MtijaxError(f"k must be in 1..{router_logits.shape[-1] - 1} for {router_logits.shape[-1]} experts, "
                          f"got {k}")
    if not isinstance(steps, int) or steps < 1:
        raise MtijaxError(f"steps must be a positive integer, got {steps!r}")
    unknown = sorted(set(trainable) - set(NAMES))
    if unknown or not trainable:
        raise MtijaxError(f"trainable names some of {', '.join(NAMES)}; got {list(trainable)}")
    constants = project(seed_constants(router_logits.shape[0]) if init is None else dict(init))
    opt_state = optax.adam(learning_rate).init(constants)
    logits = jnp.asarray(router_logits, jnp.float32)
    mask = {name: jnp.float32(name in trainable) for name in NAMES}
    losses = []
    for _ in range(steps):
        constants, opt_state, loss = _step(constants, opt_state, logits, valid, mask, k, float(learning_rate),
                                           surrogate, slope)
        losses.append(loss)
    return Training(constants, np.asarray(jax.device_get(losses), np.float32))
