"""The one decode loop: chunked prefill, an optional cache edit, then one jitted decode step per token.

Every technique enters as data (:class:`~mtijax.engine.interventions.Interventions`) and every way of
choosing tokens as a policy (:mod:`mtijax.engine.sampling`), so the same three compiled functions serve
plain, patched, fused and gated generation:

- ``prefill chunk``: ``chunk`` prompt tokens attend to the cache and are written into it (a rolled layer
  scan: cheap to compile, and its cost is shared by the chunk's tokens);
- ``start``: the cache edit, and the decode state before call 0;
- ``decode step``: feed each row's token, sample the next, update the state (an unrolled layer scan, so
  no per-layer weight slices are copied; the cache and state are donated).

They are compiled once per model, params layout, batch bucket, cache rung and intervention structure
(:mod:`mtijax.engine.ladder`); the prompt length and ``max_new_tokens`` change no compiled shape. Steps
are dispatched from Python. A source of params that is not resident (``mtijax.streaming``) passes its own
:class:`LayerStack` to :func:`run`: it computes the prefill chunks and the layers of each decode call, and
ends every call with the same :func:`finish`; the state, the start and the bookkeeping stay the engine's.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from mtijax.config import ModelConfig
from mtijax.engine.compilation_cache import enable_compilation_cache
from mtijax.engine.interventions import Interventions, chunk_patches, pad_batch
from mtijax.engine.request import Request
from mtijax.engine.sampling import Policy
from mtijax.interventions import Patch, RouterHook
from mtijax.models import cache as kv
from mtijax.models.decoder import Params, forward_hidden, unembed

warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
STOP_CHECK_EVERY = 8
""":func:`run` callers that do not read every token look whether all rows are done this often."""


class State(NamedTuple):
    """The decode loop's state (device arrays, donated to each step). Call ``step`` feeds ``token [B]`` at
    ``position [B]`` into cache slot ``slot``.

    Attributes:
      done: ``[B]`` rows that stopped (padding rows of the batch bucket are done from the start).
      count: ``[B]`` tokens emitted per row, the stop token included. keys: ``[B]`` per-row PRNG keys.
      policy: the sampling policy's state. carry: graft layer -> its carry. router: the router hook's state.
    """

    cache: kv.KVCache
    token: jax.Array
    position: jax.Array
    slot: jax.Array
    done: jax.Array
    count: jax.Array
    step: jax.Array
    keys: jax.Array
    policy: Any
    carry: dict[int, Any]
    router: Any


class Record(NamedTuple):
    """What one decode call produced, ``[B]`` each unless said: ``token`` (pad where not emitted), ``emit``,
    ``done`` (after this call), ``halt`` (the policy stopped the row here), the policy's ``readings``
    (name -> ``[B]``), ``trace`` (site -> ``[len(layers), B, *site_shape]``) and ``logits`` (``[B, V]``, only
    when asked for)."""

    token: jax.Array
    emit: jax.Array
    done: jax.Array
    halt: jax.Array
    readings: dict[str, jax.Array]
    trace: dict[str, jax.Array]
    logits: jax.Array | None


def _router(hook: RouterHook | None, state: Any) -> RouterHook | None:
    return None if hook is None else hook.replace(state=state)


def _grafts(interventions: Interventions, carry: Mapping[int, Any]
            ) -> tuple[dict[int, Callable], dict[int, tuple[Any, dict[str, jax.Array]]]]:
    """Residual transforms for ``forward_hidden`` from the grafts and their carries, and the dict they fill
    with each graft's ``(new carry, metrics)`` when traced."""
    outputs: dict[int, tuple[Any, dict[str, jax.Array]]] = {}

    def transform(layer: int) -> Callable:
        graft = interventions.grafts[layer]

        def apply(h: jax.Array, positions: jax.Array) -> jax.Array:
            h, new_carry, metrics = graft.module(graft.variables, h, positions, carry[layer])
            outputs[layer] = (new_carry, metrics)
            return h
        return apply

    return {layer: transform(layer) for layer in interventions.grafts}, outputs


