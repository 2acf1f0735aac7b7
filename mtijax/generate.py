"""Jitted generation: prefill, then a decode loop over a fixed-size KV cache.

Prompts of different lengths are left-padded to a common length (rounded up
to a multiple of 16 so nearby lengths share one compile); padding slots have
position -1 and are never attended to, so a row's tokens do not depend on the
other rows. The cache holds ``prompt length + max_new_tokens`` slots (also
rounded), so the decode step has one shape and compiles once.

Two drivers share the same prefill and step functions and give the same
tokens: :func:`generate` runs the whole loop inside one ``jax.jit`` (a
``lax.while_loop`` that stops when every row has produced a stop token), and
:func:`generate_stream` runs a jitted step per token from Python and yields
each token as it comes (the CLI uses it to print text as it is generated).
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mtijax.config import Gemma3Config
from mtijax.errors import MtijaxError
from mtijax.models import cache as kv
from mtijax.models.gemma3 import Params, forward_hidden, unembed

warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
BUCKET = 16


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. ``temperature == 0`` is greedy (argmax);
    ``top_k == 0`` and ``top_p == 1`` switch those filters off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature < 0 or not np.isfinite(self.temperature):
            raise MtijaxError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise MtijaxError(f"top-k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise MtijaxError(f"top-p must be in (0, 1], got {self.top_p}")


class Generation(NamedTuple):
    """Generated tokens.

    Attributes:
      tokens: ``[B, N]`` int32; after a row's stop token the row holds the pad id.
      lengths: ``[B]`` tokens generated per row, the stop token included.
    """

    tokens: np.ndarray
    lengths: np.ndarray

    def ids(self, row: int, *, keep_stop: bool = False) -> list[int]:
        """Row ``row``'s generated ids (without its stop token unless ``keep_stop``)."""
        ids = self.tokens[row, : self.lengths[row]].tolist()
        return ids if keep_stop or not ids else ids[:-1] if self._stopped[row] else ids

    @property
    def _stopped(self) -> np.ndarray:
        return self.lengths < self.tokens.shape[1]


