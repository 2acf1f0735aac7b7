"""OLMoE's tensor names in a Hugging Face checkpoint and in a GGUF file (see ``mtijax.weights.names``).

Hugging Face stores one tensor per expert (``mlp.experts.{e}.gate_proj.weight``). GGUF stores each layer's
experts stacked (``ffn_gate_exps [E, F, D]`` in numpy order), and q and k unpermuted, as transformers has
them: llama.cpp's converter (``OlmoeModel`` in its ``conversion/olmo.py``, formerly in
``convert_hf_to_gguf.py``) only stacks the experts, unlike its ``OlmoModel``, which permutes q and k for
LLaMA-style RoPE, and llama.cpp runs OLMoE with NEOX-style RoPE, as transformers does. So q and k are read as
they are.
"""

from __future__ import annotations

from mtijax.models.olmoe.config import OlmoeConfig
from mtijax.weights.names import (ATTENTION, QK_NORMS, TensorSlot, embedding_slot, final_norm_slot, head_slot,
                                  layer_slots)

LAYER = ATTENTION + QK_NORMS + (
    (("post_attn_norm",), "post_attention_layernorm.weight", "ffn_norm.weight", False),
    (("moe", "router"), "mlp.gate.weight", "ffn_gate_inp.weight", True),
)
"""One layer's tensors besides the experts: ``(path, HF name, GGUF name, transpose)``."""

EXPERTS = (
    # path, HF name (per expert), GGUF name (stacked)
    (("moe", "gate_proj"), "gate_proj.weight", "ffn_gate_exps.weight"),
    (("moe", "up_proj"), "up_proj.weight", "ffn_up_exps.weight"),
    (("moe", "down_proj"), "down_proj.weight", "ffn_down_exps.weight"),
)


def _tensors(config: OlmoeConfig, hf: bool) -> list[TensorSlot]:
    slots = [embedding_slot(hf)]
    for layer in range(config.num_layers):
        slots += layer_slots(layer, LAYER, hf)
        for path, hf_name, gguf_name in EXPERTS:
            if hf:
                slots += [TensorSlot(f"layers.{layer}.mlp.experts.{e}.{hf_name}", ("layers", *path), (layer, e), True)
                          for e in range(config.num_experts)]
            else:
                slots.append(TensorSlot(f"blk.{layer}.{gguf_name}", ("layers", *path), (layer,), True))
    slots.append(final_norm_slot(hf))
    if not config.tie_word_embeddings:
        slots.append(head_slot(hf))
    return slots


def hf_tensors(config: OlmoeConfig) -> list[TensorSlot]:
    """Every tensor of a Hugging Face OLMoE checkpoint."""
    return _tensors(config, hf=True)


def gguf_tensors(config: OlmoeConfig) -> list[TensorSlot]:
    """Every tensor of an OLMoE GGUF file."""
    return _tensors(config, hf=False)
