"""Model configurations: presets, Hugging Face ``config.json`` and GGUF metadata.

A config is a frozen, hashable dataclass so it can be a static argument of
``jax.jit``. It holds the shapes and the per-layer pattern; the per-layer
arrays derived from it (sliding windows, RoPE frequencies) live in
:func:`mtijax.models.gemma3.layer_spec`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping

from mtijax.errors import MtijaxError

SLIDING = "sliding_attention"
FULL = "full_attention"


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
        if len(self.layer_types) != self.num_layers:
            problems.append(f"{len(self.layer_types)} layer types for {self.num_layers} layers")
        if any(t not in (SLIDING, FULL) for t in self.layer_types):
            problems.append(f"unknown layer type in {sorted(set(self.layer_types))}")
        if self.num_kv_heads > 0 and self.num_heads % self.num_kv_heads:
            problems.append(f"{self.num_heads} heads is not a multiple of {self.num_kv_heads} kv heads")
        if self.head_dim % 2:
            problems.append(f"head_dim {self.head_dim} is odd (RoPE needs pairs)")
        if problems:
            raise MtijaxError("invalid Gemma 3 config: " + "; ".join(problems))

    @property
    def num_params(self) -> int:
        """Number of parameters (tied embedding counted once)."""
        d, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
        attn = d * hd * (2 * self.num_heads + 2 * self.num_kv_heads) + 2 * hd
        per_layer = attn + 3 * d * f + 4 * d
        return self.vocab_size * d + self.num_layers * per_layer + d


@dataclasses.dataclass(frozen=True)
class OlmoeConfig:
    """Shapes and hyper-parameters of an OLMoE decoder (mixture of experts in every layer).

    Every layer routes each token to ``num_experts_per_tok`` of ``num_experts``
    SwiGLU experts of width ``intermediate_size`` (softmax over the router
    logits, top-k, renormalised when ``norm_topk_prob``). Attention applies
    RMSNorm to the whole q and k projections and clips q, k, v to
    ``[-clip_qkv, clip_qkv]`` when that is set.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    num_experts: int
    num_experts_per_tok: int
    norm_topk_prob: bool = False
    clip_qkv: float | None = None
    rope_base: float = 10_000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = (50279,)
    pad_token_id: int = 1
    architecture: str = "olmoe"

    def __post_init__(self) -> None:
        problems = []
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                     "num_experts", "num_experts_per_tok"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        if not problems and (self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads):
            problems.append(f"hidden {self.hidden_size}, {self.num_heads} heads and {self.num_kv_heads} kv heads "
                            "do not divide evenly")
        if not problems and self.num_experts_per_tok > self.num_experts:
            problems.append(f"top-k {self.num_experts_per_tok} is larger than the {self.num_experts} experts")
        if not problems and self.head_dim % 2:
            problems.append(f"head_dim {self.head_dim} is odd (RoPE needs pairs)")
        if problems:
            raise MtijaxError("invalid OLMoE config: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        """hidden_size / num_heads."""
        return self.hidden_size // self.num_heads

    @property
    def num_params(self) -> int:
        """Number of parameters (the output head counted unless tied)."""
        d, f, h, e = self.hidden_size, self.intermediate_size, self.head_dim, self.num_experts
        attn = d * h * (2 * self.num_heads + 2 * self.num_kv_heads) + h * (self.num_heads + self.num_kv_heads)
        per_layer = attn + d * e + 3 * e * d * f + 2 * d
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return self.vocab_size * d + head + self.num_layers * per_layer + d

    @property
    def num_active_params(self) -> int:
        """Parameters one token uses (only its top-k experts)."""
        inactive = self.num_experts - self.num_experts_per_tok
        return self.num_params - self.num_layers * inactive * 3 * self.hidden_size * self.intermediate_size


ModelConfig = Gemma3Config | OlmoeConfig
"""Any architecture's config."""


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


PRESETS: dict[str, ModelConfig] = {
    "gemma3-270m": _preset(18, 640, 2048, 4, 1, 256, 512, 262_144, 1.0, 256, 32_768),
    "gemma3-1b": _preset(26, 1152, 6912, 4, 1, 256, 512, 262_144, 1.0, 256, 32_768),
    "gemma3-4b": _preset(34, 2560, 10240, 8, 4, 256, 1024, 262_208, 8.0, 256, 131_072),
    "gemma3-12b": _preset(48, 3840, 15360, 16, 8, 256, 1024, 262_208, 8.0, 256, 131_072),
    "gemma3-27b": _preset(62, 5376, 21504, 32, 16, 128, 1024, 262_208, 8.0, 168, 131_072),
}
"""Published shapes of the Gemma 3 text models (the 4B-27B are the text part of the multimodal models)."""

PRESETS["olmoe-1b-7b"] = OlmoeConfig(
    vocab_size=50_304, hidden_size=2048, intermediate_size=1024, num_layers=16, num_heads=16, num_kv_heads=16,
    num_experts=64, num_experts_per_tok=8, norm_topk_prob=False, max_position_embeddings=4096)
"""allenai/OLMoE-1B-7B-0125: 6.9B parameters, 1.3B active per token."""


def preset(name: str) -> ModelConfig:
    """The config of a published model size, e.g. ``preset("gemma3-12b")``."""
    try:
        return PRESETS[name]
    except KeyError:
        raise MtijaxError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}") from None


