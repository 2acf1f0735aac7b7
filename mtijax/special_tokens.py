"""The suppression set: the token ids text generation never samples, and the ids decoding hides.

Gemma 3's vocabulary is the multimodal models' vocabulary. Besides text, it holds image markers
(``<start_of_image>`` 255999, ``<end_of_image>`` 256000), ``[multimodal]``, 6 242 ``<unusedN>``
slots, ``<mask>``, ``<pad>``, ``<bos>`` and ``<unk>``. A text-only model sampled at a temperature
can pick them. Gemma 3 270M at temperature 0.7, seed 3, printed runs of ``<start_of_image>`` for
"Write a haiku about rivers". None of them is text. The suppression set of a model is:

- every added token the tokenizer marks special: the tokenizer's ``added_tokens_decoder`` entries
  with ``special=True``, which in a GGUF file are the tokens of type CONTROL or UNUSED;
- every other added token whose text is a markup name, ``<name>`` or ``[name]`` without spaces
  (``<start_of_image>``, ``[multimodal]``); runs of spaces or newlines are added tokens too, and
  they stay;
- the config's pad and BOS ids;
- but never a stop token (the config's EOS ids, and any ``stop_ids`` given), because generation
  must still be able to end.

Ids outside the model's vocabulary are dropped.

transformers suppresses nothing by default: Gemma 3's ``GenerationConfig`` sets neither
``suppress_tokens`` nor ``bad_words_ids``. Suppression is this package's choice for its command
line, where ``--sample-special`` turns it off. The Python API suppresses only what it is given:
``generate(..., suppress_ids=model.suppress_ids)``. To suppress other ids, pass any other list,
or use ``dataclasses.replace(model, suppress_ids=...)``.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Collection, Iterable, NamedTuple, Sequence

import gguf
import numpy as np

from mtijax.config import ModelConfig

MARKUP = re.compile(r"<[^<>\s]+>|\[[^\[\]\s]+\]")
"""The text of a markup token: ``<name>`` or ``[name]`` with no spaces inside."""
BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
"""SentencePiece's byte-fallback pieces (``<0x0A>``) are text, whatever they look like."""
_GGUF_SPECIAL = {int(gguf.TokenType.CONTROL), int(gguf.TokenType.UNUSED)}
_GGUF_ADDED = _GGUF_SPECIAL | {int(gguf.TokenType.USER_DEFINED)}


class AddedToken(NamedTuple):
    """A vocabulary entry outside the tokenizer's learned pieces: its id, its text, and whether it is special."""

    id: int
    text: str
    special: bool


def tokenizer_added_tokens(tokenizer: Any) -> list[AddedToken]:
    """The added tokens of a tokenizer: mtijax's own Gemma tokenizer (``added_tokens()``) or a ``transformers``
    one (``added_tokens_decoder``)."""
    own = getattr(tokenizer, "added_tokens", None)
    if callable(own):
        return [AddedToken(int(i), text, bool(special)) for i, text, special in own()]
    return [AddedToken(int(i), t.content, bool(t.special)) for i, t in tokenizer.added_tokens_decoder.items()]


def gguf_added_tokens(gguf_file: Any) -> list[AddedToken]:
    """The added tokens in a GGUF file's metadata (read from the header; no tokenizer is converted).

    ``gguf_file`` is an open :class:`mtijax.weights.gguf_file.GGUFFile`; a file without a vocabulary has none.
    """
    types = gguf_file.token_types
    return [AddedToken(int(i), gguf_file.token(int(i)), int(types[i]) in _GGUF_SPECIAL)
            for i in np.flatnonzero(np.isin(types, list(_GGUF_ADDED)))]


def is_markup(text: str) -> bool:
    """Whether ``text`` is a markup name such as ``<start_of_image>`` or ``[multimodal]`` (not a byte piece)."""
    return bool(MARKUP.fullmatch(text)) and not BYTE_TOKEN.fullmatch(text)


def suppress_ids(config: ModelConfig, added: Iterable[AddedToken] = (),
                 stop_ids: Sequence[int] | None = None) -> tuple[int, ...]:
    """The suppression set (see the module docstring), sorted.

    Args:
      config: gives the pad and BOS ids, the EOS ids (never suppressed) and the vocabulary size.
      added: the model's added tokens (:func:`tokenizer_added_tokens` or :func:`gguf_added_tokens`); without
        them only the pad and BOS ids are suppressed.
      stop_ids: further ids that must stay possible (the stop tokens of a call, when not the config's).
    """
    chosen = {t.id for t in added if t.special or is_markup(t.text)}
    chosen |= {i for i in (config.pad_token_id, config.bos_token_id) if i is not None}
    chosen -= set(config.eos_token_ids) | set(stop_ids or ())
    return tuple(sorted(i for i in chosen if 0 <= i < config.vocab_size))


def text_decoder(tokenizer: Any, hidden: Collection[int], show_special: bool = False) -> Callable[[list[int]], str]:
    """``ids -> text`` that leaves out ``hidden`` ids and the tokenizer's special tokens, or with
    ``show_special`` prints every token as it is."""
    if show_special:
        return lambda ids: tokenizer.decode(ids, skip_special_tokens=False)
    hidden = frozenset(hidden)
    return lambda ids: tokenizer.decode([i for i in ids if i not in hidden], skip_special_tokens=True)
