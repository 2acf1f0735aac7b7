"""Where each parameter lives in a Hugging Face checkpoint and in a GGUF file: the :class:`TensorSlot` table.

Each family lists its tensors in its own ``names.py`` (``mtijax/models/<family>/names.py``) from the pieces
here, and registers the lists in its architecture record; :func:`slots` asks the record. A slot says which
params leaf (and index inside it) a stored tensor fills, and how to turn it into that leaf: swap its last two
axes (stored ``[out, in]``, kept ``[in, out]``), and, for Gemma in GGUF, subtract the 1 that llama.cpp's
converter adds to every norm weight. Hugging Face names are relative to the decoder (``layers.0...``; the
loader adds ``model.`` or the multimodal prefix), except the output head ``lm_head.weight``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from mtijax.models.architecture import ModelConfig


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


ATTENTION = (
    # path, HF name, GGUF name, transpose
    (("input_norm",), "input_layernorm.weight", "attn_norm.weight", False),
    (("attn", "q_proj"), "self_attn.q_proj.weight", "attn_q.weight", True),
    (("attn", "k_proj"), "self_attn.k_proj.weight", "attn_k.weight", True),
    (("attn", "v_proj"), "self_attn.v_proj.weight", "attn_v.weight", True),
    (("attn", "o_proj"), "self_attn.o_proj.weight", "attn_output.weight", True),
)
"""The attention tensors every family's layers share, with the same names in every family."""

QK_NORMS = (
    (("attn", "q_norm"), "self_attn.q_norm.weight", "attn_q_norm.weight", False),
    (("attn", "k_norm"), "self_attn.k_norm.weight", "attn_k_norm.weight", False),
)
"""The q and k norms of the families that have them."""


def layer_slots(layer: int, table: tuple, hf: bool, shift_norms: bool = False) -> list[TensorSlot]:
    """One layer's slots from a ``(path, HF name, GGUF name, transpose)`` table."""
    return [TensorSlot(f"layers.{layer}.{hf_name}" if hf else f"blk.{layer}.{gguf_name}", ("layers", *path),
                       (layer,), transpose, shift_norms and gguf_name.endswith("norm.weight"))
            for path, hf_name, gguf_name, transpose in table]


def embedding_slot(hf: bool) -> TensorSlot:
    """The token embedding ``embed [V, D]``."""
    return TensorSlot("embed_tokens.weight" if hf else "token_embd.weight", ("embed",), ())


def final_norm_slot(hf: bool, shift_norms: bool = False) -> TensorSlot:
    """The final norm ``final_norm [D]``."""
    return TensorSlot("norm.weight" if hf else "output_norm.weight", ("final_norm",), (), False, shift_norms)


def head_slot(hf: bool) -> TensorSlot:
    """An untied output head ``unembed [D, V]``."""
    return TensorSlot("lm_head.weight" if hf else "output.weight", ("unembed",), (), True)


def slots(config: ModelConfig, fmt: str) -> list[TensorSlot]:
    """Every tensor of ``config``'s checkpoint in format ``fmt`` (``"hf"`` or ``"gguf"``), in file order."""
    from mtijax.models.architectures import architecture  # the registry imports the families, which import this

    return architecture(config).tensors(config, fmt)


HF_TEXT_PREFIXES = ("model.", "model.language_model.", "language_model.model.")
"""Where the text decoder sits: CausalLM models, and the multimodal Gemma 3 in transformers 5 and 4."""