HF_TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 262_208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "query_pre_attn_scalar": 256,
    "sliding_window": 4096, "sliding_window_pattern": 6, "rms_norm_eps": 1e-6, "max_position_embeddings": 131_072,
    "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0, "bos_token_id": 2, "eos_token_id": 1,
    "pad_token_id": 0,
}
"""transformers' ``Gemma3TextConfig`` defaults. transformers 4 saved a ``text_config`` without the fields equal
to them: google/gemma-3-4b-it's names only six."""

_KIND_NAMES = {int: "an integer", float: "a number", tuple: "a list"}


def _as(kind: type, value: Any, name: str, where: str) -> Any:
    """``kind(value)``, or a MtijaxError naming the field."""
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise MtijaxError(f"{where}: {name} must be {_KIND_NAMES[kind]}, got {value!r}") from None


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


def _linear_factor(rope: Mapping[str, Any], where: str) -> float:
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return 1.0
    if kind == "linear":
        return _as(float, rope.get("factor"), "the linear RoPE factor", where)
    raise MtijaxError(f"{where}: RoPE type {kind!r} is not supported (default and linear are)")


def _checked(where: str, kind: type = Gemma3Config, **values: Any) -> ModelConfig:
    """``kind(**values)``, with the file the values came from named in its complaints."""
    try:
        return kind(**values)
    except MtijaxError as e:
        raise MtijaxError(f"{where}: {e}") from None


def config_from_hf(raw: Mapping[str, Any], where: str = "config.json") -> ModelConfig:
    """A config from a Hugging Face ``config.json`` dict (``gemma3_text``, the text part of ``gemma3``, ``olmoe``).

    Absent or null fields take transformers' defaults (:data:`HF_TEXT_DEFAULTS`).
    """
    model_type = raw.get("model_type")
    if model_type == "gemma3":
        text = raw.get("text_config") or {}
        if not isinstance(text, Mapping):
            raise MtijaxError(f"{where}: text_config must be an object, got {text!r}")
        raw = {**text, "eos_token_id": raw.get("eos_token_id", text.get("eos_token_id"))}
        model_type = "gemma3_text"
    if model_type == "olmoe":
        return _olmoe_from_hf(raw, where)
    if model_type != "gemma3_text":
        raise MtijaxError(f"{where}: unknown architecture {model_type!r} (supported: gemma3_text, gemma3, olmoe)")
    raw = {**HF_TEXT_DEFAULTS, **{key: value for key, value in raw.items() if value is not None}}
    field = lambda kind, key: _as(kind, raw[key], key, where)
    optional = lambda key: None if raw.get(key) is None else field(float, key)
    layers = field(int, "num_hidden_layers")
    layer_types = raw.get("layer_types") or gemma3_layer_types(layers, field(int, "sliding_window_pattern"))
    full, local = _rope_sections(raw, where)
    eos = raw["eos_token_id"] if isinstance(raw["eos_token_id"], (list, tuple)) else [raw["eos_token_id"]]
    return _checked(
        where,
        vocab_size=field(int, "vocab_size"),
        hidden_size=field(int, "hidden_size"),
        intermediate_size=field(int, "intermediate_size"),
        num_layers=layers,
        num_heads=field(int, "num_attention_heads"),
        num_kv_heads=field(int, "num_key_value_heads"),
        head_dim=field(int, "head_dim"),
        query_pre_attn_scalar=field(float, "query_pre_attn_scalar"),
        sliding_window=field(int, "sliding_window"),
        layer_types=_as(tuple, layer_types, "layer_types", where),
        rope_global_base=_as(float, full.get("rope_theta", raw["rope_theta"]), "rope_theta", where),
        rope_local_base=_as(float, local.get("rope_theta", raw["rope_local_base_freq"]), "rope_theta", where),
        rope_global_scaling=_linear_factor(full, where),
        rope_local_scaling=_linear_factor(local, where),
        rms_norm_eps=field(float, "rms_norm_eps"),
        final_logit_softcap=optional("final_logit_softcapping"),
        attn_logit_softcap=optional("attn_logit_softcapping"),
        max_position_embeddings=field(int, "max_position_embeddings"),
        bos_token_id=field(int, "bos_token_id"),
        eos_token_ids=tuple(_as(int, i, "eos_token_id", where) for i in eos),
        pad_token_id=field(int, "pad_token_id"),
    )


