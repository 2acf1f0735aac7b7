"""Coherence gate: scale the fusion branch by how coherent its token is.

``gate = sigmoid(steepness (C - sigmoid(tau)))`` with ``tau`` learned (initialised to 0.7, so the
threshold starts at ``sigmoid(0.7) = 0.67``) and steepness 10; the output is ``x * gate``. ``C`` is the
prime projection's coherence (averaged with the PRSC's when both run). Without either, the gate computes
its own ``C = sigmoid(w2 . tanh(W1 x))`` (``W1: D -> D/4``, ``w2``'s bias starting at 1), as the original
does; the original also builds that network when it is not used, which this does not.

Since ``C`` and ``sigmoid(tau)`` lie in [0, 1], the gate never falls below ``sigmoid(-steepness)``
(4.5e-5 at 10): it attenuates, it never closes completely.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class CoherenceGate(nn.Module):
    """``x [B, S, D]`` and an optional coherence ``[B, S]`` -> ``(x * gate, coherence, gate)``.

    Params: ``threshold`` (``tau``), and ``coherence_hidden``, ``coherence_out`` when no coherence is given.
    """

    threshold: float = 0.7
    steepness: float = 10.0

    @nn.compact
    def __call__(self, x: jax.Array, coherence: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
        if coherence is None:
            hidden = jnp.tanh(nn.Dense(max(x.shape[-1] // 4, 1), name="coherence_hidden")(x))
            out = nn.Dense(1, bias_init=nn.initializers.constant(1.0), name="coherence_out")(hidden)
            coherence = jax.nn.sigmoid(out[..., 0])
        tau = self.param("threshold", nn.initializers.constant(self.threshold), ())
        gate = jax.nn.sigmoid(self.steepness * (coherence - jax.nn.sigmoid(tau)))
        return x * gate[..., None], coherence, gate
