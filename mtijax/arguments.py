"""Argument types and prompt handling shared by every ``mtijax`` subcommand.

Each type raises ``argparse.ArgumentTypeError``, which the ``mtijax`` parser
turns into one line ``mtijax: error: argument --flag: ...``.
"""

from __future__ import annotations

import argparse
from typing import Callable, Sequence

from mtijax.errors import MtijaxError

MODEL_HELP = "gemma3-270m (embedded default), a Hugging Face model directory, or a .gguf file"


def token_ids(text: str) -> list[int]:
    """``"5, 17,9"`` -> ``[5, 17, 9]``; at least one id."""
    ids = int_list(text.replace(" ", ""))
    if not ids:
        raise argparse.ArgumentTypeError("no token ids given")
    return ids


def int_list(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]`` (empty items are skipped)."""
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def float_list(text: str) -> list[float]:
    """``"0,0.5"`` -> ``[0.0, 0.5]`` (empty items are skipped)."""
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def non_negative(kind: type) -> Callable[[str], int | float]:
    """An argument type parsing ``kind`` (int or float) that refuses values below 0."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            expected = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if value < 0:
            raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
        return value
    return parse


def check_prompt_choice(prompt: str | None, ids: Sequence[int] | None) -> None:
    """Exactly one of a PROMPT and ``--token-ids`` (checked before a model is loaded)."""
    if prompt is None and ids is None:
        raise MtijaxError("give a PROMPT or --token-ids")
    if prompt is not None and ids is not None:
        raise MtijaxError("give a PROMPT or --token-ids, not both")


def encode_prompt(model, prompt: str | None, ids: Sequence[int] | None) -> list[int]:
    """The prompt's token ids: ``ids`` when given, else ``prompt`` through the model's tokenizer."""
    if ids is not None:
        return list(ids)
    if model.tokenizer is None:
        raise MtijaxError(f"{model.source} has no tokenizer; pass --token-ids instead of a prompt")
    return model.tokenizer(prompt)["input_ids"]
