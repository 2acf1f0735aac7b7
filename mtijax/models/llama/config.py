"""The Llama line's config (Llama 3, Mistral, Qwen 2, Qwen 3) and its reader for Hugging Face ``config.json``.

The four share one dense decoder block and differ in flags: Qwen 2's q/k/v biases (``qkv_bias``), Qwen 3's
per-head q/k norms (``qk_norm``), Mistral's sliding window (``sliding_window`` with per-layer
``layer_types``), Llama 3's RoPE scaling (``rope_type="llama3"``), tied or untied heads. GGUF files of this
family are not read yet (the loader says so); the parser lives here, beside the config it builds, as for
every family.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from mtijax.errors import MtijaxError
from mtijax.models.layers import FULL, SLIDING, attention_shape_problems
from mtijax.weights.fields import as_kind, checked, given, rope_section, rope_type, token_ids

ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Shapes and hyper-parameters of a Llama-line decoder.

    Attention is grouped-query with RoPE base ``rope_base``; ``rope_type`` is ``"default"``, ``"linear"``
    (frequencies divided by ``rope_factor``) or ``"llama3"`` (Llama 3.1's frequency-dependent scaling by
    ``rope_factor``, ``rope_low_freq_factor``, ``rope_high_freq_factor`` and
    ``rope_original_max_position``). ``layer_types[l]`` is ``"sliding_attention"`` (keys less than
    ``sliding_window`` positions behind the query) or ``"full_attention"``; empty means every layer is
    sliding when ``sliding_window`` is set, full otherwise. ``model_type`` records which Hugging Face family
    the config came from (``llama``, ``mistral``, ``qwen2``, ``qwen3``); the block does not read it.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_base: float = 10_000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 8192
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    tie_word_embeddings: bool = False
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 8192
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    model_type: str = "llama"
    architecture: str = "llama"

    def __post_init__(self) -> None:
        if not self.layer_types:
            kind = SLIDING if self.sliding_window is not None else FULL
            object.__setattr__(self, "layer_types", (kind,) * self.num_layers)
        sizes = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                 "head_dim")
        problems = [f"{name} is {getattr(self, name)}, not positive" for name in sizes if getattr(self, name) <= 0]
        if self.sliding_window is not None and self.sliding_window <= 0:
            problems.append(f"sliding_window is {self.sliding_window}, not positive")
        problems += attention_shape_problems(self)
        if self.rope_type not in ROPE_TYPES:
            problems.append(f"RoPE type {self.rope_type!r} is not supported ({', '.join(ROPE_TYPES)} are)")
        if problems:
            raise MtijaxError("invalid Llama-family config: " + "; ".join(problems))

    @property
    def num_params(self) -> int:
        """Number of parameters (the output head counted unless tied)."""
        d, f, h, n, k = self.hidden_size, self.intermediate_size, self.head_dim, self.num_heads, self.num_kv_heads
        attn = d * h * (2 * n + 2 * k) + (n + 2 * k) * h * self.qkv_bias + d * self.o_bias + 2 * h * self.qk_norm
        per_layer = attn + 3 * d * f + 2 * d
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return self.vocab_size * d + head + self.num_layers * per_layer + d


PRESETS: dict[str, LlamaConfig] = {
    "llama3.1-8b": LlamaConfig(
        vocab_size=128_256, hidden_size=4096, intermediate_size=14_336, num_layers=32, num_heads=32, num_kv_heads=8,
        head_dim=128, rope_base=500_000.0, rope_type="llama3", rope_factor=8.0, rope_low_freq_factor=1.0,
        rope_high_freq_factor=4.0, rope_original_max_position=8192, max_position_embeddings=131_072,
        bos_token_id=128_000, eos_token_ids=(128_001, 128_008, 128_009)),
    "mistral-7b-v0.1": LlamaConfig(
        vocab_size=32_000, hidden_size=4096, intermediate_size=14_336, num_layers=32, num_heads=32, num_kv_heads=8,
        head_dim=128, sliding_window=4096, rms_norm_eps=1e-5, max_position_embeddings=32_768, bos_token_id=1,
        eos_token_ids=(2,), model_type="mistral"),
}
"""Published shapes: Meta-Llama-3.1-8B and Mistral-7B-v0.1 (Mistral-7B-Instruct-v0.2 and later drop the window
and use RoPE base 1e6: read their ``config.json``)."""

HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"vocab_size": 32_000, "hidden_size": 4096, "intermediate_size": 11_008, "num_hidden_layers": 32,
              "num_attention_heads": 32, "rms_norm_eps": 1e-6, "max_position_embeddings": 2048, "bos_token_id": 1,
              "eos_token_id": 2, "attention_bias": False},
    "mistral": {"vocab_size": 32_000, "hidden_size": 4096, "intermediate_size": 14_336, "num_hidden_layers": 32,
                "num_attention_heads": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-6,
                "max_position_embeddings": 131_072, "bos_token_id": 1, "eos_token_id": 2, "sliding_window": 4096},
    "qwen2": {"vocab_size": 151_936, "hidden_size": 4096, "intermediate_size": 22_016, "num_hidden_layers": 32,
              "num_attention_heads": 32, "rms_norm_eps": 1e-6, "max_position_embeddings": 32_768,
              "use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 28},
    "qwen3": {"vocab_size": 151_936, "hidden_size": 4096, "intermediate_size": 22_016, "num_hidden_layers": 32,
              "num_attention_heads": 32, "head_dim": 128, "rms_norm_eps": 1e-6, "max_position_embeddings": 32_768,
              "use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 28, "attention_bias": False},
}
"""transformers' config defaults for each ``model_type`` this family reads (RoPE base 10 000, untied head,
SiLU, no pad token in all four)."""


def _window(model_type: str, raw: Mapping[str, Any], layers: int, where: str) -> tuple[int | None, tuple[str, ...]]:
    """The sliding window and the layer types, as each model type's transformers code decides them."""
    window = raw.get("sliding_window")
    if model_type == "llama":
        return None, (FULL,) * layers
    if model_type in ("qwen2", "qwen3") and not raw.get("use_sliding_window"):
        window = None
    window = None if window is None else as_kind(int, window, "sliding_window", where)
    if raw.get("layer_types") and model_type != "mistral":
        types = as_kind(tuple, raw["layer_types"], "layer_types", where)
    elif model_type == "mistral":
        types = ((SLIDING if window is not None else FULL),) * layers
    else:
        start = as_kind(int, raw.get("max_window_layers", layers), "max_window_layers", where)
        types = tuple(SLIDING if window is not None and i >= start else FULL for i in range(layers))
    if window is None:
        types = (FULL,) * len(types)
    return window, types