def prefill_chunk(config: ModelConfig, layout: str, params: Params, cache: kv.KVCache, carry: dict[int, Any],
                  router_state: Any, tokens: jax.Array, positions: jax.Array, start: jax.Array,
                  interventions: Interventions) -> tuple[kv.KVCache, dict[int, Any], Any]:
    """Write ``tokens [B, C]`` at slots ``start .. start + C - 1``: the cache, graft carries and router state."""
    patches = {**interventions.patches, **chunk_patches(interventions.prompt_patches, start, tokens.shape[1])}
    transforms, outputs = _grafts(interventions, carry)
    out = forward_hidden(config, params, tokens, positions, cache=cache, write_index=start, patches=patches,
                         transforms=transforms, router=_router(interventions.router, router_state), layout=layout)
    return out.cache, {layer: outputs[layer][0] for layer in carry}, out.router_state


def start(config: ModelConfig, cache: kv.KVCache, carry: dict[int, Any], router_state: Any, policy_state: Any,
          first_token: jax.Array, first_position: jax.Array, lengths: jax.Array, width: jax.Array, keys: jax.Array,
          interventions: Interventions) -> State:
    """The cache edit, then the state before decode call 0 (rows with no prompt are done). ``policy_state`` is
    made outside the compiled function (``policy.start``), so a policy's settings are data."""
    if interventions.cache_edit is not None:
        cache = interventions.cache_edit.fn(cache, interventions.cache_edit.data, width)
    nxt = jnp.max(cache.positions, axis=1) + 1
    position = jnp.where(first_position < 0, nxt, first_position)
    rows = first_token.shape[0]
    return State(cache, first_token, position, jnp.asarray(width, jnp.int32), lengths == 0,
                 jnp.zeros((rows,), jnp.int32), jnp.int32(0), keys, policy_state, dict(carry), router_state)


def decode_step(config: ModelConfig, layout: str, policy: Policy, record_logits: bool, params: Params, state: State,
                interventions: Interventions, stops: jax.Array, suppress: jax.Array | None) -> tuple[State, Record]:
    """Decode call ``state.step``: feed every row's token, choose the next (see :class:`Record`)."""
    patches = {**interventions.patches, **{site: p.at(state.step) for site, p in interventions.step_patches.items()}}
    transforms, outputs = _grafts(interventions, state.carry)
    sites = tuple(sorted({site for site, _ in interventions.trace}))
    out = forward_hidden(config, params, state.token[:, None], state.position[:, None], cache=state.cache,
                         write_index=state.slot, patches=patches, capture=sites, transforms=transforms,
                         router=_router(interventions.router, state.router), layout=layout, unroll=True)
    return finish(config, policy, record_logits, params, state, out.hidden[:, -1], out.cache, out.captured,
                  out.router_state, outputs, interventions, stops, suppress)


def finish(config: ModelConfig, policy: Policy, record_logits: bool, params: Params, state: State, hidden: jax.Array,
           cache: kv.KVCache, captured: Mapping[str, jax.Array], router_state: Any,
           outputs: Mapping[int, tuple[Any, dict[str, jax.Array]]], interventions: Interventions, stops: jax.Array,
           suppress: jax.Array | None) -> tuple[State, Record]:
    """The end of a decode call, after the layers: logits, the policy's choice and the bookkeeping
    (``hidden [B, D]``: the last residual stream). Shared by every source of params."""
    logits = unembed(config, params, hidden)
    split = jax.vmap(jax.random.split)(state.keys)
    metrics = {layer: outputs[layer][1] for layer in sorted(outputs)}
    choice = policy.choose(state.policy, logits, split[:, 1], metrics, state.done, suppress)
    halt = choice.halt & ~state.done
    emit = choice.emit & ~state.done & ~halt
    token = jnp.where(emit, choice.token, config.pad_token_id).astype(jnp.int32)
    done = state.done | halt | (emit & jnp.isin(token, stops))
    trace = {site: captured[site][jnp.asarray(layers)] for site, layers in interventions.trace}
    carry = {layer: outputs[layer][0] for layer in state.carry}
    new = State(cache, token, state.position + 1, state.slot + 1, done, state.count + emit.astype(jnp.int32),
                state.step + 1, split[:, 0], choice.state, carry, router_state)
    return new, Record(token, emit, done, halt, choice.record, trace, logits if record_logits else None)


