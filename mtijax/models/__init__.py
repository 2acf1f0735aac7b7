"""Decoder architectures, each pure functions over a params pytree, and the linen modules over the same pytree:
one folder per family (``gemma3/``, ``olmoe/``, ``llama/``) with its
:class:`~mtijax.models.architecture.Architecture` record, the registry (``architectures``), the shared layers,
cache and forward pass, and ``modules`` (``Gemma3``, ``Olmoe``, ``Llama``, ``module(config)``).

The module names load on first access (PEP 562): the families import ``mtijax.models.layers`` while
``mtijax.models.modules`` imports the families, so an eager import here would be circular."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["Block", "Decoder", "Gemma3", "Olmoe", "Llama", "block_apply", "module"]

if TYPE_CHECKING:
    from mtijax.models.modules import Block, Decoder, Gemma3, Llama, Olmoe, block_apply, module


def __getattr__(name: str) -> Any:
    """A name of ``mtijax.models.modules``, imported on first access."""
    if name not in __all__:
        raise AttributeError(f"module 'mtijax.models' has no attribute {name!r}")
    from mtijax.models import modules

    return getattr(modules, name)
