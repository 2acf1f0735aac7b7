"""OLMoE decoder (a mixture of SwiGLU experts in every layer) as pure functions of a params pytree.

Parameters (``L`` layers, ``E`` experts of width ``F``, matrices ``[in, out]``)::

    embed                 [V, D]
    unembed               [D, V]        output head (absent when tied: ``embed.T`` is used)
    final_norm            [D]
    layers/input_norm     [L, D]        RMSNorm weights, applied as w (not 1 + w)
    layers/post_attn_norm [L, D]
    layers/attn/q_proj    [L, D, N*H]   k_proj, v_proj [L, D, K*H], o_proj [L, N*H, D]
    layers/attn/q_norm    [L, N*H]      RMSNorm over the whole q projection
    layers/attn/k_norm    [L, K*H]
    layers/moe/router     [L, D, E]
    layers/moe/gate_proj  [L, E, D, F]  up_proj [L, E, D, F], down_proj [L, E, F, D]

Routing is exact, with no capacity limit: every token reaches its top-k
experts. Five dispatches give the same result (tested against each other and
against transformers):

- ``gathered`` gathers the weights of each token-expert pair's expert and runs
  one batched matrix-vector product per pair: it reads only the chosen experts,
  so it is the decode dispatch (fewer pairs than experts);
- ``grouped`` sorts the pairs by expert and runs each expert's matrices once
  over its group with ``jax.lax.ragged_dot`` (``k / E`` of the dense work);
- ``in_place`` computes what ``gathered`` does with two Pallas kernels that read
  the chosen experts' matrices where they are (``mtijax.models.olmoe.kernels``);
- ``tiled`` computes what ``grouped`` does with a Pallas grouped matrix product over row tiles that each
  belong to one expert (``mtijax.models.olmoe.kernels.experts_tiled``);
- ``dense`` runs every expert on every token and mixes with the (mostly zero)
  routing weights.

:func:`choose_dispatch` picks by the number of tokens, from
``experiments/bench_moe.py`` on an H100 (OLMoE-1B-7B layer, jax 0.11): grouped
beat dense 1.6x at 1-8 tokens and 1.1x at 64, but dense beat grouped 3.3x at 512
and 4.7x at 4096 tokens (XLA's GPU ``ragged_dot`` is far from a tuned grouped
GEMM), so without the Pallas kernels prefill of long prompts runs dense. On GPUs the many-token dispatch is
``tiled`` (its measurement is in ``experiments/results/bench_moe_h200.json``).
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from mtijax.interventions import Sites
from mtijax.models.olmoe import kernels
from mtijax.models.olmoe.config import OlmoeConfig
from mtijax.models.layers import (NO_WINDOW, apply_rope, attention, embed_unscaled, project_qkv, rms_norm,
                                  rope_inv_freq, unembed_plain_norm)

Params = dict[str, Any]
GROUPED_MAX_TOKENS = 128
"""Above this many tokens in one call, ``dense`` is chosen over ``grouped`` (see the module docstring)."""


def layer_spec(config: OlmoeConfig) -> dict[str, np.ndarray]:
    """Per-layer attention settings (the same for every OLMoE layer), stacked ``[L, ...]``."""
    inv_freq = rope_inv_freq(config.head_dim, config.rope_base)
    return {
        "window": np.full((config.num_layers,), NO_WINDOW, np.int32),
        "inv_freq": np.tile(inv_freq, (config.num_layers, 1)),
    }


def param_shapes(config: OlmoeConfig) -> Params:
    """The shape of every parameter, as the same pytree the params use."""
    d, f, e, l = config.hidden_size, config.intermediate_size, config.num_experts, config.num_layers
    q, k = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    shapes = {
        "embed": (config.vocab_size, d),
        "layers": {
            "input_norm": (l, d), "post_attn_norm": (l, d),
            "attn": {"q_proj": (l, d, q), "k_proj": (l, d, k), "v_proj": (l, d, k), "o_proj": (l, q, d),
                     "q_norm": (l, q), "k_norm": (l, k)},
            "moe": {"router": (l, d, e), "gate_proj": (l, e, d, f), "up_proj": (l, e, d, f),
                    "down_proj": (l, e, f, d)},
        },
        "final_norm": (d,),
    }
    if not config.tie_word_embeddings:
        shapes["unembed"] = (d, config.vocab_size)
    return shapes


def param_axes(config: OlmoeConfig) -> Params:
    """The logical axis names of every parameter's dimensions, as the same pytree as :func:`param_shapes`."""
    axes = {
        "embed": ("vocab", "embed"),
        "layers": {
            "input_norm": ("layers", "embed"), "post_attn_norm": ("layers", "embed"),
            "attn": {"q_proj": ("layers", "embed", "heads"), "k_proj": ("layers", "embed", "kv_heads"),
                     "v_proj": ("layers", "embed", "kv_heads"), "o_proj": ("layers", "heads", "embed"),
                     "q_norm": ("layers", "heads"), "k_norm": ("layers", "kv_heads")},
            "moe": {"router": ("layers", "embed", "experts"), "gate_proj": ("layers", "experts", "embed", "mlp"),
                    "up_proj": ("layers", "experts", "embed", "mlp"),
                    "down_proj": ("layers", "experts", "mlp", "embed")},
        },
        "final_norm": ("embed",),
    }
    if not config.tie_word_embeddings:
        axes["unembed"] = ("embed", "vocab")
    return axes


