"""OLMoE's config, its published size, and its readers for Hugging Face ``config.json`` and GGUF metadata.

As for every family, the parsers live beside the config they build (see ``mtijax.models.gemma3.config``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from mtijax.errors import MtijaxError
from mtijax.weights.fields import as_kind, checked, given, gguf_error, linear_factor, rope_section, token_ids


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


PRESETS: dict[str, OlmoeConfig] = {
    "olmoe-1b-7b": OlmoeConfig(
        vocab_size=50_304, hidden_size=2048, intermediate_size=1024, num_layers=16, num_heads=16, num_kv_heads=16,
        num_experts=64, num_experts_per_tok=8, norm_topk_prob=False, max_position_embeddings=4096),
}
"""allenai/OLMoE-1B-7B-0125: 6.9B parameters, 1.3B active per token."""

HF_OLMOE_DEFAULTS: dict[str, Any] = {
    "vocab_size": 50_304, "hidden_size": 2048, "intermediate_size": 2048, "num_hidden_layers": 16,
    "num_attention_heads": 16, "num_experts": 64, "num_experts_per_tok": 8, "norm_topk_prob": False,
    "rms_norm_eps": 1e-5, "max_position_embeddings": 4096, "rope_theta": 10_000.0, "eos_token_id": 50279,
    "pad_token_id": 1, "tie_word_embeddings": False,
}
"""transformers' ``OlmoeConfig`` defaults."""


def from_hf(raw: Mapping[str, Any], where: str) -> OlmoeConfig:
    """A config from a ``config.json`` of model_type ``olmoe`` (absent fields: :data:`HF_OLMOE_DEFAULTS`)."""
    raw = dict(raw)
    if raw.get("num_local_experts") is not None:  # transformers' other name for num_experts
        raw["num_experts"] = raw.pop("num_local_experts")
    raw = given(raw, HF_OLMOE_DEFAULTS)
    field = lambda kind, key: as_kind(kind, raw[key], key, where)
    rope = rope_section(raw, where)
    if linear_factor(rope, where) != 1.0:
        raise MtijaxError(f"{where}: OLMoE with scaled RoPE is not supported")
    heads = field(int, "num_attention_heads")
    return checked(
        where, OlmoeConfig,
        vocab_size=field(int, "vocab_size"),
        hidden_size=field(int, "hidden_size"),
        intermediate_size=field(int, "intermediate_size"),
        num_layers=field(int, "num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=as_kind(int, raw.get("num_key_value_heads", heads), "num_key_value_heads", where),
        num_experts=field(int, "num_experts"),
        num_experts_per_tok=field(int, "num_experts_per_tok"),
        norm_topk_prob=bool(raw["norm_topk_prob"]),
        clip_qkv=None if raw.get("clip_qkv") is None else field(float, "clip_qkv"),
        rope_base=as_kind(float, rope.get("rope_theta", raw["rope_theta"]), "rope_theta", where),
        rms_norm_eps=field(float, "rms_norm_eps"),
        max_position_embeddings=field(int, "max_position_embeddings"),
        tie_word_embeddings=bool(raw["tie_word_embeddings"]),
        bos_token_id=None if raw.get("bos_token_id") is None else field(int, "bos_token_id"),
        eos_token_ids=token_ids(raw["eos_token_id"], "eos_token_id", where),
        pad_token_id=field(int, "pad_token_id"),
    )


def from_gguf(meta: Mapping[str, Any], vocab_size: int, where: str, extra_eos: tuple[int, ...] = ()) -> OlmoeConfig:
    """A config from GGUF metadata of llama.cpp architecture ``olmoe``.

    llama.cpp sizes OLMoE's experts by ``feed_forward_length``; its converter writes no
    ``expert_feed_forward_length`` for OLMoE (transformers' config has no ``moe_intermediate_size``).
    ``extra_eos`` is not used: the metadata's EOS is OLMoE's only stop token.
    """
    try:
        get = lambda key, *default: meta[f"olmoe.{key}"] if not default else meta.get(f"olmoe.{key}", default[0])
        heads = int(get("attention.head_count"))
        clip = get("attention.clamp_kqv", None)
        bos = meta.get("tokenizer.ggml.bos_token_id")
        return checked(
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
        raise gguf_error(where, e) from None


def summary(config: OlmoeConfig) -> dict[str, Any]:
    """OLMoE's lines of ``mtijax info``: the routing and the parameters one token uses."""
    return {"experts": f"{config.num_experts_per_tok} of {config.num_experts} per token",
            "active_parameters": config.num_active_params}
