"""A generation request laid out for the engine: checked, left-padded into whole prefill chunks, and
rounded to the compile ladder.

Every generated token comes from the decode step: the prefill writes each prompt's tokens *but the
last* into the cache, and decode call 0 feeds the last prompt token (at its own position) and samples
token 0. Call ``t`` feeds token ``t - 1`` and samples token ``t``. So the prompt length changes only
how many prefill chunks run, never a compiled shape.

Layout of row ``b`` (prompt ``p_b`` of ``n_b`` tokens, prefill width ``W``, a multiple of the chunk)::

    slots 0 .. W-1      prefill region: p_b[:-1] right-aligned, positions 0 .. n_b - 2; -1 on padding
    slot  (W + t) % T   decode call t (call 0 holds p_b[-1] at position n_b - 1)

The cache's ``T`` slots are counted in tokens, not in padded width: ``T`` holds the longest prefill plus
``max_new_tokens`` (and at least ``W``). The decode slots past ``T`` wrap to the start of the prefill region,
which is padding in every row (each row has at least ``W`` - the longest prefill pad slots, and the wrap
reaches fewer), so a prompt just short of a rung does not need the next one. A request whose cache is edited
(``edits_cache``) may have that padding filled, so its ``T`` keeps the whole width plus ``max_new_tokens``.

With ``refeed=True`` (the original seed-001 code's rule) the prefill holds the whole prompt and call 0
feeds its last token again, at the next position.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

from mtijax.config import ModelConfig
from mtijax.engine.ladder import Ladder
from mtijax.errors import MtijaxError


class Request(NamedTuple):
    """A laid-out request (host arrays). ``rows`` = the batch bucket (``batch`` real rows first).

    Attributes:
      tokens, positions: ``[rows, W]`` the prefill region (positions -1 on padding and in padding rows).
      first_token, first_position: ``[rows]`` what call 0 feeds, at which position (-1: the next position
        after the prefill, found on the device after any cache edit).
      lengths: ``[rows]`` prompt lengths (0 for padding rows).
      batch: real rows. width: ``W``. chunk: prefill tokens per call (``W`` is a multiple of it).
      cache_length: slots of the KV cache (a ladder rung).
      max_new_tokens: calls to run. stops: ``[n]`` int32 ids that end a row (``[-1]``: none).
      rolling: the cache may take the rolling layout on sliding layers (``Ladder.rolling``).
      long_chunk: the width of a long first prefill call (``Ladder.first_chunk``), or None.
    """

    tokens: np.ndarray
    positions: np.ndarray
    first_token: np.ndarray
    first_position: np.ndarray
    lengths: np.ndarray
    batch: int
    width: int
    chunk: int
    cache_length: int
    max_new_tokens: int
    stops: np.ndarray
    rolling: bool = True
    long_chunk: int | None = None

    @property
    def rows(self) -> int:
        return self.tokens.shape[0]


def check_token_ids(config: ModelConfig, ids) -> None:
    """Raise :class:`MtijaxError` naming the first id of ``ids`` (a flat list, or an array of any shape) outside
    the vocabulary."""
    flat = np.asarray(ids, np.int64).ravel()
    bad = flat[(flat < 0) | (flat >= config.vocab_size)]
    if bad.size:
        raise MtijaxError(f"token id {int(bad[0])} is out of range: the vocabulary has ids 0..{config.vocab_size - 1}")


def stop_tokens(config: ModelConfig, stop_ids: Sequence[int] | None) -> np.ndarray:
    """The ids that end a row, ``[n]`` int32: ``stop_ids``, else the config's EOS ids; ``[-1]`` (never) if none."""
    return np.array(sorted(set(config.eos_token_ids if stop_ids is None else stop_ids)) or [-1], np.int32)


def check_context(config: ModelConfig, longest_prompt: int, max_new_tokens: int) -> None:
    """Refuse a request whose prompt and new tokens do not fit the model's context (``max_position_embeddings``)."""
    limit = config.max_position_embeddings
    if longest_prompt + max_new_tokens > limit:
        raise MtijaxError(f"a prompt of {longest_prompt} tokens plus {max_new_tokens} new tokens exceeds the "
                          f"model's context of {limit} tokens (max_position_embeddings)")


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int, width: int | None = None,
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Left-pad whole prompts: ``tokens [B, P]``, ``positions [B, P]`` (-1 on padding), ``lengths [B]``; ``P`` is
    ``width`` or the longest prompt."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise MtijaxError("every prompt needs at least one token")
    lengths = np.array([len(p) for p in prompts], np.int32)
    width = int(lengths.max()) if width is None else width
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    positions = np.full((len(prompts), width), -1, np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, width - len(prompt):] = prompt
        positions[row, width - len(prompt):] = np.arange(len(prompt))
    return tokens, positions, lengths


def lay_out(config: ModelConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int, ladder: Ladder,
            stop_ids: Sequence[int] | None = None, *, refeed: bool = False, min_width: int = 0,
            rows: int | None = None, edits_cache: bool = False) -> Request:
    """Check a request and lay it out (see the module docstring).

    ``min_width``: the prefill region is at least this wide (a front-end that edits the cache with another
    prompt's entries needs room for them). ``rows``: run this many rows instead of the batch bucket.
    ``edits_cache``: a cache edit runs after the prefill (it may fill the padding, so the cache keeps the whole
    width plus ``max_new_tokens``).
    """
    if max_new_tokens < 1:
        raise MtijaxError(f"max-new-tokens must be >= 1, got {max_new_tokens}")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise MtijaxError("every prompt needs at least one token")
    check_token_ids(config, [t for p in prompts for t in p])
    longest = max(len(p) for p in prompts)
    check_context(config, longest + int(refeed), max_new_tokens)
    batch = len(prompts)
    rows = ladder.batch_bucket(batch) if rows is None else rows
    prefill = [list(p) if refeed else list(p[:-1]) for p in prompts]
    width = max(ladder.prefill_width(max(len(p) for p in prefill)), ladder.prefill_width(min_width))
    tokens = np.full((rows, width), config.pad_token_id, np.int32)
    positions = np.full((rows, width), -1, np.int32)
    for row, p in enumerate(prefill):
        if p:
            tokens[row, width - len(p):] = p
            positions[row, width - len(p):] = np.arange(len(p))
    first_token = np.full((rows,), config.pad_token_id, np.int32)
    first_token[:batch] = [p[-1] for p in prompts]
    first_position = np.zeros((rows,), np.int32)
    first_position[:batch] = -1 if refeed else [len(p) - 1 for p in prompts]
    lengths = np.zeros((rows,), np.int32)
    lengths[:batch] = [len(p) for p in prompts]
    longest_prefill = max(len(p) for p in prefill)
    needed = width + max_new_tokens if edits_cache else max(width, longest_prefill + max_new_tokens)
    cache_length = ladder.cache_length(needed, config.max_position_embeddings)
    return Request(tokens, positions, first_token, first_position, lengths, batch, width, ladder.chunk, cache_length,
                   max_new_tokens, stop_tokens(config, stop_ids), ladder.rolling, ladder.first_chunk(rows, width))
