"""Decoder architectures, each pure functions over a params pytree, and the linen modules over the same pytree:
one folder per family (``gemma3/``, ``olmoe/``, ``llama/``) with its
:class:`~mtijax.models.architecture.Architecture` record, the registry (``architectures``), the shared layers,
cache and forward pass, and ``modules`` (``Gemma3``, ``Olmoe``, ``Llama``, ``module(config)``)."""

from mtijax.models.modules import Block, Decoder, Gemma3, Llama, Olmoe, block_apply, module

__all__ = ["Block", "Decoder", "Gemma3", "Olmoe", "Llama", "block_apply", "module"]
