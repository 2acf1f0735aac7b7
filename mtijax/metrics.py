"""Measurements on logits and on curves: norms, divergences, agreement, linear fits.

Logit arguments are float32 ``[..., V]`` arrays of final-position logits;
every function returns one number per leading index unless it says otherwise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def logit_norm(logits: jax.Array) -> jax.Array:
    """L2 norm of the logits (seed 000's "output norm")."""
    return jnp.linalg.norm(logits.astype(jnp.float32), axis=-1)


def l2_divergence(logits: jax.Array, reference: jax.Array) -> jax.Array:
    """L2 distance between two logit vectors (seed 000's "divergence")."""
    return jnp.linalg.norm(logits.astype(jnp.float32) - reference.astype(jnp.float32), axis=-1)


def kl_divergence(logits: jax.Array, reference: jax.Array) -> jax.Array:
    """KL(reference || logits) of the next-token distributions, in nats (rounding below 0 clamped to 0)."""
    log_p = jax.nn.log_softmax(reference.astype(jnp.float32), axis=-1)
    log_q = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.maximum(jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1), 0.0)


def top1_agreement(logits: jax.Array, reference: jax.Array) -> jax.Array:
    """1.0 where the most likely next token is the reference's, else 0.0."""
    return (jnp.argmax(logits, axis=-1) == jnp.argmax(reference, axis=-1)).astype(jnp.float32)


def linear_fit(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Least-squares line ``y = slope * x + intercept`` and its coefficient of determination R²."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    slope, intercept = np.polyfit(x, y, 1)
    residual = np.sum((y - (slope * x + intercept)) ** 2)
    total = np.sum((y - y.mean()) ** 2)
    return {"slope": float(slope), "intercept": float(intercept),
            "r2": float(1 - residual / total) if total > 0 else 1.0}


def power_exponent(x: np.ndarray, y: np.ndarray) -> float:
    """Exponent ``p`` of the best ``y = c * x ** p`` over the points with ``x, y > 0`` (log-log slope); NaN if
    fewer than two such points. A linear response has ``p = 1``."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    keep = (x > 0) & (y > 0)
    if keep.sum() < 2:
        return float("nan")
    return float(np.polyfit(np.log(x[keep]), np.log(y[keep]), 1)[0])
