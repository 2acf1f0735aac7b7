"""Argument types and prompt handling shared by every ``mtijax`` subcommand.

Each type raises ``argparse.ArgumentTypeError``, which the ``mtijax`` parser
turns into one line ``mtijax: error: argument --flag: ...``.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any, Callable, Sequence

from mtijax.errors import MtijaxError

MODEL_HELP = "gemma3-270m (embedded default), a Hugging Face model directory, or a .gguf file"
VERBOSE_HELP = "show progress on stderr (loading, tokenizer, compiling) even with --json or without a terminal"


class HelpFormatter(argparse.HelpFormatter):
    """argparse's help with ``(default: X)`` after every flag whose default is a value (not None or False) and
    whose help does not already say it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if default is not None and default is not False and default != argparse.SUPPRESS \
                and "default" not in text and action.option_strings:
            text += f" (default: {_shown(default)})"
        return text


def _shown(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value)) if value else "none"
    return str(value)


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


def _number(kind: type, text: str) -> int | float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") \
            from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def non_negative(kind: type) -> Callable[[str], int | float]:
    """An argument type parsing ``kind`` (int or float; a float must be finite) that refuses values below 0."""
    def parse(text: str):
        value = _number(kind, text)
        if value < 0:
            raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
        return value
    return parse


def positive(kind: type) -> Callable[[str], int | float]:
    """An argument type parsing ``kind`` (int or float; a float must be finite) that refuses values below 1 (int)
    or at most 0 (float)."""
    def parse(text: str):
        value = _number(kind, text)
        if (kind is int and value < 1) or value <= 0:
            raise argparse.ArgumentTypeError(f"must be {'>= 1' if kind is int else '> 0'}, got {text}")
        return value
    return parse


def finite(text: str) -> float:
    """A finite number (``inf`` and ``nan`` are refused)."""
    return _number(float, text)


def probability(text: str) -> float:
    """A number in (0, 1], as top-p takes it."""
    value = _number(float, text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def add_sampling(parser: argparse.ArgumentParser, temperature: float = 0.0, temperature_help: str = "") -> None:
    """``--temperature``, ``--top-k``, ``--top-p`` and ``--seed``, with their checks and help."""
    parser.add_argument("--temperature", type=non_negative(float), default=temperature,
                        help=temperature_help or "sampling temperature, a finite number >= 0; 0 is greedy")
    parser.add_argument("--top-k", type=non_negative(int), default=0,
                        help="sample among the K most likely tokens; 0 switches top-k off")
    parser.add_argument("--top-p", type=probability, default=1.0,
                        help="sample among the most likely tokens holding this much probability, in (0, 1]; "
                             "1 switches top-p off")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling")


def check_prompt_choice(prompt: str | None, ids: Sequence[int] | None) -> None:
    """Exactly one of a PROMPT and ``--token-ids`` (checked before a model is loaded)."""
    if prompt is None and ids is None:
        raise MtijaxError("give a PROMPT or --token-ids")
    if prompt is not None and ids is not None:
        raise MtijaxError("give a PROMPT or --token-ids, not both")


def encode_prompt(tokenizer: Any, source: str | Path, prompt: str | None, ids: Sequence[int] | None,
                  flag: str = "--token-ids") -> list[int]:
    """The prompt's token ids: ``ids`` when given, else ``prompt`` through ``tokenizer`` (the model at ``source``
    has none when it is None: an error that points to ``flag``)."""
    if ids is not None:
        return list(ids)
    if tokenizer is None:
        raise MtijaxError(f"{source} has no tokenizer; pass {flag} instead of a prompt")
    return tokenizer(prompt)["input_ids"]
