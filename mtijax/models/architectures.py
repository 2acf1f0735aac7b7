"""The registry of architectures: one :class:`~mtijax.models.architecture.Architecture` per family folder.

Adding an architecture is adding its folder under ``mtijax/models/`` (whose ``__init__.py`` defines
``ARCHITECTURE``) and its name to :data:`FAMILIES`.
"""

from __future__ import annotations

import importlib
from typing import Any

from mtijax.errors import MtijaxError
from mtijax.models.architecture import Architecture, ModelConfig

FAMILIES = ("gemma3", "olmoe", "llama")
"""The folders of ``mtijax/models/`` that hold an architecture, in the order they are listed to users."""

ARCHITECTURES: dict[str, Architecture] = {
    arch.name: arch for arch in (importlib.import_module(f"mtijax.models.{f}").ARCHITECTURE for f in FAMILIES)}
"""``config.architecture`` -> its record."""

PRESETS: dict[str, Any] = {name: config for arch in ARCHITECTURES.values() for name, config in arch.presets.items()}
"""Published model sizes of every family, ``name -> config``."""


def preset(name: str) -> Any:
    """The config of a published model size, e.g. ``preset("gemma3-12b")``."""
    try:
        return PRESETS[name]
    except KeyError:
        raise MtijaxError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}") from None


def architecture_named(name: str) -> Architecture:
    """The record of the architecture called ``name``; a MtijaxError if there is none."""
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise MtijaxError(f"unknown architecture {name!r}") from None


def architecture(config: ModelConfig) -> Architecture:
    """The record of ``config``'s architecture."""
    return architecture_named(config.architecture)


def for_hf_model_type(model_type: Any, where: str) -> Architecture:
    """The architecture that reads a Hugging Face ``config.json`` of ``model_type``."""
    for arch in ARCHITECTURES.values():
        if model_type in arch.hf_model_types:
            return arch
    known = ", ".join(t for arch in ARCHITECTURES.values() for t in arch.hf_model_types)
    raise MtijaxError(f"{where}: unknown architecture {model_type!r} (supported: {known})")


def for_gguf_architecture(name: Any, where: str) -> Architecture:
    """The architecture that claims GGUF ``general.architecture == name``."""
    for arch in ARCHITECTURES.values():
        if name in arch.gguf_architectures:
            return arch
    known = ", ".join(n for arch in ARCHITECTURES.values() if arch.from_gguf for n in arch.gguf_architectures)
    raise MtijaxError(f"{where}: unknown GGUF architecture {name!r} (supported: {known})")
