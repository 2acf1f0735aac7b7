"""Decoder implementations: pure functions over a params pytree, and the linen modules over the same pytree."""

from mtijax.models.modules import Block, Decoder, Gemma3, Olmoe, block_apply, module

__all__ = ["Block", "Decoder", "Gemma3", "Olmoe", "block_apply", "module"]