_chunk_jit = jax.jit(prefill_chunk, static_argnums=(0, 1), donate_argnums=(3,))
_start_jit = jax.jit(start, static_argnums=(0,))
_step_jit = jax.jit(decode_step, static_argnums=(0, 1, 2, 3), donate_argnums=(5,))


class LayerStack(Protocol):
    """How a run computes its prefill chunks and decode calls (see :func:`run`'s ``stack``)."""

    def prefill_chunk(self, cache: kv.KVCache, carry: dict[int, Any], router_state: Any, tokens: jax.Array,
                      positions: jax.Array, start: jax.Array,
                      interventions: Interventions) -> tuple[kv.KVCache, dict[int, Any], Any]:
        """What :func:`prefill_chunk` computes: the cache, graft carries and router state after the chunk."""

    def decode_step(self, policy: Policy, record_logits: bool, state: State, interventions: Interventions,
                    stops: jax.Array, suppress: jax.Array | None) -> tuple[State, Record]:
        """What :func:`decode_step` computes (its layers, then :func:`finish`)."""


class Resident(NamedTuple):
    """The default :class:`LayerStack`: ``params`` on the device, through the jitted prefill chunk and decode step."""

    config: ModelConfig
    layout: str
    params: Params

    def prefill_chunk(self, cache, carry, router_state, tokens, positions, start, interventions):
        return _chunk_jit(self.config, self.layout, self.params, cache, carry, router_state, tokens, positions,
                          start, interventions)

    def decode_step(self, policy, record_logits, state, interventions, stops, suppress):
        return _step_jit(self.config, self.layout, policy, record_logits, self.params, state, interventions, stops,
                         suppress)


def row_keys(seed: int, rows: int) -> jax.Array:
    """Row ``r``'s sampling key: ``fold_in(key(seed), r)``, so a row's draws do not depend on the batch."""
    return jax.vmap(lambda r: jax.random.fold_in(jax.random.key(seed), r))(jnp.arange(rows))


def compiled_counts() -> dict[str, int]:
    """How many programs each engine function has compiled in this process (for the no-recompile tests)."""
    return {"prefill_chunk": _chunk_jit._cache_size(), "start": _start_jit._cache_size(),
            "decode_step": _step_jit._cache_size()}


def _initial(interventions: Interventions, rows: int) -> tuple[dict[int, Any], Any]:
    carry = {layer: graft.module.init_carry(rows) for layer, graft in interventions.grafts.items()}
    hook = interventions.router
    router_state = None if hook is None else (hook.init(hook.params, rows) if hook.state is None else hook.state)
    return carry, router_state