HF_OLMOE_DEFAULTS: dict[str, Any] = {
    "vocab_size": 50_304, "hidden_size": 2048, "intermediate_size": 2048, "num_hidden_layers": 16,
    "num_attention_heads": 16, "num_experts": 64, "num_experts_per_tok": 8, "norm_topk_prob": False,
    "rms_norm_eps": 1e-5, "max_position_embeddings": 4096, "rope_theta": 10_000.0, "eos_token_id": 50279,
    "pad_token_id": 1, "tie_word_embeddings": False,
}
"""transformers' ``OlmoeConfig`` defaults."""


def _olmoe_from_hf(raw: Mapping[str, Any], where: str) -> OlmoeConfig:
    given = {key: value for key, value in raw.items() if value is not None}
    if "num_local_experts" in given:  # transformers' other name for num_experts
        given["num_experts"] = given.pop("num_local_experts")
    raw = {**HF_OLMOE_DEFAULTS, **given}
    field = lambda kind, key: _as(kind, raw[key], key, where)
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if not isinstance(rope, Mapping):
        raise MtijaxError(f"{where}: RoPE settings must be an object, got {rope!r}")
    if _linear_factor(rope, where) != 1.0:
        raise MtijaxError(f"{where}: OLMoE with scaled RoPE is not supported")
    eos = raw["eos_token_id"] if isinstance(raw["eos_token_id"], (list, tuple)) else [raw["eos_token_id"]]
    heads = field(int, "num_attention_heads")
    return _checked(
        where, OlmoeConfig,
        vocab_size=field(int, "vocab_size"),
        hidden_size=field(int, "hidden_size"),
        intermediate_size=field(int, "intermediate_size"),
        num_layers=field(int, "num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=_as(int, raw.get("num_key_value_heads", heads), "num_key_value_heads", where),
        num_experts=field(int, "num_experts"),
        num_experts_per_tok=field(int, "num_experts_per_tok"),
        norm_topk_prob=bool(raw["norm_topk_prob"]),
        clip_qkv=None if raw.get("clip_qkv") is None else field(float, "clip_qkv"),
        rope_base=_as(float, rope.get("rope_theta", raw["rope_theta"]), "rope_theta", where),
        rms_norm_eps=field(float, "rms_norm_eps"),
        max_position_embeddings=field(int, "max_position_embeddings"),
        tie_word_embeddings=bool(raw["tie_word_embeddings"]),
        bos_token_id=None if raw.get("bos_token_id") is None else field(int, "bos_token_id"),
        eos_token_ids=tuple(_as(int, i, "eos_token_id", where) for i in eos),
        pad_token_id=field(int, "pad_token_id"),
    )


def read_hf_config(directory: Path) -> ModelConfig:
    """Read ``directory/config.json``."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise MtijaxError(f"{directory}: no config.json (not a Hugging Face model directory)")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MtijaxError(f"{path}: not valid JSON ({e})") from None
    return config_from_hf(raw, str(path))


def config_from_gguf(meta: Mapping[str, Any], vocab_size: int, where: str,
                     extra_eos: tuple[int, ...] = ()) -> ModelConfig:
    """A config from GGUF metadata (llama.cpp architectures ``gemma3`` and ``olmoe``).

    GGUF does not record ``query_pre_attn_scalar``, the local RoPE base or the
    layer pattern; like llama.cpp we take head_dim (hidden / heads for the
    62-layer 27B), 10 000 and one global layer in six. ``extra_eos`` adds stop
    tokens the metadata does not name (the chat models' ``<end_of_turn>``).
    """
    arch = meta.get("general.architecture")
    if arch == "olmoe":
        return _olmoe_from_gguf(meta, vocab_size, where)
    if arch != "gemma3":
        raise MtijaxError(f"{where}: unknown GGUF architecture {arch!r} (supported: gemma3, olmoe)")
    try:
        get = lambda key, *default: meta[f"gemma3.{key}"] if not default else meta.get(f"gemma3.{key}", default[0])
        layers, hidden, heads = int(get("block_count")), int(get("embedding_length")), int(get("attention.head_count"))
        head_dim = int(get("attention.key_length", hidden // heads))
        scaling = 1.0
        if get("rope.scaling.type", "none") == "linear":
            scaling = float(get("rope.scaling.factor"))
        eos = [int(meta.get("tokenizer.ggml.eos_token_id", 1))]
        eos += [i for i in extra_eos if i not in eos]
        return _checked(
            where,
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
        raise MtijaxError(f"{where}: missing or malformed GGUF metadata {e}") from None


def _olmoe_from_gguf(meta: Mapping[str, Any], vocab_size: int, where: str) -> OlmoeConfig:
    """llama.cpp sizes OLMoE's experts by ``feed_forward_length``; its converter writes no
    ``expert_feed_forward_length`` for OLMoE (transformers' config has no ``moe_intermediate_size``)."""
    try:
        get = lambda key, *default: meta[f"olmoe.{key}"] if not default else meta.get(f"olmoe.{key}", default[0])
        heads = int(get("attention.head_count"))
        clip = get("attention.clamp_kqv", None)
        bos = meta.get("tokenizer.ggml.bos_token_id")
        return _checked(
            where, OlmoeConfig,
            vocab_size=vocab_size,
            hidden_size=int(get("embedding_length")),
            intermediate_size=int(get("feed_forward_length")),
            num_layers=int(get("block_count")),
            num_heads=heads,
            num_kv_heads=int(get("attention.head_count_kv", heads)),
            num_experts=int(get("expert_count")),
            num_experts_per_tok=int(get("expert_used_count")),
            norm_topk_prob=bool(get("expert_weights_norm", False)),
            clip_qkv=None if clip is None else float(clip),
            rope_base=float(get("rope.freq_base", 10_000.0)),
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            max_position_embeddings=int(get("context_length", 4096)),
            bos_token_id=None if bos is None else int(bos),
            eos_token_ids=(int(meta.get("tokenizer.ggml.eos_token_id", 50279)),),
            pad_token_id=int(meta.get("tokenizer.ggml.padding_token_id", 1)),
        )
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
        raise MtijaxError(f"{where}: missing or malformed GGUF metadata {e}") from None


def _human(count: int) -> str:
    return f"{count / 1e6:.1f}M" if count < 1e9 else f"{count / 1e9:.2f}B"


def describe(config: ModelConfig) -> dict[str, Any]:
    """A JSON-friendly summary used by ``mtijax info``."""
    summary = {
        "architecture": config.architecture,
        "layers": config.num_layers,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "heads": config.num_heads,
        "kv_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "vocab_size": config.vocab_size,
    }
    if isinstance(config, OlmoeConfig):
        summary["experts"] = f"{config.num_experts_per_tok} of {config.num_experts} per token"
        summary["active_parameters"] = config.num_active_params
    else:
        n_full = sum(t == FULL for t in config.layer_types)
        summary["sliding_window"] = config.sliding_window
        summary["layer_pattern"] = f"{config.num_layers - n_full} sliding + {n_full} global"
    summary["parameters"] = config.num_params
    summary["params_human"] = _human(config.num_params)
    return summary
