"""Gemma 3's config, its published sizes, and its readers for Hugging Face ``config.json`` and GGUF metadata.

A config is a frozen, hashable dataclass so it can be a static argument of ``jax.jit``. It holds the shapes
and the per-layer pattern; the per-layer arrays derived from it (sliding windows, RoPE frequencies) live in
:func:`mtijax.models.gemma3.model.layer_spec`. The parsers live here, beside the config they build, and use
the field readers of ``mtijax.weights.fields``; ``mtijax.weights.configs`` picks the family for a file.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from mtijax.errors import MtijaxError
from mtijax.models.layers import FULL, SLIDING, attention_shape_problems
from mtijax.weights.fields import as_kind, checked, given, gguf_error, linear_factor, token_ids

__all__ = ["FULL", "SLIDING", "Gemma3Config", "PRESETS", "HF_TEXT_DEFAULTS", "gemma3_layer_types", "from_hf",
           "from_gguf", "summary"]


@dataclasses.dataclass(frozen=True)
class Gemma3Config:
    """Shapes and hyper-parameters of a Gemma 3 text decoder.

    ``layer_types[l]`` is ``"sliding_attention"`` or ``"full_attention"``.
    Sliding layers attend to keys whose position is less than
    ``sliding_window`` behind the query and use RoPE base ``rope_local_base``;
    full layers use ``rope_global_base`` with positions divided by
    ``rope_global_scaling`` (linear RoPE scaling; 1.0 means none).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    query_pre_attn_scalar: float
    sliding_window: int
    layer_types: tuple[str, ...]
    rope_global_base: float = 1_000_000.0
    rope_local_base: float = 10_000.0
    rope_global_scaling: float = 1.0
    rope_local_scaling: float = 1.0
    rms_norm_eps: float = 1e-6
    final_logit_softcap: float | None = None
    attn_logit_softcap: float | None = None
    max_position_embeddings: int = 32_768
    bos_token_id: int = 2
    eos_token_ids: tuple[int, ...] = (1, 106)
    pad_token_id: int = 0
    architecture: str = "gemma3"

    def __post_init__(self) -> None:
        sizes = {"vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
                 "intermediate_size": self.intermediate_size, "num_layers": self.num_layers,
                 "num_heads": self.num_heads, "num_kv_heads": self.num_kv_heads, "head_dim": self.head_dim,
                 "sliding_window": self.sliding_window}
        problems = [f"{name} is {value}, not positive" for name, value in sizes.items() if value <= 0]
        problems += attention_shape_problems(self)
        if problems:
            raise MtijaxError("invalid Gemma 3 config: " + "; ".join(problems))

    @property
    def num_params(self) -> int:
        """Number of parameters (tied embedding counted once)."""
        d, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
        attn = d * hd * (2 * self.num_heads + 2 * self.num_kv_heads) + 2 * hd
        per_layer = attn + 3 * d * f + 4 * d
        return self.vocab_size * d + self.num_layers * per_layer + d


def gemma3_layer_types(num_layers: int, pattern: int = 6) -> tuple[str, ...]:
    """Gemma 3's default pattern: every ``pattern``-th layer is global, the rest sliding."""
    if pattern < 1:
        raise MtijaxError(f"sliding_window_pattern must be at least 1, got {pattern}")
    return tuple(FULL if (i + 1) % pattern == 0 else SLIDING for i in range(num_layers))


def _preset(layers: int, hidden: int, ffn: int, heads: int, kv: int, head_dim: int, window: int,
            vocab: int, scaling: float, qpas: float, context: int) -> Gemma3Config:
    return Gemma3Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_layers=layers,
        num_heads=heads, num_kv_heads=kv, head_dim=head_dim, query_pre_attn_scalar=qpas,
        sliding_window=window, layer_types=gemma3_layer_types(layers),
        rope_global_scaling=scaling, max_position_embeddings=context,
    )


PRESETS: dict[str, Gemma3Config] = {
    "gemma3-270m": _preset(18, 640, 2048, 4, 1, 256, 512, 262_144, 1.0, 256, 32_768),
    "gemma3-1b": _preset(26, 1152, 6912, 4, 1, 256, 512, 262_144, 1.0, 256, 32_768),
    "gemma3-4b": _preset(34, 2560, 10240, 8, 4, 256, 1024, 262_208, 8.0, 256, 131_072),
    "gemma3-12b": _preset(48, 3840, 15360, 16, 8, 256, 1024, 262_208, 8.0, 256, 131_072),
    "gemma3-27b": _preset(62, 5376, 21504, 32, 16, 128, 1024, 262_208, 8.0, 168, 131_072),
}
"""Published shapes of the Gemma 3 text models (the 4B-27B are the text part of the multimodal models)."""

HF_TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 262_208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "query_pre_attn_scalar": 256,
    "sliding_window": 4096, "sliding_window_pattern": 6, "rms_norm_eps": 1e-6, "max_position_embeddings": 131_072,
    "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0, "bos_token_id": 2, "eos_token_id": 1,
    "pad_token_id": 0,
}
"""transformers' ``Gemma3TextConfig`` defaults. transformers 4 saved a ``text_config`` without the fields equal
to them: google/gemma-3-4b-it's names only six."""


