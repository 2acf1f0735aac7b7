"""Gemma 3 text decoder as pure functions of a parameter pytree.

Parameters (``L`` layers, matrices stored ``[in, out]`` so a layer is ``x @ W``)::

    embed                 [V, D]      token embedding, tied output head
    layers/input_norm     [L, D]      RMSNorm weights, applied as (1 + w)
    layers/post_attn_norm [L, D]
    layers/pre_mlp_norm   [L, D]
    layers/post_mlp_norm  [L, D]
    layers/attn/q_proj    [L, D, N*H]
    layers/attn/k_proj    [L, D, K*H]
    layers/attn/v_proj    [L, D, K*H]
    layers/attn/o_proj    [L, N*H, D]
    layers/attn/q_norm    [L, H]
    layers/attn/k_norm    [L, H]
    layers/mlp/gate_proj  [L, D, F]
    layers/mlp/up_proj    [L, D, F]
    layers/mlp/down_proj  [L, F, D]
    final_norm            [D]

Layer ``l`` of the params is ``tree_map(lambda x: x[l], params["layers"])``.
The per-layer differences (sliding window, RoPE frequencies) are arrays in
:func:`layer_spec`, scanned beside the params, so ``mtijax.models.decoder.forward``
is one ``lax.scan`` over the one :func:`block` function.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from mtijax.interventions import Sites
from mtijax.models.gemma3.config import SLIDING, Gemma3Config
from mtijax.models.layers import (NO_WINDOW, apply_rope, attention, gelu_tanh, project_qkv, rms_norm,
                                  rope_inv_freq)

Params = dict[str, Any]


def layer_spec(config: Gemma3Config) -> dict[str, np.ndarray]:
    """Per-layer attention settings, stacked ``[L, ...]``: ``window`` (int32) and ``inv_freq`` (``[L, H/2]``)."""
    local = rope_inv_freq(config.head_dim, config.rope_local_base, config.rope_local_scaling)
    glob = rope_inv_freq(config.head_dim, config.rope_global_base, config.rope_global_scaling)
    sliding = [t == SLIDING for t in config.layer_types]
    return {
        "window": np.array([config.sliding_window if s else NO_WINDOW for s in sliding], np.int32),
        "inv_freq": np.stack([local if s else glob for s in sliding]),
    }


def param_shapes(config: Gemma3Config) -> Params:
    """The shape of every parameter, as the same pytree the params use."""
    d, f, h, n, k, l = (config.hidden_size, config.intermediate_size, config.head_dim,
                        config.num_heads, config.num_kv_heads, config.num_layers)
    return {
        "embed": (config.vocab_size, d),
        "layers": {
            "input_norm": (l, d), "post_attn_norm": (l, d), "pre_mlp_norm": (l, d), "post_mlp_norm": (l, d),
            "attn": {
                "q_proj": (l, d, n * h), "k_proj": (l, d, k * h), "v_proj": (l, d, k * h), "o_proj": (l, n * h, d),
                "q_norm": (l, h), "k_norm": (l, h),
            },
            "mlp": {"gate_proj": (l, d, f), "up_proj": (l, d, f), "down_proj": (l, f, d)},
        },
        "final_norm": (d,),
    }


def param_axes(config: Gemma3Config) -> Params:
    """The logical axis names of every parameter's dimensions, as the same pytree as :func:`param_shapes`."""
    return {
        "embed": ("vocab", "embed"),
        "layers": {
            "input_norm": ("layers", "embed"), "post_attn_norm": ("layers", "embed"),
            "pre_mlp_norm": ("layers", "embed"), "post_mlp_norm": ("layers", "embed"),
            "attn": {
                "q_proj": ("layers", "embed", "heads"), "k_proj": ("layers", "embed", "kv_heads"),
                "v_proj": ("layers", "embed", "kv_heads"), "o_proj": ("layers", "heads", "embed"),
                "q_norm": ("layers", "head_dim"), "k_norm": ("layers", "head_dim"),
            },
            "mlp": {"gate_proj": ("layers", "embed", "mlp"), "up_proj": ("layers", "embed", "mlp"),
                    "down_proj": ("layers", "mlp", "embed")},
        },
        "final_norm": ("embed",),
    }