embed = embed_unscaled
unembed = unembed_plain_norm


def route(config: OlmoeConfig, logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Top-k routing from routing logits ``[..., E]``: ``(experts [..., k] int32, weights [..., k] float32)``.

    Softmax in float32 over all experts, the k most probable (best first),
    renormalised to sum to 1 when ``norm_topk_prob``.
    """
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, config.num_experts_per_tok)
    if config.norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return experts.astype(jnp.int32), weights


def choose_dispatch(config: OlmoeConfig, num_tokens: int) -> str:
    """``"gathered"`` while there are fewer token-expert pairs than experts (decoding a small batch),
    ``"grouped"`` up to :data:`GROUPED_MAX_TOKENS` tokens, ``"dense"`` above (see the module docstring).

    On GPUs, where the kernels of :mod:`mtijax.models.olmoe.kernels` take the layer's widths and unless
    ``MTIJAX_PALLAS=0`` (read when a step is traced), ``"gathered"`` becomes ``"in_place"`` (the same products,
    the experts read where they are) and every larger call takes ``"tiled"`` (one grouped matrix product)."""
    kernels_run = (jax.default_backend() == "gpu" and os.environ.get("MTIJAX_PALLAS", "1") != "0"
                   and kernels.fits(config.hidden_size, config.intermediate_size))
    if num_tokens * config.num_experts_per_tok < config.num_experts:
        return "in_place" if kernels_run else "gathered"
    if kernels_run:
        return "tiled"
    return "grouped" if num_tokens <= GROUPED_MAX_TOKENS else "dense"


def experts_gathered(moe: Params, x: jax.Array, experts: jax.Array, weights: jax.Array) -> jax.Array:
    """Each token-expert pair's expert weights gathered and applied to its token: reads only the chosen experts.

    ``x [T, D]``, ``experts/weights [T, k]``; the gathered weights are ``[T * k, D, F]``, so this is for a few pairs.
    """
    tokens, k = experts.shape
    flat = experts.reshape(-1)
    xs = jnp.repeat(x, k, axis=0)
    hidden = jax.nn.silu(jnp.einsum("pd,pdf->pf", xs, moe["gate_proj"][flat])) * \
        jnp.einsum("pd,pdf->pf", xs, moe["up_proj"][flat])
    out = jnp.einsum("pf,pfd->pd", hidden, moe["down_proj"][flat]).astype(jnp.float32)
    out = out * weights.reshape(-1, 1).astype(jnp.float32)
    return out.reshape(tokens, k, -1).sum(axis=1).astype(x.dtype)


def experts_dense(moe: Params, x: jax.Array, experts: jax.Array, weights: jax.Array) -> jax.Array:
    """Every expert on every token, mixed by the routing weights. ``x [T, D]``, ``experts/weights [T, k]``."""
    num_experts = moe["router"].shape[-1]
    mix = jnp.sum(jax.nn.one_hot(experts, num_experts, dtype=jnp.float32) * weights[..., None], axis=-2)
    hidden = jax.nn.silu(jnp.einsum("td,edf->tef", x, moe["gate_proj"])) * jnp.einsum("td,edf->tef", x, moe["up_proj"])
    out = jnp.einsum("tef,efd->ted", hidden, moe["down_proj"]).astype(jnp.float32)
    return jnp.einsum("ted,te->td", out, mix).astype(x.dtype)


def experts_grouped(moe: Params, x: jax.Array, experts: jax.Array, weights: jax.Array) -> jax.Array:
    """Token-expert pairs sorted by expert, one grouped matmul per projection (``lax.ragged_dot``)."""
    tokens, k = experts.shape
    num_experts = moe["router"].shape[-1]
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    token_of = (order // k).astype(jnp.int32)
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    xs = x[token_of]
    hidden = jax.nn.silu(jax.lax.ragged_dot(xs, moe["gate_proj"], group_sizes)) * \
        jax.lax.ragged_dot(xs, moe["up_proj"], group_sizes)
    out = jax.lax.ragged_dot(hidden, moe["down_proj"], group_sizes).astype(jnp.float32)
    out = out * weights.reshape(-1)[order][:, None].astype(jnp.float32)
    return jnp.zeros((tokens, x.shape[-1]), jnp.float32).at[token_of].add(out).astype(x.dtype)


DISPATCHES = {"gathered": experts_gathered, "in_place": kernels.experts_gathered_in_place, "grouped": experts_grouped,
              "tiled": kernels.experts_tiled, "dense": experts_dense}
"""Expert dispatch name -> function ``(moe, x [T, D], experts [T, k], weights [T, k]) -> [T, D]``."""


def block(config: OlmoeConfig, layer: Params, spec: Mapping[str, jax.Array], x: jax.Array, positions: jax.Array,
          cache_kv: tuple[jax.Array, jax.Array, jax.Array] | None = None, sites: Sites | None = None,
          layout: str = "params", dispatch: str | None = None) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """One OLMoE layer; same contract as ``mtijax.models.gemma3.model.block``.

    The router's logits pass through ``sites.route`` (a router hook, e.g. the spiking gate of
    ``mtijax.snn.gate``, when the caller gives one; the identity otherwise) before the top-k.
    ``dispatch`` forces one of :data:`DISPATCHES` (default: :func:`choose_dispatch`).
    """
    sites = sites or Sites((), None)
    b, s, d = x.shape
    n, k_heads, h = config.num_heads, config.num_kv_heads, config.head_dim
    eps = config.rms_norm_eps
    attn = layer["attn"]
    x = sites("resid_pre", x)
    normed = rms_norm(x, layer["input_norm"], eps, plus_one=False)
    q, k, v = project_qkv(normed, attn, n, k_heads, h, layout)
    q, k, v = sites("attn_q", q), sites("attn_k", k), sites("attn_v", v)
    q = rms_norm(q.reshape(b, s, n * h), attn["q_norm"], eps, plus_one=False).reshape(b, s, n, h)
    k = rms_norm(k.reshape(b, s, k_heads * h), attn["k_norm"], eps, plus_one=False).reshape(b, s, k_heads, h)
    if config.clip_qkv is not None:
        q, k, v = (jnp.clip(t, -config.clip_qkv, config.clip_qkv) for t in (q, k, v))
    q = apply_rope(q, positions, spec["inv_freq"])
    k = apply_rope(k, positions, spec["inv_freq"])
    segments = [(k, v, positions)]
    if cache_kv is not None:
        segments.insert(0, cache_kv)
    z = sites("attn_z", attention(q, positions, segments, spec["window"], 1.0 / math.sqrt(h)))
    x = sites("resid_mid", x + sites("attn_out", z.reshape(b, s, n * h) @ attn["o_proj"]))
    moe = layer["moe"]
    normed = rms_norm(x, layer["post_attn_norm"], eps, plus_one=False).reshape(b * s, d)
    logits = sites("router_logits", (normed @ moe["router"]).reshape(b, s, -1))
    experts, weights = route(config, sites.route(logits, positions))
    sites.record("router_experts", experts)
    sites.record("router_weights", weights)
    run = DISPATCHES[dispatch or choose_dispatch(config, b * s)]
    out = run(moe, normed, experts.reshape(b * s, -1), weights.reshape(b * s, -1).astype(x.dtype))
    x = sites("resid_post", x + sites("mlp_out", out.reshape(b, s, d)))
    return x, (k, v)


def _row_weights(router_logits: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Per-row weights ``[L, B, S]``: the token mask (1 = real token) broadcast over layers."""
    shape = router_logits.shape[:-1]
    return jnp.ones(shape, jnp.float32) if mask is None else jnp.broadcast_to(mask.astype(jnp.float32), shape)