def _rope_sections(raw: Mapping[str, Any], where: str) -> tuple[Mapping[str, Any], Mapping[str, Any]]:
    """The global and local layers' RoPE settings: per-layer-type ``rope_parameters`` (transformers 5), or
    ``rope_scaling`` for the global layers (transformers 4)."""
    rope = raw.get("rope_parameters") or {}
    if isinstance(rope, Mapping) and (FULL in rope or SLIDING in rope):
        full, local = rope.get(FULL) or {}, rope.get(SLIDING) or {}
    else:
        full, local = raw.get("rope_scaling") or {}, {}
    for section in (full, local):
        if not isinstance(section, Mapping):
            raise MtijaxError(f"{where}: RoPE settings must be objects, got {section!r}")
    return full, local


def from_hf(raw: Mapping[str, Any], where: str) -> Gemma3Config:
    """A config from a ``config.json`` of model_type ``gemma3_text``, or the text part of a ``gemma3``.

    Absent or null fields take transformers' defaults (:data:`HF_TEXT_DEFAULTS`).
    """
    if raw.get("model_type") == "gemma3":
        text = raw.get("text_config") or {}
        if not isinstance(text, Mapping):
            raise MtijaxError(f"{where}: text_config must be an object, got {text!r}")
        raw = {**text, "eos_token_id": raw.get("eos_token_id", text.get("eos_token_id"))}
    raw = given(raw, HF_TEXT_DEFAULTS)
    field = lambda kind, key: as_kind(kind, raw[key], key, where)
    optional = lambda key: None if raw.get(key) is None else field(float, key)
    layers = field(int, "num_hidden_layers")
    layer_types = raw.get("layer_types") or gemma3_layer_types(layers, field(int, "sliding_window_pattern"))
    full, local = _rope_sections(raw, where)
    return checked(
        where, Gemma3Config,
        vocab_size=field(int, "vocab_size"),
        hidden_size=field(int, "hidden_size"),
        intermediate_size=field(int, "intermediate_size"),
        num_layers=layers,
        num_heads=field(int, "num_attention_heads"),
        num_kv_heads=field(int, "num_key_value_heads"),
        head_dim=field(int, "head_dim"),
        query_pre_attn_scalar=field(float, "query_pre_attn_scalar"),
        sliding_window=field(int, "sliding_window"),
        layer_types=as_kind(tuple, layer_types, "layer_types", where),
        rope_global_base=as_kind(float, full.get("rope_theta", raw["rope_theta"]), "rope_theta", where),
        rope_local_base=as_kind(float, local.get("rope_theta", raw["rope_local_base_freq"]), "rope_theta", where),
        rope_global_scaling=linear_factor(full, where),
        rope_local_scaling=linear_factor(local, where),
        rms_norm_eps=field(float, "rms_norm_eps"),
        final_logit_softcap=optional("final_logit_softcapping"),
        attn_logit_softcap=optional("attn_logit_softcapping"),
        max_position_embeddings=field(int, "max_position_embeddings"),
        bos_token_id=field(int, "bos_token_id"),
        eos_token_ids=token_ids(raw["eos_token_id"], "eos_token_id", where),
        pad_token_id=field(int, "pad_token_id"),
    )


def from_gguf(meta: Mapping[str, Any], vocab_size: int, where: str, extra_eos: tuple[int, ...] = ()) -> Gemma3Config:
    """A config from GGUF metadata of llama.cpp architecture ``gemma3``.

    GGUF does not record ``query_pre_attn_scalar``, the local RoPE base or the
    layer pattern; like llama.cpp we take head_dim (hidden / heads for the
    62-layer 27B), 10 000 and one global layer in six. ``extra_eos`` adds stop
    tokens the metadata does not name (the chat models' ``<end_of_turn>``).
    """
    try:
        get = lambda key, *default: meta[f"gemma3.{key}"] if not default else meta.get(f"gemma3.{key}", default[0])
        layers, hidden, heads = int(get("block_count")), int(get("embedding_length")), int(get("attention.head_count"))
        head_dim = int(get("attention.key_length", hidden // heads))
        scaling = 1.0
        if get("rope.scaling.type", "none") == "linear":
            scaling = float(get("rope.scaling.factor"))
        eos = [int(meta.get("tokenizer.ggml.eos_token_id", 1))]
        eos += [i for i in extra_eos if i not in eos]
        return checked(
            where, Gemma3Config,
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=int(get("feed_forward_length")),
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=int(get("attention.head_count_kv", heads)),
            head_dim=head_dim,
            query_pre_attn_scalar=float(hidden // heads if layers == 62 else head_dim),
            sliding_window=int(get("attention.sliding_window", 4096)),
            layer_types=gemma3_layer_types(layers),
            rope_global_base=float(get("rope.freq_base", 1_000_000.0)),
            rope_global_scaling=scaling,
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
            max_position_embeddings=int(get("context_length", 32_768)),
            bos_token_id=int(meta.get("tokenizer.ggml.bos_token_id", 2)),
            eos_token_ids=tuple(eos),
            pad_token_id=int(meta.get("tokenizer.ggml.padding_token_id", 0)),
        )
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
        raise gguf_error(where, e) from None


def summary(config: Gemma3Config) -> dict[str, Any]:
    """Gemma 3's lines of ``mtijax info``: the window and the sliding/global pattern."""
    n_full = sum(t == FULL for t in config.layer_types)
    return {"sliding_window": config.sliding_window,
            "layer_pattern": f"{config.num_layers - n_full} sliding + {n_full} global"}