def embed(config: Gemma3Config, params: Params, tokens: jax.Array) -> jax.Array:
    """Token embeddings scaled by sqrt(D) (the scale rounded to the embedding dtype, as Hugging Face): ``[B, S, D]``."""
    table = params["embed"]
    return table[tokens] * jnp.asarray(math.sqrt(config.hidden_size), table.dtype)


def unembed(config: Gemma3Config, params: Params, x: jax.Array) -> jax.Array:
    """Final norm and tied output head: ``[..., D]`` -> float32 logits ``[..., V]``."""
    x = rms_norm(x, params["final_norm"], config.rms_norm_eps)
    logits = jnp.einsum("...d,vd->...v", x, params["embed"], preferred_element_type=jnp.float32)
    if config.final_logit_softcap is not None:
        logits = jnp.tanh(logits / config.final_logit_softcap) * config.final_logit_softcap
    return logits


def block(config: Gemma3Config, layer: Params, spec: Mapping[str, jax.Array], x: jax.Array, positions: jax.Array,
          cache_kv: tuple[jax.Array, jax.Array, jax.Array] | None = None, sites: Sites | None = None,
          layout: str = "params") -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """One decoder layer.

    Args:
      layer: this layer's params (``params["layers"]`` indexed at ``l``).
      spec: this layer's ``layer_spec`` slice (``window`` scalar, ``inv_freq [H/2]``).
      x: ``[B, S, D]`` residual stream. positions: ``[B, S]`` int32, -1 for padding.
      cache_kv: ``(k [B, T, K, H], v [B, T, K, H], positions [B, T])`` of this
        layer's cache before this call, or None to attend to this call's tokens only.
      sites: patches and captures at the named sites (see ``mtijax.interventions``).
      layout: how ``layer`` holds its weights: ``"params"`` (documented above) or ``"fused_qkv"``
        (``mtijax.models.fused``); a static choice of the caller.
    Returns:
      ``(x [B, S, D], (k, v))``: the new residual stream and this call's keys
      and values ``[B, S, K, H]`` (normed and rotated) for the caller to store.
    """
    sites = sites or Sites((), None)
    b, s, _ = x.shape
    n, k_heads, h = config.num_heads, config.num_kv_heads, config.head_dim
    attn = layer["attn"]
    x = sites("resid_pre", x)
    normed = rms_norm(x, layer["input_norm"], config.rms_norm_eps)
    q, k, v = project_qkv(normed, attn, n, k_heads, h, layout)
    q, k, v = sites("attn_q", q), sites("attn_k", k), sites("attn_v", v)
    q = apply_rope(rms_norm(q, attn["q_norm"], config.rms_norm_eps), positions, spec["inv_freq"])
    k = apply_rope(rms_norm(k, attn["k_norm"], config.rms_norm_eps), positions, spec["inv_freq"])
    segments = [(k, v, positions)]
    if cache_kv is not None:
        segments.insert(0, cache_kv)
    z = attention(q, positions, segments, spec["window"], config.query_pre_attn_scalar ** -0.5,
                  config.attn_logit_softcap)
    z = sites("attn_z", z)
    attn_out = sites("attn_out", z.reshape(b, s, n * h) @ attn["o_proj"])
    x = sites("resid_mid", x + rms_norm(attn_out, layer["post_attn_norm"], config.rms_norm_eps))
    mlp = layer["mlp"]
    normed = rms_norm(x, layer["pre_mlp_norm"], config.rms_norm_eps)
    hidden = gelu_tanh(normed @ mlp["gate_proj"]) * (normed @ mlp["up_proj"])
    mlp_out = sites("mlp_out", hidden @ mlp["down_proj"])
    x = sites("resid_post", x + rms_norm(mlp_out, layer["post_mlp_norm"], config.rms_norm_eps))
    return x, (k, v)
