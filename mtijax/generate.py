"""Jitted generation: prefill, then a decode loop over a fixed-size KV cache.

Prompts of different lengths are left-padded to a common length (rounded up
to a multiple of 16 so nearby lengths share one compile); padding slots have
position -1 and are never attended to, so a row's tokens do not depend on the
other rows. The cache holds ``prompt length + max_new_tokens`` slots (also
rounded), so the decode step has one shape and compiles once.

Both drivers run one jitted prefill, then one jitted, cache-donating decode
step per token from Python, so they give the same tokens: :func:`generate`
dispatches the steps without waiting and returns all tokens at the end;
:func:`generate_stream` yields each token as it comes (the CLI uses it to
print text as it is generated).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mtijax.config import ModelConfig
from mtijax.errors import MtijaxError
from mtijax.models import cache as kv
from mtijax.models.decoder import Params, forward_hidden, unembed
from mtijax.models.fused import fuse_qkv

warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
BUCKET = 16
STOP_CHECK_EVERY = 8
UNROLL_LAYERS = True
"""Generation unrolls the layer scan. Measured on an H100 (Gemma 3 12B shapes, batch 1): a decode step
whose layers are a rolled ``lax.scan`` over the stacked weights, or that runs inside a ``lax.while_loop``,
took 27-30 ms against 14 ms for the unrolled step dispatched from Python (``experiments/probe_*.py``):
slicing stacked weights inside a loop costs XLA a copy of every layer's weights."""


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
      stopped: ``[B]`` bool, whether the row ended with a stop token (it may
        be the row's last allowed token, so ``lengths`` alone cannot tell).
    """

    tokens: np.ndarray
    lengths: np.ndarray
    stopped: np.ndarray

    def ids(self, row: int, *, keep_stop: bool = False) -> list[int]:
        """Row ``row``'s generated ids (without its stop token unless ``keep_stop``)."""
        ids = self.tokens[row, : self.lengths[row]].tolist()
        return ids[:-1] if self.stopped[row] and not keep_stop else ids


def sample(logits: jax.Array, key: jax.Array, sampling: Sampling,
           suppress_ids: Sequence[int] | jax.Array | None = None) -> jax.Array:
    """Choose one token per row from float32 ``logits [B, V]``: ``[B]`` int32.

    ``suppress_ids`` (``[n]`` ids) are never chosen: their logits are set to -inf before anything else,
    greedy included.
    """
    if suppress_ids is not None:
        logits = logits.at[..., jnp.asarray(suppress_ids, jnp.int32)].set(-jnp.inf)
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


def bucketed(length: int) -> int:
    """``length`` rounded up to a multiple of :data:`BUCKET` (prompt widths and cache sizes, so nearby sizes share
    one compile)."""
    return -(-length // BUCKET) * BUCKET


def check_token_ids(config: ModelConfig, ids) -> None:
    """Raise :class:`MtijaxError` naming the first id of ``ids`` (a flat list, or an array of any shape) outside
    the vocabulary."""
    flat = np.asarray(ids, np.int64).ravel()
    bad = flat[(flat < 0) | (flat >= config.vocab_size)]
    if bad.size:
        raise MtijaxError(f"token id {int(bad[0])} is out of range: the vocabulary has ids 0..{config.vocab_size - 1}")


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Left-pad prompts: ``tokens [B, P]``, ``positions [B, P]`` (-1 on padding), ``lengths [B]``."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise MtijaxError("every prompt needs at least one token")
    lengths = np.array([len(p) for p in prompts], np.int32)
    width = bucketed(int(lengths.max()))
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    positions = np.full((len(prompts), width), -1, np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, width - len(prompt):] = prompt
        positions[row, width - len(prompt):] = np.arange(len(prompt))
    return tokens, positions, lengths


class DecodeState(NamedTuple):
    """Everything a decode step reads and writes (device arrays; donated to each step).

    Attributes:
      cache: the KV cache. token: ``[B]`` the last token produced.
      done: ``[B]`` rows that produced a stop token. out: ``[B, N]`` tokens so far.
      count: ``[B]`` tokens produced per row, the stop token included.
      step: int32, index in ``out`` of ``token``. key: the sampling PRNG key.
    """

    cache: kv.KVCache
    token: jax.Array
    done: jax.Array
    out: jax.Array
    count: jax.Array
    step: jax.Array
    key: jax.Array


def _prefill(config: ModelConfig, params: Params, tokens, positions, stop_ids, key, sampling: Sampling,
             max_new_tokens: int, cache_length: int, suppress=None) -> DecodeState:
    batch = tokens.shape[0]
    cache = kv.init_cache(config.num_layers, batch, cache_length, config.num_kv_heads, config.head_dim,
                          params["embed"].dtype)
    x, cache, _ = forward_hidden(config, params, tokens, positions, cache=cache, write_index=0,
                                 unroll=UNROLL_LAYERS)
    key, sub = jax.random.split(key)
    first = sample(unembed(config, params, x[:, -1]), sub, sampling, suppress)
    out = jnp.full((batch, max_new_tokens), config.pad_token_id, jnp.int32).at[:, 0].set(first)
    return DecodeState(cache, first, jnp.isin(first, stop_ids), out, jnp.ones((batch,), jnp.int32),
                       jnp.int32(0), key)


def _step(config: ModelConfig, params: Params, state: DecodeState, lengths, width, stop_ids,
          sampling: Sampling, suppress=None) -> DecodeState:
    """Feed ``state.token`` (position ``lengths + step``, cache slot ``width + step``) and sample the next."""
    x, cache, _ = forward_hidden(config, params, state.token[:, None], (lengths + state.step)[:, None],
                                 cache=state.cache, write_index=width + state.step, unroll=UNROLL_LAYERS)
    key, sub = jax.random.split(state.key)
    nxt = jnp.where(state.done, config.pad_token_id,
                    sample(unembed(config, params, x[:, -1]), sub, sampling, suppress))
    step = state.step + 1
    return DecodeState(cache, nxt, state.done | jnp.isin(nxt, stop_ids), state.out.at[:, step].set(nxt),
                       state.count + (~state.done).astype(jnp.int32), step, key)


_prefill_jit = jax.jit(_prefill, static_argnames=("config", "sampling", "max_new_tokens", "cache_length"))
_step_jit = jax.jit(_step, static_argnames=("config", "sampling"), donate_argnames=("state",))


def stop_tokens(config: ModelConfig, stop_ids: Sequence[int] | None) -> np.ndarray:
    """The ids that end a row, ``[n]`` int32: ``stop_ids``, else the config's EOS ids; ``[-1]`` (never) if none."""
    return np.array(sorted(set(config.eos_token_ids if stop_ids is None else stop_ids)) or [-1], np.int32)


def prepare(config: ModelConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int,
            stop_ids: Sequence[int] | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, np.ndarray]:
    """Check and lay out a generation request, for every decode loop (plain, fused, streamed).

    Returns ``tokens [B, P]`` and ``positions [B, P]`` (left-padded, see :func:`pad_prompts`), ``lengths [B]``, the
    cache length (prompt width + ``max_new_tokens``, bucketed) and :func:`stop_tokens`.
    """
    if max_new_tokens < 1:
        raise MtijaxError(f"max-new-tokens must be >= 1, got {max_new_tokens}")
    check_token_ids(config, [t for p in prompts for t in p])
    tokens, positions, lengths = pad_prompts(prompts, config.pad_token_id)
    return tokens, positions, lengths, bucketed(tokens.shape[1] + max_new_tokens), stop_tokens(config, stop_ids)


def _decode(config: ModelConfig, params: Params, prompts: Sequence[Sequence[int]], max_new_tokens: int,
            sampling: Sampling, seed: int, stop_ids: Sequence[int] | None,
            suppress_ids: Sequence[int] | None) -> Iterator[DecodeState]:
    """Prefill, then one jitted step per token; yields the state after each (not synchronised).

    The steps run on :func:`~mtijax.models.fused.fuse_qkv` params (one q/k/v matrix per layer, made once per
    call: a copy of the q/k/v weights lives on the device while decoding).
    """
    tokens, positions, lengths, cache_length, stops = prepare(config, prompts, max_new_tokens, stop_ids)
    suppress = jnp.asarray(sorted(set(suppress_ids)), jnp.int32) if suppress_ids else None
    state = _prefill_jit(config, params, tokens, positions, stops, jax.random.key(seed), sampling,
                         max_new_tokens, cache_length, suppress)
    yield state
    if max_new_tokens > 1:
        params = fuse_qkv(params)
    lengths, width, stops = jnp.asarray(lengths), jnp.int32(tokens.shape[1]), jnp.asarray(stops)
    for _ in range(max_new_tokens - 1):
        state = _step_jit(config, params, state, lengths, width, stops, sampling, suppress)
        yield state


def generate(config: ModelConfig, params: Params, prompts: Sequence[Sequence[int]], max_new_tokens: int = 32, *,
             sampling: Sampling = Sampling(), seed: int = 0, stop_ids: Sequence[int] | None = None,
             suppress_ids: Sequence[int] | None = None) -> Generation:
    """Generate up to ``max_new_tokens`` for each prompt (lists of token ids).

    A row stops after it produces a token in ``stop_ids`` (default: the
    config's EOS ids; pass ``()`` to never stop early). Tokens in
    ``suppress_ids`` are never produced (default: none; ``Model.suppress_ids``
    is the set a text model should not emit, see ``mtijax.special_tokens``). Steps are dispatched
    without waiting for the device; every ``STOP_CHECK_EVERY`` steps the host
    looks whether all rows are done.
    """
    for index, state in enumerate(_decode(config, params, prompts, max_new_tokens, sampling, seed, stop_ids,
                                           suppress_ids)):
        if index % STOP_CHECK_EVERY == 0 and bool(np.asarray(state.done).all()):
            break
    return Generation(np.asarray(state.out), np.asarray(state.count), np.asarray(state.done))


def generate_stream(config: ModelConfig, params: Params, prompts: Sequence[Sequence[int]],
                    max_new_tokens: int = 32, *, sampling: Sampling = Sampling(), seed: int = 0,
                    stop_ids: Sequence[int] | None = None,
                    suppress_ids: Sequence[int] | None = None) -> Iterator[np.ndarray]:
    """Like :func:`generate`, but yields each step's ``[B]`` tokens as soon as they exist.

    Rows that have stopped yield the pad id; iteration ends when every row
    has stopped or ``max_new_tokens`` tokens were produced.
    """
    for state in _decode(config, params, prompts, max_new_tokens, sampling, seed, stop_ids, suppress_ids):
        yield np.asarray(state.token)
        if bool(np.asarray(state.done).all()):
            return