def sample(logits: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
    """Choose one token per row from float32 ``logits [B, V]``: ``[B]`` int32."""
    if sampling.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
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
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Left-pad prompts: ``tokens [B, P]``, ``positions [B, P]`` (-1 on padding), ``lengths [B]``."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise MtijaxError("every prompt needs at least one token")
    lengths = np.array([len(p) for p in prompts], np.int32)
    width = -(-int(lengths.max()) // BUCKET) * BUCKET
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    positions = np.full((len(prompts), width), -1, np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, width - len(prompt):] = prompt
        positions[row, width - len(prompt):] = np.arange(len(prompt))
    return tokens, positions, lengths


def _prefill(config: Gemma3Config, params: Params, tokens, positions, cache, key, sampling: Sampling):
    x, cache, _ = forward_hidden(config, params, tokens, positions, cache=cache, write_index=0)
    key, sub = jax.random.split(key)
    return sample(unembed(config, params, x[:, -1]), sub, sampling), cache, key


def _step(config: Gemma3Config, params: Params, cache, token, position, write_index, key, sampling: Sampling):
    x, cache, _ = forward_hidden(config, params, token[:, None], position[:, None], cache=cache,
                                 write_index=write_index)
    key, sub = jax.random.split(key)
    return sample(unembed(config, params, x[:, -1]), sub, sampling), cache, key


_prefill_jit = jax.jit(_prefill, static_argnames=("config", "sampling"), donate_argnames=("cache",))
_step_jit = jax.jit(_step, static_argnames=("config", "sampling"), donate_argnames=("cache",))


@functools.partial(jax.jit, static_argnames=("config", "sampling", "max_new_tokens", "cache_length"))
def _generate_loop(config: Gemma3Config, params: Params, tokens, positions, lengths, stop_ids, key,
                   sampling: Sampling, max_new_tokens: int, cache_length: int):
    batch, width = tokens.shape
    cache = kv.init_cache(config.num_layers, batch, cache_length, config.num_kv_heads, config.head_dim,
                          params["embed"].dtype)
    first, cache, key = _prefill(config, params, tokens, positions, cache, key, sampling)
    out = jnp.full((batch, max_new_tokens), config.pad_token_id, jnp.int32).at[:, 0].set(first)
    done = jnp.isin(first, stop_ids)
    count = jnp.ones((batch,), jnp.int32)

    def cond(state):
        step, _, _, done, _, _, _ = state
        return (step < max_new_tokens - 1) & ~jnp.all(done)

    def body(state):
        step, cache, token, done, out, count, key = state
        nxt, cache, key = _step(config, params, cache, token, lengths + step, width + step, key, sampling)
        nxt = jnp.where(done, config.pad_token_id, nxt)
        out = out.at[:, step + 1].set(nxt)
        count = count + (~done).astype(jnp.int32)
        done = done | jnp.isin(nxt, stop_ids)
        return step + 1, cache, nxt, done, out, count, key

    state = (jnp.int32(0), cache, first, done, out, count, key)
    *_, out, count, _ = jax.lax.while_loop(cond, body, state)
    return out, count


def _setup(config: Gemma3Config, prompts: Sequence[Sequence[int]], max_new_tokens: int,
           stop_ids: Sequence[int] | None):
    if max_new_tokens < 1:
        raise MtijaxError(f"max-new-tokens must be >= 1, got {max_new_tokens}")
    bad = [t for p in prompts for t in p if not 0 <= int(t) < config.vocab_size]
    if bad:
        raise MtijaxError(f"token id {bad[0]} is out of range: the vocabulary has ids 0..{config.vocab_size - 1}")
    tokens, positions, lengths = pad_prompts(prompts, config.pad_token_id)
    cache_length = -(-(tokens.shape[1] + max_new_tokens) // BUCKET) * BUCKET
    stops = np.array(sorted(set(config.eos_token_ids if stop_ids is None else stop_ids)) or [-1], np.int32)
    return tokens, positions, lengths, cache_length, stops


def generate(config: Gemma3Config, params: Params, prompts: Sequence[Sequence[int]], max_new_tokens: int = 32, *,
             sampling: Sampling = Sampling(), seed: int = 0, stop_ids: Sequence[int] | None = None) -> Generation:
    """Generate up to ``max_new_tokens`` for each prompt (lists of token ids), in one jitted loop.

    A row stops after it produces a token in ``stop_ids`` (default: the
    config's EOS ids; pass ``()`` to never stop early).
    """
    tokens, positions, lengths, cache_length, stops = _setup(config, prompts, max_new_tokens, stop_ids)
    out, count = _generate_loop(config, params, tokens, positions, lengths, stops, jax.random.key(seed),
                                sampling, max_new_tokens, cache_length)
    return Generation(np.asarray(out), np.asarray(count))


def generate_stream(config: Gemma3Config, params: Params, prompts: Sequence[Sequence[int]],
                    max_new_tokens: int = 32, *, sampling: Sampling = Sampling(), seed: int = 0,
                    stop_ids: Sequence[int] | None = None) -> Iterator[np.ndarray]:
    """Like :func:`generate`, but yields each step's ``[B]`` tokens as soon as they exist.

    Rows that have stopped yield the pad id; iteration ends when every row
    has stopped or ``max_new_tokens`` tokens were produced.
    """
    tokens, positions, lengths, cache_length, stops = _setup(config, prompts, max_new_tokens, stop_ids)
    cache = kv.init_cache(config.num_layers, len(prompts), cache_length, config.num_kv_heads, config.head_dim,
                          params["embed"].dtype)
    token, cache, key = _prefill_jit(config, params, tokens, positions, cache, jax.random.key(seed), sampling)
    token = np.asarray(token)
    done = np.isin(token, stops)
    yield token
    width = tokens.shape[1]
    for step in range(max_new_tokens - 1):
        if done.all():
            return
        nxt, cache, key = _step_jit(config, params, cache, jnp.asarray(token), jnp.asarray(lengths + step),
                                    jnp.int32(width + step), key, sampling)
        token = np.where(done, config.pad_token_id, np.asarray(nxt))
        done |= np.isin(token, stops)
        yield token
