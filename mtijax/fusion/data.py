"""Training text: a small corpus that ships with Python, cut into fixed-length token windows.

The corpus is CPython's own ``pydoc_data.topics``: the text of the Python Language Reference topics that
``help()`` shows (79 topics, about 465 000 characters of English prose and grammar), present in every
CPython installation. Topics are sorted by name; every fifth (``index % 5 == 4``) is held out, so held-out
perplexity is measured on topics the fusion layers never trained on.

A window is ``seq_len`` tokens: the model's BOS token (when it has one) and then ``seq_len - 1``
consecutive tokens of the text. The batch of step ``k`` depends only on ``(seed, k)`` (each epoch is a
fresh permutation of the windows), so resuming at step ``k`` sees exactly the batches an uninterrupted
run would.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from mtijax.errors import MtijaxError

HELD_OUT_EVERY = 5


def python_topics() -> tuple[str, str]:
    """``(train_text, held_out_text)`` from ``pydoc_data.topics``."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    train = [topics[n] for i, n in enumerate(names) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1]
    held_out = [topics[n] for i, n in enumerate(names) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]
    return "\n\n".join(train), "\n\n".join(held_out)


def token_windows(text: str, encode: Callable[[str], Sequence[int]], seq_len: int, bos_id: int | None,
                  limit: int | None = None) -> np.ndarray:
    """Non-overlapping windows ``[n, seq_len]`` int32 of ``text``'s tokens (BOS first), at most ``limit`` of them."""
    if seq_len < 2:
        raise MtijaxError(f"seq-len must be at least 2, got {seq_len}")
    ids = np.asarray(encode(text), np.int32)
    body = seq_len - (bos_id is not None)
    n = len(ids) // body
    if limit is not None:
        n = min(n, limit)
    if n == 0:
        raise MtijaxError(f"the text has {len(ids)} tokens, fewer than one window of {seq_len}")
    windows = ids[: n * body].reshape(n, body)
    if bos_id is not None:
        windows = np.concatenate([np.full((n, 1), bos_id, np.int32), windows], axis=1)
    return windows


def batch_at(windows: np.ndarray, step: int, batch_size: int, seed: int) -> np.ndarray:
    """The ``[batch_size, seq_len]`` batch of training step ``step`` (a function of ``seed`` and ``step`` only)."""
    n = len(windows)
    rows = []
    for index in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(index, n)
        rows.append(np.random.default_rng([seed, epoch]).permutation(n)[offset])
    return windows[np.asarray(rows)]
