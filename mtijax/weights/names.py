"""Where each parameter lives in a Hugging Face checkpoint and in a GGUF file.

One table for Gemma 3 maps every leaf of the params pytree to its tensor name
in both formats and says how to turn the stored tensor into the leaf:
transpose a ``[out, in]`` matrix to ``[in, out]``, and, for GGUF, subtract the
1 that llama.cpp's converter adds to every Gemma norm weight.
"""

from __future__ import annotations

from typing import NamedTuple

from mtijax.config import Gemma3Config


class TensorSlot(NamedTuple):
    """One stored tensor and the params leaf it fills.

    Attributes:
      path: keys into the params pytree, e.g. ``("layers", "attn", "q_proj")``.
      layer: index along the leading layer axis, or None for a non-layer leaf.
      hf_name: name in a Hugging Face checkpoint, without the model prefix.
      gguf_name: name in a GGUF file.
      transpose: stored ``[out, in]``, kept ``[in, out]``.
      gguf_norm_shift: GGUF stores ``w + 1``; subtract 1 on load.
    """

    path: tuple[str, ...]
    layer: int | None
    hf_name: str
    gguf_name: str
    transpose: bool
    gguf_norm_shift: bool


_LAYER_TENSORS = (
    # path, HF suffix, GGUF suffix, transpose
    (("input_norm",), "input_layernorm.weight", "attn_norm.weight", False),
    (("post_attn_norm",), "post_attention_layernorm.weight", "post_attention_norm.weight", False),
    (("pre_mlp_norm",), "pre_feedforward_layernorm.weight", "ffn_norm.weight", False),
    (("post_mlp_norm",), "post_feedforward_layernorm.weight", "post_ffw_norm.weight", False),
    (("attn", "q_proj"), "self_attn.q_proj.weight", "attn_q.weight", True),
    (("attn", "k_proj"), "self_attn.k_proj.weight", "attn_k.weight", True),
    (("attn", "v_proj"), "self_attn.v_proj.weight", "attn_v.weight", True),
    (("attn", "o_proj"), "self_attn.o_proj.weight", "attn_output.weight", True),
    (("attn", "q_norm"), "self_attn.q_norm.weight", "attn_q_norm.weight", False),
    (("attn", "k_norm"), "self_attn.k_norm.weight", "attn_k_norm.weight", False),
    (("mlp", "gate_proj"), "mlp.gate_proj.weight", "ffn_gate.weight", True),
    (("mlp", "up_proj"), "mlp.up_proj.weight", "ffn_up.weight", True),
    (("mlp", "down_proj"), "mlp.down_proj.weight", "ffn_down.weight", True),
)

HF_TEXT_PREFIXES = ("model.", "model.language_model.", "language_model.model.")
"""Where the text decoder sits: Gemma3ForCausalLM, and the multimodal model in transformers 5 and 4."""


def gemma3_slots(config: Gemma3Config) -> list[TensorSlot]:
    """Every tensor of a Gemma 3 text checkpoint, in file-friendly order (embedding, layer by layer, final norm)."""
    slots = [TensorSlot(("embed",), None, "embed_tokens.weight", "token_embd.weight", False, False)]
    for layer in range(config.num_layers):
        for path, hf, gguf, transpose in _LAYER_TENSORS:
            slots.append(TensorSlot(("layers", *path), layer, f"layers.{layer}.{hf}", f"blk.{layer}.{gguf}",
                                    transpose, gguf.endswith("norm.weight")))
    slots.append(TensorSlot(("final_norm",), None, "norm.weight", "output_norm.weight", False, True))
    return slots