def load_balancing_loss(router_logits: jax.Array, experts: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Switch-Transformer load-balancing loss from captured routing, as transformers computes it for OLMoE.

    ``E * sum_e f_e * p_e``: ``f_e`` the top-k assignments to expert ``e`` and
    ``p_e`` its softmax probability, each summed over every layer and token
    and divided by the number of (layer, token) rows.

    Args:
      router_logits: ``[L, B, S, E]`` (the ``router_logits`` site).
      experts: ``[L, B, S, k]`` (the ``router_experts`` site).
      mask: ``[B, S]``, 1 for real tokens, 0 for padding; default all real.
    """
    num_experts = router_logits.shape[-1]
    weights = _row_weights(router_logits, mask)
    rows = jnp.sum(weights)
    assigned = jnp.sum(jax.nn.one_hot(experts, num_experts) * weights[..., None, None], axis=(0, 1, 2, 3)) / rows
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    mean_prob = jnp.sum(probs * weights[..., None], axis=(0, 1, 2)) / rows
    return num_experts * jnp.sum(assigned * mean_prob)


def router_z_loss(router_logits: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """ST-MoE router z-loss: the mean over (layer, token) rows of ``logsumexp(router_logits) ** 2``."""
    weights = _row_weights(router_logits, mask)
    lse = jax.nn.logsumexp(router_logits.astype(jnp.float32), axis=-1)
    return jnp.sum(weights * lse**2) / jnp.sum(weights)
