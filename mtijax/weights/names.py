"""Where each parameter lives in a Hugging Face checkpoint and in a GGUF file.

For each architecture and format, :func:`slots` lists every stored tensor,
the params leaf (and the index inside it) it fills, and how to turn it into
that leaf: swap its last two axes (stored ``[out, in]``, kept ``[in, out]``),
and, for Gemma in GGUF, subtract the 1 that llama.cpp's converter adds to
every norm weight. Hugging Face names are relative to the decoder
(``layers.0...``; the loader adds ``model.`` or the multimodal prefix), except
the output head ``lm_head.weight``.

OLMoE in GGUF stores each layer's experts stacked (``ffn_gate_exps [E, F, D]``
in numpy order), and q and k unpermuted, as transformers has them: llama.cpp's
converter (``OlmoeModel`` in its ``conversion/olmo.py``, formerly in
``convert_hf_to_gguf.py``) only stacks the experts, unlike its ``OlmoModel``,
which permutes q and k for LLaMA-style RoPE, and llama.cpp runs OLMoE with
NEOX-style RoPE, as transformers does. So q and k are read as they are.
"""

from __future__ import annotations

from typing import NamedTuple

from mtijax.config import ModelConfig, OlmoeConfig
from mtijax.errors import MtijaxError


class TensorSlot(NamedTuple):
    """One stored tensor and the params leaf it fills.

    Attributes:
      name: the tensor's name in the file (Hugging Face: relative to the decoder).
      path: keys into the params pytree, e.g. ``("layers", "attn", "q_proj")``.
      index: leading indices into the leaf: ``()``, ``(layer,)`` or ``(layer, expert)``.
      transpose: swap the stored tensor's last two axes.
      norm_shift: the file stores ``w + 1``; subtract 1.
    """

    name: str
    path: tuple[str, ...]
    index: tuple[int, ...]
    transpose: bool = False
    norm_shift: bool = False


_ATTENTION = (
    # path, HF name, GGUF name, transpose
    (("input_norm",), "input_layernorm.weight", "attn_norm.weight", False),
    (("attn", "q_proj"), "self_attn.q_proj.weight", "attn_q.weight", True),
    (("attn", "k_proj"), "self_attn.k_proj.weight", "attn_k.weight", True),
    (("attn", "v_proj"), "self_attn.v_proj.weight", "attn_v.weight", True),
    (("attn", "o_proj"), "self_attn.o_proj.weight", "attn_output.weight", True),
    (("attn", "q_norm"), "self_attn.q_norm.weight", "attn_q_norm.weight", False),
    (("attn", "k_norm"), "self_attn.k_norm.weight", "attn_k_norm.weight", False),
)
"""The tensors both architectures' layers share, with the same names in both formats."""

_GEMMA3_LAYER = _ATTENTION + (
    (("post_attn_norm",), "post_attention_layernorm.weight", "post_attention_norm.weight", False),
    (("pre_mlp_norm",), "pre_feedforward_layernorm.weight", "ffn_norm.weight", False),
    (("post_mlp_norm",), "post_feedforward_layernorm.weight", "post_ffw_norm.weight", False),
    (("mlp", "gate_proj"), "mlp.gate_proj.weight", "ffn_gate.weight", True),
    (("mlp", "up_proj"), "mlp.up_proj.weight", "ffn_up.weight", True),
    (("mlp", "down_proj"), "mlp.down_proj.weight", "ffn_down.weight", True),
)

_OLMOE_LAYER = _ATTENTION + (
    (("post_attn_norm",), "post_attention_layernorm.weight", "ffn_norm.weight", False),
    (("moe", "router"), "mlp.gate.weight", "ffn_gate_inp.weight", True),
)

_OLMOE_EXPERTS = (
    # path, HF name (per expert), GGUF name (stacked)
    (("moe", "gate_proj"), "gate_proj.weight", "ffn_gate_exps.weight"),
    (("moe", "up_proj"), "up_proj.weight", "ffn_up_exps.weight"),
    (("moe", "down_proj"), "down_proj.weight", "ffn_down_exps.weight"),
)


def _layer_slots(layer: int, table: tuple, hf: bool, shift_norms: bool) -> list[TensorSlot]:
    """One layer's slots from a ``(path, HF name, GGUF name, transpose)`` table."""
    return [TensorSlot(f"layers.{layer}.{hf_name}" if hf else f"blk.{layer}.{gguf_name}", ("layers", *path),
                       (layer,), transpose, shift_norms and gguf_name.endswith("norm.weight"))
            for path, hf_name, gguf_name, transpose in table]


def _embedding_slot(hf: bool) -> TensorSlot:
    return TensorSlot("embed_tokens.weight" if hf else "token_embd.weight", ("embed",), ())


def _gemma3(config: ModelConfig, fmt: str) -> list[TensorSlot]:
    hf = fmt == "hf"
    slots = [_embedding_slot(hf)]
    for layer in range(config.num_layers):
        slots += _layer_slots(layer, _GEMMA3_LAYER, hf, shift_norms=not hf)
    slots.append(TensorSlot("norm.weight" if hf else "output_norm.weight", ("final_norm",), (), False, not hf))
    return slots


def _olmoe(config: OlmoeConfig, fmt: str) -> list[TensorSlot]:
    hf = fmt == "hf"
    slots = [_embedding_slot(hf)]
    for layer in range(config.num_layers):
        slots += _layer_slots(layer, _OLMOE_LAYER, hf, shift_norms=False)
        for path, hf_name, gguf_name in _OLMOE_EXPERTS:
            if hf:
                slots += [TensorSlot(f"layers.{layer}.mlp.experts.{e}.{hf_name}", ("layers", *path), (layer, e), True)
                          for e in range(config.num_experts)]
            else:
                slots.append(TensorSlot(f"blk.{layer}.{gguf_name}", ("layers", *path), (layer,), True))
    slots.append(TensorSlot("norm.weight" if hf else "output_norm.weight", ("final_norm",), ()))
    if not config.tie_word_embeddings:
        slots.append(TensorSlot("lm_head.weight" if hf else "output.weight", ("unembed",), (), True))
    return slots


def slots(config: ModelConfig, fmt: str) -> list[TensorSlot]:
    """Every tensor of ``config``'s checkpoint in format ``fmt`` (``"hf"`` or ``"gguf"``), in file order."""
    if isinstance(config, OlmoeConfig):
        return _olmoe(config, fmt)
    if config.architecture == "gemma3":
        return _gemma3(config, fmt)
    raise MtijaxError(f"no tensor names known for architecture {config.architecture!r}")


HF_TEXT_PREFIXES = ("model.", "model.language_model.", "language_model.model.")
"""Where the text decoder sits: CausalLM models, and the multimodal Gemma 3 in transformers 5 and 4."""
