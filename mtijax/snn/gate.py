"""The spiking mixture-of-experts gate (corinth-canal's ``olmoe.rs``), as an alternative OLMoE router.

Each expert ``e`` of a layer has a membrane ``m_e`` driven by its router
logit ``g_e``, token after token::

    m <- decay * m + gain * g
    spike = +1 if m > threshold, -1 if m < -threshold, else 0
    m <- m - threshold * spike                       (only where it spiked)
    routing logits = m + threshold * spike           (only where it spiked)

and the layer routes on those logits exactly as the softmax router does
(float32 softmax, top-k, renormalised when the config says so). The seed's
constants are ``decay 0.91, gain 0.18, threshold 0.75``.

**How the state flows.** The membranes start at zero for every sequence of
every forward call and run over that call's positions in order (a
``lax.scan`` over the sequence axis), separately for each layer and each
batch row. Padding positions are not skipped, so pad on the right. A
decode step with a KV cache starts the membranes afresh, so spiking routing
is defined for a full forward over the text (as ``experiments/snn_routing.py``
uses it), not for token-by-token generation.

**How it is selected.** The gate is data in the params pytree: a sub-dict
``params["layers"]["moe"]["spiking"] = {"decay", "gain", "threshold"}``,
each ``[L]`` float32, that ``mtijax.models.olmoe.route`` uses when present.
:func:`with_spiking_gate` adds it. A layer with ``decay 0, gain 1,
threshold inf`` (:data:`SOFTMAX_LIMIT`) routes exactly as the plain router
does (``m = g``, no spike), so choosing layers is a mask, not a branch.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp

from mtijax.config import ModelConfig
from mtijax.errors import MtijaxError
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


def with_spiking_gate(config: ModelConfig, params: dict[str, Any], *, decay: float = SEED_GATE["decay"],
                      gain: float = SEED_GATE["gain"], threshold: float = SEED_GATE["threshold"],
                      layers: Iterable[int] | None = None) -> dict[str, Any]:
    """A copy of OLMoE ``params`` whose chosen ``layers`` (default all) route through the spiking gate.

    The other layers get :data:`SOFTMAX_LIMIT` (the plain router, exactly).
    Only the dicts on the path to the new leaves are copied; every weight is
    the same array as before.
    """
    if config.architecture != "olmoe":
        raise MtijaxError(f"the spiking gate replaces a mixture-of-experts router; {config.architecture} has none")
    chosen = list(range(config.num_layers)) if layers is None else list(layers)
    bad = [l for l in chosen if not 0 <= l < config.num_layers]
    if bad:
        raise MtijaxError(f"layer {bad[0]} is out of range: the model has layers 0..{config.num_layers - 1}")
    mask = jnp.zeros((config.num_layers,), bool).at[jnp.asarray(chosen, jnp.int32)].set(True)
    values = {"decay": decay, "gain": gain, "threshold": threshold}
    spiking = {k: jnp.where(mask, jnp.float32(values[k]), jnp.float32(SOFTMAX_LIMIT[k])) for k in values}
    layers_params = dict(params["layers"])
    layers_params["moe"] = {**params["layers"]["moe"], "spiking": spiking}
    return {**params, "layers": layers_params}
