"""Building blocks shared by the decoders: RMSNorm, RoPE, attention, gated MLP.

Shapes use B = batch, S = query length, T = key length, N = query heads,
K = key/value heads, G = N // K, H = head_dim, D = hidden size.
"""

from __future__ import annotations

import functools
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

SLIDING = "sliding_attention"
FULL = "full_attention"
"""The two layer types of ``layer_types`` (Hugging Face's names): attention within a window, or over everything."""
NO_WINDOW = 2**30
"""Attention window of a global layer: larger than any position."""
MASKED = -2.3819763e38
"""Score given to masked keys (the float32/bfloat16 lowest finite value, as Hugging Face uses)."""


def project_qkv(x: jax.Array, attn: dict[str, jax.Array], num_heads: int, num_kv_heads: int, head_dim: int,
                layout: str = "params") -> tuple[jax.Array, jax.Array, jax.Array]:
    """The q, k and v projections of ``x [B, S, D]``: ``q [B, S, N, H]``, ``k, v [B, S, K, H]``.

    ``layout`` names how ``attn`` holds them (a static choice of the caller, never read from the dict):
    ``"params"`` is the documented ``q_proj``, ``k_proj``, ``v_proj``; ``"fused_qkv"`` is one
    ``qkv_proj [D, (N + 2K) H]`` (:func:`mtijax.models.fused.fuse_qkv`, what decoding uses): the same
    numbers, one matrix-vector product instead of three, which on an H100 reads the weights 2.4x
    faster at batch 1 (``experiments/probe_gemv.py``).
    """
    b, s, _ = x.shape
    if layout == "fused_qkv":
        q, k, v = jnp.split(x @ attn["qkv_proj"], [num_heads * head_dim, (num_heads + num_kv_heads) * head_dim], -1)
    elif layout == "params":
        q, k, v = x @ attn["q_proj"], x @ attn["k_proj"], x @ attn["v_proj"]
    else:
        raise ValueError(f"unknown params layout {layout!r}")
    return (q.reshape(b, s, num_heads, head_dim), k.reshape(b, s, num_kv_heads, head_dim),
            v.reshape(b, s, num_kv_heads, head_dim))


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, *, plus_one: bool = True) -> jax.Array:
    """RMSNorm computed in float32 and cast back to ``x.dtype``.

    Gemma scales by ``(1 + weight)``; ``plus_one=False`` scales by ``weight``.
    """
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    scale = weight.astype(jnp.float32)
    return (normed * (1.0 + scale if plus_one else scale)).astype(x.dtype)


def rope_inv_freq(head_dim: int, base: float, linear_scaling: float = 1.0) -> np.ndarray:
    """Inverse RoPE frequencies ``[H/2]`` in float32, divided by the linear scaling factor."""
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv = (1.0 / (np.float32(base) ** exponents)).astype(np.float32)
    return (inv / np.float32(linear_scaling)).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotate ``x [B, S, heads, H]`` by ``positions [B, S]`` (rotate-half layout, as Hugging Face)."""
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, S, H/2]
    angles = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def attention_mask(q_pos: jax.Array, k_pos: jax.Array, window: jax.Array) -> jax.Array:
    """Which keys each query may see, from token positions: ``[B, S, T]`` bool.

    A key is visible when it holds a token (``k_pos >= 0``), is not in the
    query's future, and is less than ``window`` positions behind it.
    Positions, not array indices, decide: this is what keeps a rolling or
    left-padded cache correct.
    """
    q = q_pos[:, :, None]
    k = k_pos[:, None, :]
    return (k >= 0) & (k <= q) & (q - k < window)


ATTENTION_FORMS = ("matmul", "reduce")
"""How :func:`attention` computes its scores and weighted values: ``"matmul"``, as batched matrix products over
``(B, K)``; ``"reduce"``, as elementwise products summed over the contracted axis, which XLA fuses into one
kernel that reads the keys and values in the cache's ``[B, T, K, H]`` layout (a batched product over ``(B, K)``
wants ``K`` beside ``B``, and on GPUs XLA may copy each key and value segment into that layout first)."""


REDUCE_MAX_QUERIES = 8
"""The most queries per key/value head (S * G) that the ``"reduce"`` form takes: a decode step's, not a prefill
chunk's (whose products are matrix products worth a matrix kernel)."""


def attention_form(queries_per_kv_head: int) -> str:
    """The form of :data:`ATTENTION_FORMS` for ``queries_per_kv_head`` (S * G) queries: ``"reduce"``
    where at most :data:`REDUCE_MAX_QUERIES` queries share each key (a decode step), else ``"matmul"``;
    ``MTIJAX_ATTENTION=matmul`` keeps the matrix form everywhere (to measure against).

    Chosen on an H200, where the matrix form copied Gemma 3 12B's global keys and values into ``[B, K, T, H]`` at
    every batch-8 step (``experiments/results/attention_forms_h200.json`` and the README's Performance section)."""
    setting = os.environ.get("MTIJAX_ATTENTION", "")
    if setting and setting not in ATTENTION_FORMS:
        raise ValueError(f"MTIJAX_ATTENTION must be one of {', '.join(ATTENTION_FORMS)}, got {setting!r}")
    return "reduce" if setting != "matmul" and queries_per_kv_head <= REDUCE_MAX_QUERIES else "matmul"


