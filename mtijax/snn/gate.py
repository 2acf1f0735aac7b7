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
from mtijax.snn.surrogate import make_surrogate

SEED_GATE = {"decay": 0.91, "gain": 0.18, "threshold": 0.75}
"""corinth-canal's constants."""
SOFTMAX_LIMIT = {"decay": 0.0, "gain": 1.0, "threshold": math.inf}
"""No memory and a threshold at infinity: routing logits equal the router logits bit for bit."""


def gate_scan(logits: jax.Array, gate: Mapping[str, jax.Array], membranes: jax.Array,
              valid: jax.Array | None = None, surrogate: str | None = None, *,
              slope: float | None = None) -> tuple[jax.Array, jax.Array]:
    """The spiking gate over positions, from given membranes: ``(routing logits [B, S, E], membranes [B, E])``.

    Per valid position ``t`` and expert (float32, the module docstring's recurrence)::

        m <- decay * m + gain * g_t
        spike = +1 if m > threshold, -1 if m < -threshold, else 0
        m <- m - threshold * spike;  routing logit = m + threshold * spike

    Args:
      logits: router logits ``[B, S, E]``.
      gate: one layer's scalars ``decay``, ``gain`` and ``threshold``.
      membranes: ``[B, E]`` float32, the membranes before position 0 (zeros for a fresh sequence).
      valid: ``[B, S]`` bool, False at padding. A padding position leaves the
        membrane exactly as it was and its routing logits are its router
        logits ``g_t`` unchanged. Default: every position is valid.
      surrogate: ``None`` (the spikes' gradient is 0), ``"fast_sigmoid"`` or
        ``"arctan"`` (``mtijax.snn.surrogate``): the spike keeps its exact
        value and gains the surrogate derivative of
        ``H(m - threshold) - H(-m - threshold)``, so ``jax.grad`` reaches
        ``decay``, ``gain`` and ``threshold`` through the resets too.
      slope: the surrogate's slope (default: its own).

    Returns the routing logits and the membranes after the last position, so
    a prefix and its suffix, the second started from the first's membranes,
    give the same result as one call over the whole sequence.
    """
    spike_grad = make_surrogate(surrogate, slope)
    decay, gain, threshold = (jnp.asarray(gate[k], jnp.float32) for k in ("decay", "gain", "threshold"))
    b, s, e = logits.shape
    if membranes.shape != (b, e):
        raise MtijaxError(f"the gate's membranes must be [B, E] = [{b}, {e}], got {tuple(membranes.shape)}")
    if valid is not None and valid.shape != (b, s):
        raise MtijaxError(f"valid must be [B, S] = [{b}, {s}], got {tuple(valid.shape)}")
    # the reset as arithmetic (spike is exactly 0 or ±1, so this equals the branch); 0 for a threshold at infinity
    reset = jnp.where(jnp.isfinite(threshold), threshold, jnp.float32(0))
    g = jnp.swapaxes(logits.astype(jnp.float32), 0, 1)  # [S, B, E]: scan over positions
    ok = jnp.ones((s, b), bool) if valid is None else jnp.swapaxes(jnp.asarray(valid, bool), 0, 1)

    def position(m: jax.Array, inputs: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        g_t, ok_t = inputs
        m_new = decay * m + gain * g_t
        spike = jnp.where(m_new > threshold, 1.0, jnp.where(m_new < -threshold, -1.0, 0.0)).astype(jnp.float32)
        if spike_grad is not None:
            spike = spike + spike_grad.gradient_only(m_new - threshold) - spike_grad.gradient_only(-m_new - threshold)
        m_after = m_new - reset * spike
        routed = m_after + reset * spike
        ok_t = ok_t[:, None]
        return jnp.where(ok_t, m_after, m), jnp.where(ok_t, routed, g_t)

    final, routed = jax.lax.scan(position, jnp.asarray(membranes, jnp.float32), (g, ok))
    return jnp.swapaxes(routed, 0, 1), final


def gate_logits(logits: jax.Array, gate: Mapping[str, jax.Array]) -> jax.Array:
    """Routing logits ``[B, S, E]`` float32 of the spiking gate for router logits ``[B, S, E]``.

    ``gate`` holds one layer's scalars ``decay``, ``gain`` and ``threshold``;
    the membranes start at zero (:func:`gate_scan` from zeros, every position valid).
    """
    b, _, e = logits.shape
    return gate_scan(logits, gate, jnp.zeros((b, e), jnp.float32))[0]


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
