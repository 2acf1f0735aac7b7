"""A model config from a Hugging Face ``config.json`` or from GGUF metadata, whatever the family.

These pick the family that claims the file (``model_type``, or GGUF ``general.architecture``) from the
registry (``mtijax.models.architectures``) and call its parser, which lives beside its config in
``mtijax/models/<family>/config.py`` and reads fields with ``mtijax.weights.fields``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from mtijax.errors import MtijaxError
from mtijax.models.architecture import ModelConfig
from mtijax.models.architectures import for_gguf_architecture, for_hf_model_type


def config_from_hf(raw: Mapping[str, Any], where: str = "config.json") -> ModelConfig:
    """A config from a Hugging Face ``config.json`` dict (any registered family's ``model_type``)."""
    return for_hf_model_type(raw.get("model_type"), where).from_hf(raw, where)


def read_hf_config(directory: Path) -> ModelConfig:
    """Read ``directory/config.json``."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise MtijaxError(f"{directory}: no config.json (not a Hugging Face model directory)")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MtijaxError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, Mapping):
        raise MtijaxError(f"{path}: not a JSON object")
    return config_from_hf(raw, str(path))


def config_from_gguf(meta: Mapping[str, Any], vocab_size: int, where: str,
                     extra_eos: tuple[int, ...] = ()) -> ModelConfig:
    """A config from GGUF metadata (``general.architecture`` of a registered family); ``extra_eos`` adds stop
    tokens the metadata does not name (the Gemma chat models' ``<end_of_turn>``)."""
    name = meta.get("general.architecture")
    arch = for_gguf_architecture(name, where)
    if arch.from_gguf is None:
        raise MtijaxError(f"{where}: GGUF models of architecture {name!r} are not supported yet; "
                          f"load its Hugging Face directory instead")
    return arch.from_gguf(meta, vocab_size, where, extra_eos)
