"""Checks that need only the flags, the config or the tokenizer, run before any weight is read.

Loading Gemma 3 270M takes a minute or more on a small machine; a mistake in a flag, a prompt
too long for the model or an output path that cannot be written must be reported before that,
in one line. Each check raises :class:`MtijaxError`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np

from mtijax.config import ModelConfig
from mtijax.errors import MtijaxError
from mtijax.generate import check_token_ids
from mtijax.models.decoder import family


def check_prompts(config: ModelConfig, prompts: Sequence[Sequence[int]], context: str, max_new_tokens: int = 0,
                  flag: str = "--max-new-tokens") -> None:
    """Every prompt has tokens, inside the vocabulary, and fits the model's context with ``max_new_tokens`` more.

    Args:
      context: where the context length comes from, named in the error (see
        :attr:`mtijax.api.Checkpoint.context_source`).
      max_new_tokens: the tokens to be generated after the longest prompt (0: the prompts are only run).
      flag: the name of ``max_new_tokens`` in the error.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise MtijaxError("every prompt needs at least one token")
    check_token_ids(config, [t for p in prompts for t in p])
    longest = max(len(p) for p in prompts)
    limit = config.max_position_embeddings
    if longest + max_new_tokens > limit:
        wanted = f"the prompt ({longest} tokens) plus {flag} {max_new_tokens} is {longest + max_new_tokens} tokens" \
            if max_new_tokens else f"the prompt has {longest} tokens"
        raise MtijaxError(f"{wanted}, more than the model's context of {limit} ({context})")


def _nearest_existing(path: Path) -> Path:
    for parent in (path, *path.parents):
        if parent.exists():
            return parent
    return Path(".")


def check_output_dir(path: str | Path, flag: str = "--out") -> None:
    """``path`` can be a directory that results are written into: it is one, or it can be made."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise MtijaxError(f"{flag} {path}: exists and is not a directory")
    existing = _nearest_existing(path)
    if not existing.is_dir():
        raise MtijaxError(f"{flag} {path}: cannot make the directory, {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise MtijaxError(f"{flag} {path}: {existing} is not writable")


def check_output_file(path: str | Path, flag: str = "--out") -> None:
    """``path`` can be written as a file: it is not a directory, and its directory exists and is writable."""
    path = Path(path)
    if path.is_dir():
        raise MtijaxError(f"{flag} {path}: is a directory; give a file name")
    parent = path.parent
    if not parent.is_dir():
        raise MtijaxError(f"{flag} {path}: the directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise MtijaxError(f"{flag} {path}: not writable")


def abstract_params(config: ModelConfig, dtype: Any = np.float32) -> dict[str, Any]:
    """The params pytree of ``config`` as ``jax.ShapeDtypeStruct`` leaves: what checks of shapes and paths need,
    without weights (``jax.eval_shape`` runs a function on it)."""
    shapes = family(config).param_shapes(config)
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(tuple(s), dtype), shapes, is_leaf=lambda x: isinstance(x, tuple))