def _scores(qg: jax.Array, k: jax.Array, form: str) -> jax.Array:
    """``qg [B, S, K, G, H]`` against ``k [B, T, K, H]``: ``[B, K, G, S, T]`` in float32."""
    if form == "matmul":
        return jnp.einsum("bskgh,btkh->bkgst", qg, k, preferred_element_type=jnp.float32)
    queries = qg.astype(jnp.float32).transpose(0, 2, 3, 1, 4)[:, :, :, :, None, :]
    keys = k.astype(jnp.float32).transpose(0, 2, 1, 3)[:, :, None, None, :, :]
    return jnp.sum(queries * keys, axis=-1)


def _weighted(w: jax.Array, v: jax.Array, form: str) -> jax.Array:
    """``w [B, K, G, S, T]`` (in ``v``'s dtype) times ``v [B, T, K, H]``: ``[B, K, G, S, H]`` in float32."""
    if form == "matmul":
        return jnp.einsum("bkgst,btkh->bkgsh", w, v, preferred_element_type=jnp.float32)
    values = v.astype(jnp.float32).transpose(0, 2, 1, 3)[:, :, None, None, :, :]
    return jnp.sum(w.astype(jnp.float32)[..., None] * values, axis=-2)


def attention(q: jax.Array, q_pos: jax.Array, segments: Sequence[tuple[jax.Array, jax.Array, jax.Array]],
              window: jax.Array, scale: float, softcap: float | None = None) -> jax.Array:
    """Grouped-query attention over one or more key/value segments with one softmax.

    Splitting the keys into segments (the cache, then this call's new tokens)
    lets a decode step attend to the cache without first copying the new
    entries into it. The segments' scores are never joined into one array: each is shifted by their common
    maximum, its exponentials summed and multiplied into its values, and the sum divides the total. (Joined,
    XLA's GPU fusion put the decode step's new-token score, with the query's and key's norm and RoPE, inside
    the fusion that joined the scores, and took 28 us per layer there on an H200: a third of the 270M's step
    at a 512-slot cache, ``experiments/probe_step_profile.py``.)

    Args:
      q: ``[B, S, N, H]`` queries at positions ``q_pos [B, S]``.
      segments: ``(k, v, k_pos)`` triples, ``k, v [B, T_i, K, H]``, ``k_pos [B, T_i]``.
      window: keys must be less than ``window`` positions behind the query.
    Returns:
      ``[B, S, N, H]`` in the dtype of the values; scores and softmax in float32.
    """
    b, s, n, h = q.shape
    kv_heads = segments[0][0].shape[2]
    qg = q.reshape(b, s, kv_heads, n // kv_heads, h)
    form = attention_form(s * (n // kv_heads))
    scores = []
    for k, _, k_pos in segments:
        score = _scores(qg, k, form) * scale
        if softcap is not None:
            score = jnp.tanh(score / softcap) * softcap
        visible = attention_mask(q_pos, k_pos, window)[:, None, None, :, :]
        scores.append(jnp.where(visible, score, MASKED))
    top = jax.lax.stop_gradient(functools.reduce(jnp.maximum, [jnp.max(x, axis=-1, keepdims=True) for x in scores]))
    weights = [jnp.exp(x - top) for x in scores]
    total = functools.reduce(jnp.add, [jnp.sum(w, axis=-1, keepdims=True) for w in weights])
    out = functools.reduce(jnp.add, [_weighted(w.astype(v.dtype), v, form) for w, (_, v, _) in zip(weights, segments)])
    out = out / total
    return out.transpose(0, 3, 1, 2, 4).reshape(b, s, n, h).astype(segments[-1][1].dtype)


def gelu_tanh(x: jax.Array) -> jax.Array:
    """GELU with the tanh approximation (``gelu_pytorch_tanh``)."""
    return jax.nn.gelu(x, approximate=True)


def embed_unscaled(config, params: dict, tokens: jax.Array) -> jax.Array:
    """Token embeddings ``[B, S, D]``, unscaled (OLMoE and the Llama line; Gemma scales by sqrt(D))."""
    return params["embed"][tokens]


def unembed_plain_norm(config, params: dict, x: jax.Array) -> jax.Array:
    """Final RMSNorm (scaled by ``w``, not ``1 + w``) and the output head: ``[..., D]`` -> float32 logits
    ``[..., V]``; the head is ``embed.T`` when ``config.tie_word_embeddings``, else ``params["unembed"]``."""
    x = rms_norm(x, params["final_norm"], config.rms_norm_eps, plus_one=False)
    if config.tie_word_embeddings:
        return jnp.einsum("...d,vd->...v", x, params["embed"], preferred_element_type=jnp.float32)
    return jnp.einsum("...d,dv->...v", x, params["unembed"], preferred_element_type=jnp.float32)


def attention_shape_problems(config) -> list[str]:
    """What is wrong with a decoder config's per-layer types and head shapes (``layer_types``, ``num_layers``,
    ``num_heads``, ``num_kv_heads``, ``head_dim``), one message each; empty when nothing is."""
    problems = []
    if len(config.layer_types) != config.num_layers:
        problems.append(f"{len(config.layer_types)} layer types for {config.num_layers} layers")
    if any(t not in (SLIDING, FULL) for t in config.layer_types):
        problems.append(f"unknown layer type in {sorted(set(config.layer_types))}")
    if config.num_kv_heads > 0 and config.num_heads % config.num_kv_heads:
        problems.append(f"{config.num_heads} heads is not a multiple of {config.num_kv_heads} kv heads")
    if config.head_dim % 2:
        problems.append(f"head_dim {config.head_dim} is odd (RoPE needs pairs)")
    return problems