def run(config: ModelConfig, params: Params, request: Request, *, policy: Policy,
        interventions: Interventions = Interventions(), keys: jax.Array | None = None,
        suppress: np.ndarray | None = None, record_logits: bool = False,
        layout: str = "params", stack: LayerStack | None = None) -> Iterator[tuple[State, Record]]:
    """Prefill ``request``, then yield ``(state, record)`` after every decode call (device arrays, not
    synchronised), ``request.max_new_tokens`` times at most; the caller stops iterating when it likes.

    ``keys``: ``[rows]`` per-row PRNG keys (default :func:`row_keys` of seed 0). ``layout``: the params layout
    of ``params`` (``"fused_qkv"`` for :func:`~mtijax.models.fused.fuse_qkv` params). ``stack``: what computes
    the prefill chunks and decode calls (default :class:`Resident` over ``params``); with another stack,
    ``params`` needs only what :func:`finish` reads (embedding, final norm, output head), and the KV cache
    takes the embedding's dtype.
    """
    enable_compilation_cache()
    stack = Resident(config, layout, params) if stack is None else stack
    rows = request.rows
    interventions = pad_batch(interventions, request.batch, rows)
    cache = kv.init_cache(config.num_layers, rows, request.cache_length, config.num_kv_heads, config.head_dim,
                          params["embed"].dtype)
    carry, router_state = _initial(interventions, rows)
    tokens, positions = jnp.asarray(request.tokens), jnp.asarray(request.positions)
    for begin in range(0, request.width, request.chunk):
        cache, carry, router_state = stack.prefill_chunk(
            cache, carry, router_state, tokens[:, begin:begin + request.chunk],
            positions[:, begin:begin + request.chunk], jnp.int32(begin), interventions)
    keys = row_keys(0, rows) if keys is None else keys
    state = _start_jit(config, cache, carry, router_state, policy.start(rows), jnp.asarray(request.first_token),
                       jnp.asarray(request.first_position), jnp.asarray(request.lengths), jnp.int32(request.width),
                       keys, interventions)
    stops = jnp.asarray(request.stops)
    suppress = None if suppress is None or not suppress.any() else jnp.asarray(suppress)
    for _ in range(request.max_new_tokens):
        state, record = stack.decode_step(policy, record_logits, state, interventions, stops, suppress)
        yield state, record


class Collected(NamedTuple):
    """A whole run on the host: ``tokens [B, N]`` (pad after a row stopped), ``lengths [B]`` (emitted, stop token
    included), ``stopped [B]`` (ended with a stop token), ``halted [B]`` (stopped by the policy), ``records``
    (every call's :class:`Record`, real rows only, as numpy)."""

    tokens: np.ndarray
    lengths: np.ndarray
    stopped: np.ndarray
    halted: np.ndarray
    records: list[Record]


def _on_host(record: Record, batch: int) -> Record:
    """``record`` as numpy, real rows only."""
    def cut(a: jax.Array) -> np.ndarray:
        return np.asarray(a)[:batch]

    return Record(cut(record.token), cut(record.emit), cut(record.done), cut(record.halt),
                  {name: cut(v) for name, v in record.readings.items()},
                  {site: np.asarray(v)[:, :batch] for site, v in record.trace.items()},
                  None if record.logits is None else cut(record.logits))


def collect(steps: Iterator[tuple[State, Record]], request: Request, pad_id: int,
            check_every: int = STOP_CHECK_EVERY) -> Collected:
    """Run ``steps`` to the end, looking every ``check_every`` calls whether all rows are done (so steps are
    dispatched without waiting in between), and gather the records on the host."""
    records, state = [], None
    for index, (state, record) in enumerate(steps):
        records.append(record)
        if (index + 1) % check_every == 0 and bool(np.asarray(state.done).all()):
            break
    batch = request.batch
    host = [_on_host(r, batch) for r in records]
    tokens = np.full((batch, request.max_new_tokens), pad_id, np.int32)
    tokens[:, :len(host)] = np.stack([r.token for r in host], axis=1)
    halted = np.any(np.stack([r.halt for r in host]), axis=0)
    lengths = np.asarray(state.count)[:batch]
    return Collected(tokens, lengths, np.asarray(state.done)[:batch] & ~halted, halted, host)


def stream(steps: Iterator[tuple[State, Record]], request: Request) -> Iterator[tuple[State, Record]]:
    """``steps`` read one call at a time, ending once every row is done."""
    for state, record in steps:
        yield state, record
        if bool(np.asarray(record.done).all()):
            return
