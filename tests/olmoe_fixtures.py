"""Tiny random OLMoE checkpoints written by transformers, and the same weights as llama.cpp-style GGUF files.

Every tiny model has vocabulary 256, hidden size 64 (4 heads of 16) and
experts of width 32, so each matrix row is a whole number of 32-value Q8_0
blocks. Weights are redrawn with a larger spread than transformers' init
(norms in [0.5, 1.5], embeddings of unit scale) so routing, clipping and the
greedy continuations depend on every parameter.
"""

from __future__ import annotations

import re
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors.numpy import load_file

OLMOE_CONFIGS = {
    # OLMoE's own routing (top-k probabilities not renormalised); multi-head attention, as llama.cpp requires
    "e4_top2": dict(num_hidden_layers=3, num_key_value_heads=4, num_experts=4, num_experts_per_tok=2,
                    norm_topk_prob=False),
    # renormalised top-3 of 6; q, k and v clipped to [-1, 1] (most |v| are larger: see test_clip_qkv_clips)
    "e6_top3_norm_clip": dict(num_hidden_layers=2, num_key_value_heads=4, num_experts=6, num_experts_per_tok=3,
                              norm_topk_prob=True, clip_qkv=1.0),
    # a single expert per token out of 8; grouped-query attention (2 kv heads for 4 query heads)
    "e8_top1_gqa": dict(num_hidden_layers=2, num_key_value_heads=2, num_experts=8, num_experts_per_tok=1,
                        norm_topk_prob=False),
}
EOS = 1


def make_olmoe_model(variant: str, seed: int = 0):
    """A random ``OlmoeForCausalLM`` (CPU, float32) for one of ``OLMOE_CONFIGS``."""
    from transformers import OlmoeConfig, OlmoeForCausalLM

    torch.manual_seed(seed)
    config = OlmoeConfig(vocab_size=256, hidden_size=64, intermediate_size=32, num_attention_heads=4,
                         max_position_embeddings=256, pad_token_id=0, bos_token_id=None, eos_token_id=EOS,
                         **OLMOE_CONFIGS[variant])
    model = OlmoeForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif "embed" in name:
                p.normal_(0.0, 1.0)
            else:
                p.normal_(0.0, 0.2)
    return model


def read_checkpoint(directory: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors checkpoint, by its stored name."""
    tensors = {}
    for shard in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def roundtrip(value: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """``value`` quantized to ``qtype`` and back (blocks run along the last axis, as in a GGUF row)."""
    return gguf.quants.dequantize(gguf.quants.quantize(value, qtype), qtype).reshape(value.shape)


def llama_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """``weight [heads * H, in]`` with each head's rows reordered from halves to interleaved pairs
    (rows ``0, H/2, 1, H/2 + 1, ...``): the layout llama.cpp's converter gives the q and k of LLaMA-style
    models, whose RoPE rotates adjacent pairs."""
    out, width = weight.shape
    return weight.reshape(heads, 2, out // heads // 2, width).swapaxes(1, 2).reshape(out, width)


def write_olmoe_gguf(path: Path, hf_config, tensors: dict[str, np.ndarray],
                     qtype: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F32,
                     permute_qk: bool = False) -> Path:
    """A Hugging Face OLMoE checkpoint (``tensors`` by stored name) as a GGUF file in llama.cpp's layout.

    The metadata keys are those llama.cpp reads for OLMoE, plus
    ``expert_feed_forward_length`` (which its converter leaves out); tensor
    names come from the ``gguf`` package's own tables. Each layer's
    per-expert matrices are stacked into one ``[E, out, in]`` tensor (numpy
    order), and every matrix is stored as ``qtype``.

    q and k are stored as transformers has them, as llama.cpp's converter
    writes OLMoE: its ``OlmoeModel`` (``conversion/olmo.py``) only stacks the
    experts, while ``OlmoModel`` beside it permutes q and k, and llama.cpp
    runs OLMoE with NEOX-style RoPE (halves rotated, as transformers does).
    ``permute_qk`` writes them in the LLaMA-style layout instead
    (:func:`llama_permute`), which a loader of OLMoE files must not expect.
    """
    c = hf_config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.OLMOE, c.num_hidden_layers)
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.OLMOE])
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_expert_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_expert_count(c.num_experts)
    writer.add_expert_used_count(c.num_experts_per_tok)
    writer.add_eos_token_id(c.eos_token_id)
    writer.add_pad_token_id(c.pad_token_id)

    expert = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(\w+)\.weight")
    plain: dict[str, np.ndarray] = {}
    per_expert: dict[str, dict[int, np.ndarray]] = {}  # model.layers.L.mlp.experts.PROJ -> expert -> [out, in]
    for name, value in tensors.items():
        if permute_qk and name.endswith(("q_proj.weight", "k_proj.weight")):
            value = llama_permute(value, c.num_attention_heads if "q_proj" in name else c.num_key_value_heads)
        if match := expert.fullmatch(name):
            layer, index, proj = match.groups()
            per_expert.setdefault(f"model.layers.{layer}.mlp.experts.{proj}", {})[int(index)] = value
        else:
            plain[name.removesuffix(".weight")] = value
    stacked = {name: np.stack([parts[e] for e in sorted(parts)]) for name, parts in per_expert.items()}
    for hf_name, value in {**plain, **stacked}.items():
        gguf_name = names.get_name(hf_name) + ".weight"
        if qtype != gguf.GGMLQuantizationType.F32 and value.ndim >= 2:  # norm weights stay F32, as in llama.cpp
            writer.add_tensor(gguf_name, gguf.quants.quantize(value, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(gguf_name, np.ascontiguousarray(value, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