def _rope(raw: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The RoPE fields of the config from ``rope_parameters`` / ``rope_scaling`` and ``rope_theta``."""
    rope = rope_section(raw, where)
    kind = rope_type(rope)
    number = lambda key, default: as_kind(float, rope.get(key, default), key, where)
    fields = {"rope_base": number("rope_theta", raw.get("rope_theta", 10_000.0)), "rope_type": kind}
    if kind not in ROPE_TYPES:
        raise MtijaxError(f"{where}: RoPE type {kind!r} is not supported ({', '.join(ROPE_TYPES)} are)")
    if kind != "default":
        fields["rope_factor"] = as_kind(float, rope.get("factor"), f"the {kind} RoPE factor", where)
    if kind == "llama3":
        fields.update(rope_low_freq_factor=number("low_freq_factor", 1.0),
                      rope_high_freq_factor=number("high_freq_factor", 4.0),
                      rope_original_max_position=as_kind(int, rope.get("original_max_position_embeddings", 8192),
                                                         "original_max_position_embeddings", where))
    return fields


def from_hf(raw: Mapping[str, Any], where: str) -> LlamaConfig:
    """A config from a ``config.json`` of model_type ``llama``, ``mistral``, ``qwen2`` or ``qwen3``.

    Absent or null fields take transformers' defaults (:data:`HF_DEFAULTS`), except a null ``sliding_window``,
    which means no window (Mistral 7B v0.2 and later). A SiLU MLP without biases is required (``mlp_bias`` and
    other activations are refused).
    """
    model_type = raw["model_type"]
    no_window = "sliding_window" in raw and raw["sliding_window"] is None
    raw = {**given(raw, HF_DEFAULTS[model_type]), **({"sliding_window": None} if no_window else {})}
    field = lambda kind, key: as_kind(kind, raw[key], key, where)
    if raw.get("hidden_act", "silu") != "silu":
        raise MtijaxError(f"{where}: hidden_act {raw['hidden_act']!r} is not supported (silu is)")
    if raw.get("mlp_bias"):
        raise MtijaxError(f"{where}: mlp_bias is not supported")
    layers, hidden = field(int, "num_hidden_layers"), field(int, "hidden_size")
    heads = field(int, "num_attention_heads")
    window, layer_types = _window(model_type, raw, layers, where)
    attention_bias = bool(raw.get("attention_bias", False))
    eos = raw.get("eos_token_id")
    return checked(
        where, LlamaConfig,
        vocab_size=field(int, "vocab_size"),
        hidden_size=hidden,
        intermediate_size=field(int, "intermediate_size"),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=as_kind(int, raw.get("num_key_value_heads", heads), "num_key_value_heads", where),
        head_dim=as_kind(int, raw.get("head_dim") or hidden // max(heads, 1), "head_dim", where),
        **_rope(raw, where),
        sliding_window=window,
        layer_types=layer_types,
        qkv_bias=model_type == "qwen2" or attention_bias,
        o_bias=model_type != "qwen2" and attention_bias,
        qk_norm=model_type == "qwen3",
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        rms_norm_eps=field(float, "rms_norm_eps"),
        max_position_embeddings=field(int, "max_position_embeddings"),
        bos_token_id=None if raw.get("bos_token_id") is None else field(int, "bos_token_id"),
        eos_token_ids=() if eos is None else token_ids(eos, "eos_token_id", where),
        pad_token_id=None if raw.get("pad_token_id") is None else field(int, "pad_token_id"),
        model_type=model_type,
    )


def summary(config: LlamaConfig) -> dict[str, Any]:
    """The family's lines of ``mtijax info``: which model type, its RoPE and its window."""
    out: dict[str, Any] = {"model_type": config.model_type, "rope": config.rope_type}
    if config.sliding_window is not None:
        n_sliding = sum(t == SLIDING for t in config.layer_types)
        out["sliding_window"] = config.sliding_window
        out["layer_pattern"] = f"{n_sliding} sliding + {config.num_layers - n_sliding} global"
    return out
