"""Loading a model by name or path: config, params and tokenizer together."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from mtijax.config import PRESETS, ModelConfig, read_hf_config
from mtijax.errors import MtijaxError
from mtijax.tokenizer import load_gguf_tokenizer, load_hf_tokenizer
from mtijax.weights.default import DEFAULT_MODEL, default_model_path
from mtijax.weights.gguf_file import GGUFFile
from mtijax.weights.loader import load_params
from mtijax.weights.sources import HFDirectory


@dataclasses.dataclass(frozen=True)
class Model:
    """A loaded model.

    Attributes:
      config: the hashable config (a static argument of every jitted function).
      params: the params pytree (see ``mtijax.models.gemma3``).
      tokenizer: ``tokenizer(text)["input_ids"]`` and ``tokenizer.decode(ids)``: a ``transformers`` tokenizer,
        or :class:`mtijax.tokenizer.GemmaTokenizer` for a Gemma GGUF file; None for checkpoints without one.
      source: the file or directory the weights came from.
    """

    config: ModelConfig
    params: dict[str, Any]
    tokenizer: Any
    source: str


def resolve(name_or_path: str | Path | None) -> Path:
    """The file or directory a model name or path refers to (None means the embedded default)."""
    if name_or_path is None or str(name_or_path) == DEFAULT_MODEL:
        return default_model_path()
    path = Path(name_or_path)
    if path.is_dir() or path.is_file():
        return path
    if str(name_or_path) in PRESETS:
        raise MtijaxError(f"{name_or_path} is a preset without embedded weights; pass a model directory or a "
                          f".gguf file (only {DEFAULT_MODEL} is embedded)")
    raise MtijaxError(f"no such model: {name_or_path} (not a directory, a file, or {DEFAULT_MODEL})")


def load_config(name_or_path: str | Path | None) -> tuple[ModelConfig, Path | None]:
    """The config of a model (a preset name needs no weights), and the path it came from."""
    if name_or_path is not None and str(name_or_path) in PRESETS and str(name_or_path) != DEFAULT_MODEL:
        return PRESETS[str(name_or_path)], None
    path = resolve(name_or_path)
    if path.is_dir():
        return read_hf_config(path), path
    return GGUFFile(path).config(), path


def load(name_or_path: str | Path | None = None, dtype: str = "float32", *, tokenizer: bool = True,
         progress: bool = True) -> Model:
    """Load a model: a Hugging Face directory, a ``.gguf`` file, or ``"gemma3-270m"`` (the default).

    Args:
      dtype: ``"float32"`` (default) or ``"bfloat16"``; GGUF tensors are dequantised to it.
      tokenizer: also load the tokenizer (GGUF: converted once, then cached).
      progress: show a progress bar while reading tensors.
    """
    path = resolve(name_or_path)
    if path.is_dir():
        config = read_hf_config(path)
        source = HFDirectory(path)
        tok = load_hf_tokenizer(path) if tokenizer else None
    else:
        source = GGUFFile(path)
        config = source.config()
        tok = load_gguf_tokenizer(source) if tokenizer else None
    return Model(config, load_params(config, source, dtype, progress), tok, str(path))
