"""Configs: the presets have Gemma 3's published shapes, and Hugging Face and GGUF configs mean what transformers
and llama.cpp say they mean. transformers is the reference throughout."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import Gemma3Config as HFGemma3Config
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

from mtijax.config import FULL, PRESETS, SLIDING, Gemma3Config, config_from_gguf, config_from_hf
from mtijax.errors import MtijaxError

PUBLISHED = {
    # The text decoders' fields in the config.json of google/gemma-3-{270m,1b-it,4b-it,12b-it,27b-it}; fields
    # left out there take Gemma3TextConfig's defaults, as they do in transformers.
    "gemma3-270m": dict(vocab_size=262_144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                        num_attention_heads=4, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256,
                        sliding_window=512, max_position_embeddings=32_768),
    "gemma3-1b": dict(vocab_size=262_144, hidden_size=1152, intermediate_size=6912, num_hidden_layers=26,
                      num_attention_heads=4, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256,
                      sliding_window=512, max_position_embeddings=32_768),
    "gemma3-4b": dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=34, sliding_window=1024,
                      rope_scaling={"rope_type": "linear", "factor": 8.0}),
    "gemma3-12b": dict(hidden_size=3840, intermediate_size=15360, num_hidden_layers=48, num_attention_heads=16,
                       num_key_value_heads=8, sliding_window=1024, rope_scaling={"rope_type": "linear", "factor": 8.0}),
    "gemma3-27b": dict(hidden_size=5376, intermediate_size=21504, num_hidden_layers=62, num_attention_heads=32,
                       num_key_value_heads=16, head_dim=128, query_pre_attn_scalar=168, sliding_window=1024,
                       rope_scaling={"rope_type": "linear", "factor": 8.0}),
}

GEMMA_3_4B_IT = {
    # google/gemma-3-4b-it's config.json as published (saved by transformers 4.50: text_config names six fields)
    "architectures": ["Gemma3ForConditionalGeneration"], "boi_token_index": 255999, "eoi_token_index": 256000,
    "eos_token_id": [1, 106], "image_token_index": 262144, "initializer_range": 0.02, "mm_tokens_per_image": 256,
    "model_type": "gemma3", "torch_dtype": "bfloat16", "transformers_version": "4.50.0.dev0",
    "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                    "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                    "sliding_window": 1024},
    "vision_config": {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304,
                      "model_type": "siglip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 27,
                      "patch_size": 14, "vision_use_head": False},
}


def as_mtijax(hf: Gemma3TextConfig, eos_token_id=None) -> Gemma3Config:
    """What a transformers config means, field by field in mtijax's terms: the reference for the tests below."""
    def linear_factor(rope):
        return rope["factor"] if rope["rope_type"] == "linear" else 1.0

    full, local = hf.rope_parameters[FULL], hf.rope_parameters[SLIDING]
    eos = hf.eos_token_id if eos_token_id is None else eos_token_id
    return Gemma3Config(
        vocab_size=hf.vocab_size, hidden_size=hf.hidden_size, intermediate_size=hf.intermediate_size,
        num_layers=hf.num_hidden_layers, num_heads=hf.num_attention_heads, num_kv_heads=hf.num_key_value_heads,
        head_dim=hf.head_dim, query_pre_attn_scalar=hf.query_pre_attn_scalar, sliding_window=hf.sliding_window,
        layer_types=tuple(hf.layer_types), rope_global_base=full["rope_theta"], rope_local_base=local["rope_theta"],
        rope_global_scaling=linear_factor(full), rope_local_scaling=linear_factor(local),
        rms_norm_eps=hf.rms_norm_eps, final_logit_softcap=hf.final_logit_softcapping,
        attn_logit_softcap=hf.attn_logit_softcapping, max_position_embeddings=hf.max_position_embeddings,
        bos_token_id=hf.bos_token_id, eos_token_ids=tuple(eos) if isinstance(eos, list) else (eos,),
        pad_token_id=hf.pad_token_id,
    )


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_has_the_published_shapes(name):
    published = Gemma3TextConfig(**PUBLISHED[name])
    expected = as_mtijax(published)
    assert PRESETS[name] == dataclasses.replace(expected, eos_token_ids=(1, 106))  # the chat models' stop tokens


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_parameter_count_matches_transformers(name):
    """transformers builds the published model on the meta device; its parameters, the tied embedding once."""
    with torch.device("meta"):
        model = Gemma3ForCausalLM(Gemma3TextConfig(**PUBLISHED[name]))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert PRESETS[name].num_params == sum(p.numel() for p in model.parameters())


