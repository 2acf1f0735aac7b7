"""How the next token is chosen: :class:`Sampling` (greedy, temperature, top-k, top-p) and sampling
policies with state.

A *policy* is a static, hashable object the decode step calls once per call::

    state = policy.start(batch, sampling)                                 # before call 0
    choice = policy.choose(state, logits [B, V], keys [B], metrics, done)  # every call

``metrics`` are the grafted transforms' per-token readings of the token just fed (layer -> name ->
``[B, 1]``). :class:`Plain` samples with :class:`Sampling` and keeps no state; the fusion layers'
stability-aware decoding (``mtijax.fusion.decode``) is a policy with state.

Every row samples with its own PRNG key, so a row's tokens do not depend on the other rows.
Suppressed ids (``suppress [V]`` bool) get probability 0 before any choice, greedy included.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from mtijax.errors import MtijaxError


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. ``temperature == 0`` is greedy (argmax);
    ``top_k == 0`` and ``top_p == 1`` switch those filters off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not np.isfinite(self.temperature):
            raise MtijaxError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.temperature < 0:
            raise MtijaxError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise MtijaxError(f"top-k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise MtijaxError(f"top-p must be in (0, 1], got {self.top_p}")


def suppress_mask(vocab_size: int, suppress_ids: Any) -> np.ndarray:
    """``[V]`` bool, True at the ids that must never be sampled (``suppress_ids``: ids, or None for none)."""
    mask = np.zeros((vocab_size,), bool)
    if suppress_ids is not None:
        ids = np.asarray(list(suppress_ids), np.int64)
        bad = ids[(ids < 0) | (ids >= vocab_size)]
        if bad.size:
            raise MtijaxError(f"suppressed token id {int(bad[0])} is out of range: the vocabulary has ids "
                              f"0..{vocab_size - 1}")
        mask[ids] = True
    return mask


def filtered_logits(logits: jax.Array, sampling: Sampling, suppress: jax.Array | None = None) -> jax.Array:
    """``logits [..., V]`` with suppressed ids and the ids top-k/top-p drop set to -inf, divided by the
    temperature (when it is not 0)."""
    if suppress is not None:
        logits = jnp.where(suppress, -jnp.inf, logits)
    if sampling.temperature == 0:
        return logits
    logits = logits / sampling.temperature
    if sampling.top_k:
        kth = jax.lax.top_k(logits, min(sampling.top_k, logits.shape[-1]))[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1:
        ordered = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
        kept = jnp.sum(before < sampling.top_p, axis=-1, keepdims=True)
        cutoff = jnp.take_along_axis(ordered, kept - 1, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


def sample(logits: jax.Array, key: jax.Array, sampling: Sampling, suppress: jax.Array | None = None) -> jax.Array:
    """Choose one token per row from float32 ``logits [B, V]`` with one key for the batch: ``[B]`` int32."""
    logits = filtered_logits(logits, sampling, suppress)
    if sampling.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def sample_rows(logits: jax.Array, keys: jax.Array, sampling: Sampling,
                suppress: jax.Array | None = None) -> jax.Array:
    """One token per row, row ``b`` drawn with its own ``keys[b]``: ``logits [B, V]`` -> ``[B]`` int32."""
    logits = filtered_logits(logits, sampling, suppress)
    if sampling.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.vmap(lambda row, key: jax.random.categorical(key, row))(logits, keys).astype(jnp.int32)


class Choice(NamedTuple):
    """What a policy decides at one call, ``[B]`` each: the ``token``, whether it is emitted (``emit``; a row
    that is not emitting is padded), whether the row must stop before emitting (``halt``), the policy's next
    ``state``, and per-row readings to report (``record``: name -> ``[B]``)."""

    token: jax.Array
    emit: jax.Array
    halt: jax.Array
    state: Any
    record: dict[str, jax.Array]


class Policy(Protocol):
    """A sampling policy (static and hashable: it is part of the compiled decode step)."""

    def start(self, batch: int) -> Any:
        """The policy's state before call 0."""

    def choose(self, state: Any, logits: jax.Array, keys: jax.Array,
               metrics: Mapping[int, Mapping[str, jax.Array]], done: jax.Array,
               suppress: jax.Array | None) -> Choice:
        """Choose every row's token from ``logits [B, V]``."""


@dataclasses.dataclass(frozen=True)
class Plain:
    """Sample with :class:`Sampling`; no state, nothing to report."""

    sampling: Sampling = Sampling()

    def start(self, batch: int) -> Any:
        return ()

    def choose(self, state: Any, logits: jax.Array, keys: jax.Array,
               metrics: Mapping[int, Mapping[str, jax.Array]], done: jax.Array,
               suppress: jax.Array | None) -> Choice:
        token = sample_rows(logits, keys, self.sampling, suppress)
        return Choice(token, ~done, jnp.zeros_like(done), state, {})
