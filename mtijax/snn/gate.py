"""The spiking mixture-of-experts gate (corinth-canal's ``olmoe.rs``), as an OLMoE router hook.

Each expert ``e`` of a layer has a membrane ``m_e`` driven by its router
logit ``g_e``, token after token::

    m <- decay * m + gain * g
    spike = +1 if m > threshold, -1 if m < -threshold, else 0
    m <- m - threshold * spike                       (only where it spiked)
    routing logits = m + threshold * spike           (only where it spiked)

and the layer routes on those logits exactly as the softmax router does
(float32 softmax, top-k, renormalised when the config says so). The seed's
constants are ``decay 0.91, gain 0.18, threshold 0.75``.

**How it is selected.** :func:`spiking_gate` returns a
:class:`~mtijax.interventions.RouterHook`: the per-layer constants
(``decay``, ``gain``, ``threshold``, each ``[L]`` float32) and the
membranes (``[L, B, E]``). Pass it as ``mtijax.forward(..., router=gate)``
or as the ``router`` of the generation engine's interventions. The params
pytree is never touched. A layer with ``decay 0, gain 1, threshold inf``
(:data:`SOFTMAX_LIMIT`) routes exactly as the plain router does (``m = g``,
no spike), so choosing layers is a mask, not a branch.

**How the state flows.** The membranes start at zero before the first token
and run over the positions in order (a ``lax.scan`` over the sequence axis),
separately for each layer and batch row; padding (position -1) leaves them
alone. ``forward`` returns them (``ForwardOutput.router_state``) and the next
incremental call continues from them, so in generation they persist across
prefill chunks and decode steps: greedy generation with the gate gives the
argmax of a full spiking forward over the same text (tested).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp

from mtijax.config import ModelConfig
from mtijax.errors import MtijaxError
from mtijax.interventions import RouterHook

SEED_GATE = {"decay": 0.91, "gain": 0.18, "threshold": 0.75}
"""corinth-canal's constants."""
SOFTMAX_LIMIT = {"decay": 0.0, "gain": 1.0, "threshold": math.inf}
"""No memory and a threshold at infinity: routing logits equal the router logits bit for bit."""


def gate_scan(logits: jax.Array, gate: Mapping[str, jax.Array], membranes: jax.Array, valid: jax.Array | None = None,
              surrogate: str | None = None) -> tuple[jax.Array, jax.Array]:
    """The gate over ``logits [B, S, E]`` from ``membranes [B, E]``: ``(routing logits [B, S, E], membranes [B, E])``.

    ``gate`` holds one layer's scalars ``decay``, ``gain`` and ``threshold``. Where ``valid [B, S]`` is False
    (padding) the membrane stays as it was. ``surrogate`` is accepted for the training path (None: the exact
    step everywhere).
    """
    decay, gain, threshold = (jnp.asarray(gate[k], jnp.float32) for k in ("decay", "gain", "threshold"))
    g = jnp.swapaxes(logits.astype(jnp.float32), 0, 1)  # [S, B, E]: scan over positions
    keep = jnp.ones(g.shape[:2], bool) if valid is None else jnp.swapaxes(valid, 0, 1)

    def position(m: jax.Array, xs: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        g_t, keep_t = xs
        new = decay * m + gain * g_t
        spike = jnp.where(new > threshold, 1.0, jnp.where(new < -threshold, -1.0, 0.0)).astype(jnp.float32)
        fired = spike != 0
        new = jnp.where(fired, new - threshold * spike, new)
        return jnp.where(keep_t[:, None], new, m), jnp.where(fired, new + threshold * spike, new)

    membranes, routed = jax.lax.scan(position, membranes.astype(jnp.float32), (g, keep))
    return jnp.swapaxes(routed, 0, 1), membranes


def gate_logits(logits: jax.Array, gate: Mapping[str, jax.Array]) -> jax.Array:
    """Routing logits ``[B, S, E]`` float32 of the spiking gate for router logits ``[B, S, E]``, membranes from zero."""
    return gate_scan(logits, gate, jnp.zeros((logits.shape[0], logits.shape[-1]), jnp.float32))[0]


def _hook_step(logits: jax.Array, positions: jax.Array, gate: Mapping[str, jax.Array],
               membranes: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One layer of the router hook: the gate over this call's positions, from the carried membranes."""
    return gate_scan(logits, gate, membranes, positions >= 0)


@dataclasses.dataclass(frozen=True)
class _FreshMembranes:
    """The hook's state before any token: zero membranes ``[L, B, E]`` (a value, so equal hooks share compiles)."""

    num_experts: int

    def __call__(self, gate: Mapping[str, jax.Array], batch: int) -> jax.Array:
        return jnp.zeros((gate["decay"].shape[0], batch, self.num_experts), jnp.float32)


def spiking_gate(config: ModelConfig, *, decay: float = SEED_GATE["decay"], gain: float = SEED_GATE["gain"],
                 threshold: float = SEED_GATE["threshold"], layers: Iterable[int] | None = None) -> RouterHook:
    """A router hook that routes the chosen ``layers`` (default all) of an OLMoE model through the spiking gate.

    The other layers get :data:`SOFTMAX_LIMIT` (the plain router, exactly). The membranes start at zero (the
    hook's state is filled for the batch at the first call).
    """
    if config.architecture != "olmoe":
        raise MtijaxError(f"the spiking gate replaces a mixture-of-experts router; {config.architecture} has none")
    chosen = list(range(config.num_layers)) if layers is None else list(layers)
    bad = [l for l in chosen if not 0 <= l < config.num_layers]
    if bad:
        raise MtijaxError(f"layer {bad[0]} is out of range: the model has layers 0..{config.num_layers - 1}")
    mask = jnp.zeros((config.num_layers,), bool).at[jnp.asarray(chosen, jnp.int32)].set(True)
    values = {"decay": decay, "gain": gain, "threshold": threshold}
    constants = {k: jnp.where(mask, jnp.float32(values[k]), jnp.float32(SOFTMAX_LIMIT[k])) for k in values}
    return RouterHook(constants, None, _hook_step, _FreshMembranes(config.num_experts))
