"""The compile ladder: the few shapes every generation request is rounded to, so compiles are shared.

A request's shapes are its batch, its prompt width and its cache length. Each is rounded to a short
ladder, so a new prompt length or ``max_new_tokens`` reuses the compiled prefill and decode step:

- **prefill** runs in chunks of ``chunk`` tokens (one compiled chunk serves every prompt length); where the
  ladder has a ``long_chunk``, a long prompt's first ``long_chunk`` slots run as one call instead, once that
  program exists (it compiles in the background the first time a prompt is long enough, and the short chunks
  serve meanwhile: ``mtijax.engine.loop.run``);
- **cache** lengths are powers of two from ``min_cache`` up (capped at the model's context), so
  every request that fits a rung shares its compiles;
- **batch** sizes are powers of two (padding rows are generated and thrown away).

``Ladder(max_context=N)`` pins one cache rung up front: every request that fits ``N`` slots then
shares one prefill and one decode compile, at the cost of decode attention over ``N`` slots on the
full-attention layers.

A rung longer than the sliding layers' window gives those layers a rolling cache of ``window`` slots
(``mtijax.models.cache``); ``Ladder(rolling=False)`` keeps every layer at full length (the layout a
KV-cache edit and the other layer stacks use anyway).
"""

from __future__ import annotations

import dataclasses

import jax

from mtijax.errors import MtijaxError


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class Ladder:
    """The rungs: prefill ``chunk`` tokens, cache lengths (powers of two from ``min_cache``, or the one
    ``max_context``), batch buckets (powers of two); ``rolling``: sliding layers may keep a window-sized ring;
    ``long_chunk``: the first call of a prefill at least this wide covers this many slots (a multiple of
    ``chunk``; None: every call is one chunk), at batch buckets up to :data:`LONG_CHUNK_MAX_ROWS`."""

    chunk: int = 64
    min_cache: int = 256
    max_context: int | None = None
    rolling: bool = True
    long_chunk: int | None = None

    def __post_init__(self) -> None:
        if self.chunk < 1 or self.min_cache < 1:
            raise MtijaxError(f"prefill chunk and cache rungs must be >= 1, got {self.chunk} and {self.min_cache}")
        if self.long_chunk is not None and (self.long_chunk <= self.chunk or self.long_chunk % self.chunk):
            raise MtijaxError(f"the long prefill chunk must be a multiple of the chunk ({self.chunk}) above it, "
                              f"got {self.long_chunk}")

    def first_chunk(self, rows: int, width: int) -> int | None:
        """The long first call's width for a request of ``rows`` rows and prefill ``width`` (None: none)."""
        if self.long_chunk is None or rows > LONG_CHUNK_MAX_ROWS or width < self.long_chunk:
            return None
        return self.long_chunk

    def prefill_width(self, longest_prefill: int) -> int:
        """Slots the prefill region takes: the longest prefill (tokens before each row's last prompt token)
        rounded up to whole chunks (0 when every prompt is one token)."""
        return -(-longest_prefill // self.chunk) * self.chunk

    def cache_length(self, needed: int, context: int | None) -> int:
        """The rung holding ``needed`` slots; refuses past the model's ``context`` (None: no limit)."""
        if self.max_context is not None:
            if needed > self.max_context:
                raise MtijaxError(f"this request needs {needed} cache slots, more than max_context "
                                  f"{self.max_context}")
            return self.max_context
        rung = max(self.min_cache, _next_power_of_two(needed))
        if context is not None:
            rung = min(rung, max(context, needed))
        return rung

    @staticmethod
    def batch_bucket(batch: int) -> int:
        """Rows actually run for ``batch`` prompts: the next power of two."""
        return _next_power_of_two(batch)


LONG_CHUNK_MAX_ROWS = 2
"""The largest batch bucket that takes the long first chunk: at 4 rows and more a short chunk is already 1 024
tokens a call, and a long one's attention scores (rows x heads x 2 048 x 2 048 in float32 on every layer) grow with
the rows."""

ACCELERATOR_LONG_CHUNK = 2048
"""The long first prefill call on accelerators. On the H200 a 2k-token prompt's prefill took 131 ms of GPU time in
one 2 048-token call against 226 ms in 256-token chunks on Gemma 3 12B, 36 ms against 54 ms on the 1B
(``experiments/results/probe_prefill_profile_h200.json``)."""

ACCELERATOR_MIN_CACHE = 8192
"""The smallest cache rung on accelerators: every request needing up to 8192 slots shares one prefill and one
decode compile. With the rolling layout only the full-attention layers hold all the slots; on the H200 the 270M's
decode step took 1.08 ms of GPU time at this rung against 1.05 ms at 512 slots
(``experiments/probe_step_profile.py``), and its cache is 58 MB at batch 1."""


def default_ladder(rolling: bool = True) -> Ladder:
    """The ladder for the default backend: on accelerators 256-token prefill chunks, a long first chunk of
    :data:`ACCELERATOR_LONG_CHUNK` and rungs from :data:`ACCELERATOR_MIN_CACHE`; on the CPU 64-token chunks and
    rungs from 256 (where a chunk's padding and attention over empty slots cost real time, and a second prefill
    program would cost a compile that the CPU's prompts do not repay). ``rolling=False`` (callers whose cache keeps the full layout on
    every layer: the streamer, sharded generation) keeps rungs from 256 everywhere, since there every layer
    would hold all 8192 slots."""
    if jax.default_backend() == "cpu":
        return Ladder(chunk=64)
    return Ladder(chunk=256, min_cache=ACCELERATOR_MIN_CACHE if rolling else 256, long_chunk=ACCELERATOR_LONG_CHUNK)
