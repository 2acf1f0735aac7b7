"""Gemma 3's tensor names in a Hugging Face checkpoint and in a GGUF file (see ``mtijax.weights.names``).

In GGUF every norm weight is stored as ``w + 1`` (llama.cpp's converter adds the 1 of Gemma's ``(1 + w)``).
"""

from __future__ import annotations

from mtijax.models.gemma3.config import Gemma3Config
from mtijax.weights.names import ATTENTION, QK_NORMS, TensorSlot, embedding_slot, final_norm_slot, layer_slots

LAYER = ATTENTION + QK_NORMS + (
    (("post_attn_norm",), "post_attention_layernorm.weight", "post_attention_norm.weight", False),
    (("pre_mlp_norm",), "pre_feedforward_layernorm.weight", "ffn_norm.weight", False),
    (("post_mlp_norm",), "post_feedforward_layernorm.weight", "post_ffw_norm.weight", False),
    (("mlp", "gate_proj"), "mlp.gate_proj.weight", "ffn_gate.weight", True),
    (("mlp", "up_proj"), "mlp.up_proj.weight", "ffn_up.weight", True),
    (("mlp", "down_proj"), "mlp.down_proj.weight", "ffn_down.weight", True),
)
"""One layer's tensors: ``(path, HF name, GGUF name, transpose)``."""


def _tensors(config: Gemma3Config, hf: bool) -> list[TensorSlot]:
    slots = [embedding_slot(hf)]
    for layer in range(config.num_layers):
        slots += layer_slots(layer, LAYER, hf, shift_norms=not hf)
    return slots + [final_norm_slot(hf, shift_norms=not hf)]


def hf_tensors(config: Gemma3Config) -> list[TensorSlot]:
    """Every tensor of a Hugging Face Gemma 3 checkpoint (the head is tied: there is no ``lm_head``)."""
    return _tensors(config, hf=True)


def gguf_tensors(config: Gemma3Config) -> list[TensorSlot]:
    """Every tensor of a Gemma 3 GGUF file."""
    return _tensors(config, hf=False)