def test_config_with_linear_rope_and_layer_types_reads_as_transformers_does():
    hf = Gemma3TextConfig(
        vocab_size=1000, hidden_size=96, intermediate_size=200, num_hidden_layers=5, num_attention_heads=6,
        num_key_value_heads=2, head_dim=24, query_pre_attn_scalar=20, sliding_window=7,
        layer_types=[SLIDING, FULL, SLIDING, SLIDING, FULL],
        rope_parameters={FULL: {"rope_type": "linear", "factor": 4.0, "rope_theta": 500_000.0},
                         SLIDING: {"rope_type": "default", "rope_theta": 20_000.0}},
        rms_norm_eps=1e-5, final_logit_softcapping=30.0, attn_logit_softcapping=50.0, max_position_embeddings=4096,
        bos_token_id=3, eos_token_id=[1, 106], pad_token_id=5)
    assert config_from_hf(hf.to_dict()) == as_mtijax(hf)


def test_transformers_4_rope_and_pattern_keys_read_as_transformers_does():
    """``rope_scaling`` (global layers only), ``rope_theta``, ``rope_local_base_freq``, ``sliding_window_pattern``."""
    old = {"model_type": "gemma3_text", "vocab_size": 1000, "hidden_size": 96, "intermediate_size": 200,
           "num_hidden_layers": 7, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 24,
           "sliding_window": 9, "rope_scaling": {"rope_type": "linear", "factor": 8.0}, "rope_theta": 500_000.0,
           "rope_local_base_freq": 20_000.0, "sliding_window_pattern": 3}
    hf = Gemma3TextConfig(**old)
    assert hf.layer_types[:3] == [SLIDING, SLIDING, FULL], "transformers must have read the pattern"
    assert config_from_hf(old) == as_mtijax(hf)


def test_multimodal_config_reads_its_text_part_as_transformers_does():
    """google/gemma-3-4b-it's own config.json: a sparse text_config, the stop tokens at the top level."""
    hf = HFGemma3Config(**GEMMA_3_4B_IT)
    assert config_from_hf(GEMMA_3_4B_IT) == as_mtijax(hf.text_config, eos_token_id=hf.eos_token_id)


def test_absent_fields_take_transformers_defaults():
    assert config_from_hf({"model_type": "gemma3_text"}) == as_mtijax(Gemma3TextConfig())


@pytest.mark.slow
def test_embedded_gguf_has_the_270m_preset_config():
    from mtijax.weights.default import default_model_path
    from mtijax.weights.gguf_file import GGUFFile

    config = GGUFFile(default_model_path()).config()
    preset = PRESETS["gemma3-270m"]
    assert config.rms_norm_eps == pytest.approx(preset.rms_norm_eps)  # GGUF stores it as float32
    assert dataclasses.replace(config, rms_norm_eps=preset.rms_norm_eps) == preset


def test_degenerate_layer_pattern_and_gguf_head_count_are_user_errors():
    """A zero layer pattern or zero GGUF head count is reported, not a ZeroDivisionError."""
    with pytest.raises(MtijaxError, match="sliding_window_pattern"):
        config_from_hf({"model_type": "gemma3_text", "sliding_window_pattern": 0, "layer_types": None})
    meta = {"general.architecture": "gemma3", "gemma3.block_count": 2, "gemma3.embedding_length": 64,
            "gemma3.attention.head_count": 0, "gemma3.feed_forward_length": 128}
    with pytest.raises(MtijaxError, match="x.gguf"):
        config_from_gguf(meta, 256, "x.gguf")
