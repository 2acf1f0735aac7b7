"""The Llama line's tensor names in a Hugging Face checkpoint (see ``mtijax.weights.names``).

Llama, Mistral, Qwen 2 and Qwen 3 checkpoints name their tensors alike; the biases and q/k norms are present
only when the config's flags say so. GGUF files are not read yet.
"""

from __future__ import annotations

from mtijax.models.llama.config import LlamaConfig
from mtijax.weights.names import (ATTENTION, QK_NORMS, TensorSlot, embedding_slot, final_norm_slot, head_slot,
                                  layer_slots)

QKV_BIASES = (
    (("attn", "q_bias"), "self_attn.q_proj.bias", "attn_q.bias", False),
    (("attn", "k_bias"), "self_attn.k_proj.bias", "attn_k.bias", False),
    (("attn", "v_bias"), "self_attn.v_proj.bias", "attn_v.bias", False),
)
O_BIAS = ((("attn", "o_bias"), "self_attn.o_proj.bias", "attn_output.bias", False),)
MLP = (
    (("post_attn_norm",), "post_attention_layernorm.weight", "ffn_norm.weight", False),
    (("mlp", "gate_proj"), "mlp.gate_proj.weight", "ffn_gate.weight", True),
    (("mlp", "up_proj"), "mlp.up_proj.weight", "ffn_up.weight", True),
    (("mlp", "down_proj"), "mlp.down_proj.weight", "ffn_down.weight", True),
)
"""``(path, HF name, GGUF name, transpose)`` tables; the layer is :func:`layer_table`."""


def layer_table(config: LlamaConfig) -> tuple:
    """One layer's tensors for ``config``'s flags."""
    return (ATTENTION + (QKV_BIASES if config.qkv_bias else ()) + (O_BIAS if config.o_bias else ())
            + (QK_NORMS if config.qk_norm else ()) + MLP)


def hf_tensors(config: LlamaConfig) -> list[TensorSlot]:
    """Every tensor of a Hugging Face Llama, Mistral, Qwen 2 or Qwen 3 checkpoint."""
    table = layer_table(config)
    slots = [embedding_slot(True)]
    for layer in range(config.num_layers):
        slots += layer_slots(layer, table, hf=True)
    slots.append(final_norm_slot(True))
    if not config.tie_word_embeddings:
        slots.append(head_slot(True))
    return slots
