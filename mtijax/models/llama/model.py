"""The Llama-line decoder (Llama 3, Mistral, Qwen 2, Qwen 3) as pure functions of a params pytree.

Parameters (``L`` layers, matrices stored ``[in, out]`` so a layer is ``x @ W``)::

    embed                 [V, D]      token embedding
    unembed               [D, V]      output head (absent when tied: ``embed.T`` is used)
    final_norm            [D]         RMSNorm weights, applied as w (not 1 + w)
    layers/input_norm     [L, D]
    layers/post_attn_norm [L, D]      the norm before the MLP
    layers/attn/q_proj    [L, D, N*H]   k_proj, v_proj [L, D, K*H], o_proj [L, N*H, D]
    layers/attn/q_bias    [L, N*H]      k_bias, v_bias [L, K*H]        (qkv_bias: Qwen 2)
    layers/attn/o_bias    [L, D]                                       (o_bias)
    layers/attn/q_norm    [L, H]        k_norm [L, H], per head        (qk_norm: Qwen 3)
    layers/mlp/gate_proj  [L, D, F]     up_proj [L, D, F], down_proj [L, F, D]

The block is pre-norm: ``x + attn(norm(x))``, then ``x + mlp(norm(x))`` with a SwiGLU MLP. Its sites are
Gemma 3's (``attn_q``/``attn_k`` before the q/k norm and RoPE, after the biases), so captures and patches
mean the same in both; ``attn_out`` is the o-projection output and the block has no post-norms.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import numpy as np

from mtijax.interventions import Sites
from mtijax.models.layers import (NO_WINDOW, SLIDING, apply_rope, attention, embed_unscaled, project_qkv,
                                  rms_norm, rope_inv_freq, unembed_plain_norm)
from mtijax.models.llama.config import LlamaConfig

Params = dict[str, Any]


def llama3_inv_freq(inv_freq: np.ndarray, factor: float, low_freq_factor: float, high_freq_factor: float,
                    original_max_position: int) -> np.ndarray:
    """Llama 3.1's RoPE scaling of ``inv_freq [H/2]``: wavelengths longer than ``original_max_position /
    low_freq_factor`` are stretched by ``factor``, shorter than ``original / high_freq_factor`` kept, and the
    band between blended smoothly (as transformers' ``_compute_llama3_parameters``). float32."""
    inv_freq = inv_freq.astype(np.float32)
    wavelen = np.float32(2 * math.pi) / inv_freq
    low_wavelen = original_max_position / low_freq_factor
    high_wavelen = original_max_position / high_freq_factor
    scaled = np.where(wavelen > low_wavelen, inv_freq / np.float32(factor), inv_freq)
    smooth = (original_max_position / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / np.float32(factor) + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def inv_freq(config: LlamaConfig) -> np.ndarray:
    """The RoPE inverse frequencies ``[H/2]`` float32 of ``config``'s scaling."""
    if config.rope_type == "linear":
        return rope_inv_freq(config.head_dim, config.rope_base, config.rope_factor)
    base = rope_inv_freq(config.head_dim, config.rope_base)
    if config.rope_type == "llama3":
        return llama3_inv_freq(base, config.rope_factor, config.rope_low_freq_factor, config.rope_high_freq_factor,
                               config.rope_original_max_position)
    return base


def layer_spec(config: LlamaConfig) -> dict[str, np.ndarray]:
    """Per-layer attention settings, stacked ``[L, ...]``: ``window`` (int32; the sliding window on sliding
    layers, unbounded on full ones) and ``inv_freq [L, H/2]`` (the same on every layer)."""
    return {
        "window": np.array([config.sliding_window if t == SLIDING else NO_WINDOW for t in config.layer_types],
                           np.int32),
        "inv_freq": np.tile(inv_freq(config), (config.num_layers, 1)),
    }


def param_shapes(config: LlamaConfig) -> Params:
    """The shape of every parameter, as the same pytree the params use."""
    d, f, h, l = config.hidden_size, config.intermediate_size, config.head_dim, config.num_layers
    q, k = config.num_heads * h, config.num_kv_heads * h
    attn = {"q_proj": (l, d, q), "k_proj": (l, d, k), "v_proj": (l, d, k), "o_proj": (l, q, d)}
    if config.qkv_bias:
        attn.update(q_bias=(l, q), k_bias=(l, k), v_bias=(l, k))
    if config.o_bias:
        attn["o_bias"] = (l, d)
    if config.qk_norm:
        attn.update(q_norm=(l, h), k_norm=(l, h))
    shapes = {
        "embed": (config.vocab_size, d),
        "layers": {"input_norm": (l, d), "post_attn_norm": (l, d), "attn": attn,
                   "mlp": {"gate_proj": (l, d, f), "up_proj": (l, d, f), "down_proj": (l, f, d)}},
        "final_norm": (d,),
    }
    if not config.tie_word_embeddings:
        shapes["unembed"] = (d, config.vocab_size)
    return shapes


_AXES = {
    "embed": ("vocab", "embed"), "unembed": ("embed", "vocab"), "final_norm": ("embed",),
    "input_norm": ("layers", "embed"), "post_attn_norm": ("layers", "embed"),
    "q_proj": ("layers", "embed", "heads"), "k_proj": ("layers", "embed", "kv_heads"),
    "v_proj": ("layers", "embed", "kv_heads"), "o_proj": ("layers", "heads", "embed"),
    "q_bias": ("layers", "heads"), "k_bias": ("layers", "kv_heads"), "v_bias": ("layers", "kv_heads"),
    "o_bias": ("layers", "embed"), "q_norm": ("layers", "head_dim"), "k_norm": ("layers", "head_dim"),
    "gate_proj": ("layers", "embed", "mlp"), "up_proj": ("layers", "embed", "mlp"),
    "down_proj": ("layers", "mlp", "embed"),
}


def param_axes(config: LlamaConfig) -> Params:
    """The logical axis names of every parameter's dimensions, as the same pytree as :func:`param_shapes`."""
    axes = lambda tree: {name: axes(sub) if isinstance(sub, dict) else _AXES[name] for name, sub in tree.items()}
    return axes(param_shapes(config))


embed = embed_unscaled
unembed = unembed_plain_norm


def block(config: LlamaConfig, layer: Params, spec: Mapping[str, jax.Array], x: jax.Array, positions: jax.Array,
          cache_kv: tuple[jax.Array, jax.Array, jax.Array] | None = None, sites: Sites | None = None,
          layout: str = "params") -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """One decoder layer; same contract as ``mtijax.models.gemma3.model.block`` (the biases are separate
    leaves in both layouts, added after the projections)."""
    sites = sites or Sites((), None)
    b, s, _ = x.shape
    n, k_heads, h = config.num_heads, config.num_kv_heads, config.head_dim
    eps = config.rms_norm_eps
    attn = layer["attn"]
    x = sites("resid_pre", x)
    normed = rms_norm(x, layer["input_norm"], eps, plus_one=False)
    q, k, v = project_qkv(normed, attn, n, k_heads, h, layout)
    if config.qkv_bias:
        q = q + attn["q_bias"].reshape(n, h)
        k = k + attn["k_bias"].reshape(k_heads, h)
        v = v + attn["v_bias"].reshape(k_heads, h)
    q, k, v = sites("attn_q", q), sites("attn_k", k), sites("attn_v", v)
    if config.qk_norm:
        q = rms_norm(q, attn["q_norm"], eps, plus_one=False)
        k = rms_norm(k, attn["k_norm"], eps, plus_one=False)
    q = apply_rope(q, positions, spec["inv_freq"])
    k = apply_rope(k, positions, spec["inv_freq"])
    segments = [(k, v, positions)]
    if cache_kv is not None:
        segments.insert(0, cache_kv)
    z = sites("attn_z", attention(q, positions, segments, spec["window"], 1.0 / math.sqrt(h)))
    attn_out = z.reshape(b, s, n * h) @ attn["o_proj"]
    if config.o_bias:
        attn_out = attn_out + attn["o_bias"]
    x = sites("resid_mid", x + sites("attn_out", attn_out))
    mlp = layer["mlp"]
    normed = rms_norm(x, layer["post_attn_norm"], eps, plus_one=False)
    hidden = jax.nn.silu(normed @ mlp["gate_proj"]) * (normed @ mlp["up_proj"])
    x = sites("resid_post", x + sites("mlp_out", hidden @ mlp["down_proj"]))
    return x, (k, v)
