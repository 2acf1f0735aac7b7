"""One fusion layer: the switchable components in order, the gate, and the blend into the residual stream.

``x = h``; then, for each component switched on: prime projection and back-projection (``x`` becomes
``W_back`` of the normalised amplitudes), quaternion rotation, Kuramoto, ``x + 0.1 PRSC(x)``,
``x + 0.05 SMF(x)``, and the coherence gate. With ``norm="fusion"``, ``x`` is LayerNormed just before the
gate. The output is ``h + s W_o x`` (parallel), ``x`` (sequential) or ``(1 - s) h + s W_o x`` (residual),
``s = sigmoid(alpha)``, LayerNormed with ``norm="output"``. ``W_o`` starts as Xavier-uniform with gain 0.1
and a zero bias.

Norm placement differs from the original, which LayerNormed the branch *after* the gate: the gate multiplies
all units of a token by one number, and a LayerNorm divides such a factor back out (up to its epsilon), so
there the gate did nothing. Normalising before the gate keeps the branch's scale fixed and the gate effective.

Everything is computed in float32 and the output is cast back to the residual stream's dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtijax.fusion.config import FusionConfig
from mtijax.fusion.gate import CoherenceGate
from mtijax.fusion.kuramoto import KuramotoCarry, KuramotoSync
from mtijax.fusion.memory import SemanticMemory
from mtijax.fusion.prime import PrimeProjection
from mtijax.fusion.prsc import PRSC, PRSCCarry
from mtijax.fusion.rotation import QuaternionRotation

METRICS = ("prime_entropy", "prime_coherence", "kuramoto_order", "prsc_coherence", "gate_coherence", "gate")
"""Per-token metrics a layer may report (``[B, S]`` each); ``fusion_alpha`` (the blend ``s``) is a scalar."""


class LayerCarry(NamedTuple):
    """What a layer's token-coupled components keep between incremental calls (None when switched off)."""

    kuramoto: KuramotoCarry | None
    prsc: PRSCCarry | None

    @classmethod
    def empty(cls, config: FusionConfig, batch: int) -> "LayerCarry":
        return cls(KuramotoCarry.empty(batch, config.kuramoto_steps) if config.uses("kuramoto") else None,
                   PRSCCarry.empty(batch, config.num_primes) if config.uses("prsc") else None)


def _xavier(gain: float) -> nn.initializers.Initializer:
    return nn.initializers.variance_scaling(gain ** 2, "fan_avg", "uniform")


class FusionLayer(nn.Module):
    """``h [B, S, D]``, ``positions [B, S]``, carry -> ``(h' [B, S, D], metrics, carry)``.

    ``store_memory`` writes the SMF bank (training); apply with ``mutable=["memory"]`` then.
    """

    config: FusionConfig

    @nn.compact
    def __call__(self, h: jax.Array, positions: jax.Array, carry: LayerCarry,
                 store_memory: bool = False) -> tuple[jax.Array, dict[str, jax.Array], LayerCarry]:
        c = self.config
        residual = h.astype(jnp.float32)
        b, s, d = residual.shape
        x = residual
        metrics: dict[str, jax.Array] = {}
        coherence = None
        kuramoto_carry, prsc_carry = None, None
        if c.uses("prime"):
            states = PrimeProjection(c.num_primes, c.prime_quaternion, c.learnable_phases, name="prime")(x)
            metrics["prime_entropy"], metrics["prime_coherence"] = states.entropy, states.coherence
            coherence = states.coherence
            x = nn.Dense(d, kernel_init=_xavier(0.5), name="prime_back")(states.amplitudes.reshape(b, s, -1))
        if c.uses("quaternion"):
            x = QuaternionRotation(c.max_positions, name="quaternion")(x, positions)
        if c.uses("kuramoto"):
            x, metrics["kuramoto_order"], kuramoto_carry = KuramotoSync(
                c.kuramoto_coupling, c.kuramoto_steps, c.kuramoto_dt, c.kuramoto_sign, c.kuramoto_scope == "causal",
                c.kuramoto_blend, name="kuramoto")(x, positions, carry.kuramoto)
        if c.uses("prsc"):
            composed, prsc_coherence, prsc_carry = PRSC(c.num_primes, c.prsc_mix, name="prsc")(
                x, positions, carry.prsc)
            x = x + c.prsc_weight * composed
            metrics["prsc_coherence"] = prsc_coherence
            coherence = prsc_coherence if coherence is None else (coherence + prsc_coherence) / 2
        if c.uses("smf"):
            memory = SemanticMemory(c.smf_slots, c.smf_dim, c.smf_decay, c.smf_importance, name="smf")
            x = x + c.smf_weight * memory(x, positions >= 0, store_memory)
        if c.norm == "fusion":
            x = nn.LayerNorm(epsilon=1e-5, name="norm")(x)
        if c.uses("coherence_gate"):
            x, metrics["gate_coherence"], metrics["gate"] = CoherenceGate(
                c.gate_threshold, c.gate_steepness, name="gate")(x, coherence)
        if c.mode == "sequential":
            out = x
        else:
            alpha = (self.param("alpha", nn.initializers.constant(c.alpha_logit), ()) if c.learnable_alpha
                     else jnp.float32(c.alpha_logit))
            blend = jax.nn.sigmoid(alpha)
            branch = nn.Dense(d, kernel_init=_xavier(0.1), name="out_proj")(x)
            out = residual + blend * branch if c.mode == "parallel" else (1 - blend) * residual + blend * branch
            metrics["fusion_alpha"] = blend
        if c.norm == "output":
            out = nn.LayerNorm(epsilon=1e-5, name="norm")(out)
        return out.astype(h.dtype), metrics, LayerCarry(kuramoto_carry, prsc_carry)
