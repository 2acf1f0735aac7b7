"""The one decode loop: chunked prefill, an optional cache edit, then one jitted decode step per token.

Every technique enters as data (:class:`~mtijax.engine.interventions.Interventions`) and every way of
choosing tokens as a policy (:mod:`mtijax.engine.sampling`), so the same three compiled functions serve
plain, patched, fused and gated generation:

- ``prefill chunk``: ``chunk`` prompt tokens attend to the cache and are written into it (a rolled layer
  scan: cheap to compile, and its cost is shared by the chunk's tokens);
- ``start``: the cache edit, and the decode state before call 0;
- ``decode step``: feed each row's token, sample the next, update the state (the cache and state are
  donated). On accelerators its layer scan is unrolled, so no per-layer weight slices are copied, and it takes
  every layer's weights as buffers of their own where they fit (:func:`split_layers`); on the CPU it stays
  rolled (:func:`layer_unroll`).

They are compiled once per model, params layout, batch bucket, cache rung and intervention structure
(:mod:`mtijax.engine.ladder`); the prompt length and ``max_new_tokens`` change no compiled shape. A new
signature's decode step compiles on a background thread while its prefill compiles (:func:`compile_step_ahead`).
On accelerators the prefill chunk and the decode program are built twice (:mod:`mtijax.engine.tiers`): a quick
build without XLA's autotuner serves the first calls, the tuned build every call after it exists.
Steps are dispatched from Python; on accelerators a resident run dispatches them ``decode_block_size()`` at a time
as one program (:func:`decode_block`), and yields their records call by call. A source of params that is not
resident (``mtijax.streaming``) passes its own :class:`LayerStack` to :func:`run`: it computes the prefill chunks
and the layers of each decode call, and ends every call with the same :func:`finish`; the state, the start and the
bookkeeping stay the engine's.

A *sweep* (``run(..., sweep_axes=...)``) runs ``K`` variants of the interventions at once: the three
functions are ``jax.vmap``-ed over the intervention leaves that ``sweep_axes`` marks, so ``K`` layer masks
(say) share one compiled prefill and decode step, and every state and record array gets a leading ``K``
axis.
"""

from __future__ import annotations

import functools
import os
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
from mtijax.engine.tiers import Compiling, Tiers, committed_devices, signature, tiered_compile
from mtijax.errors import MtijaxError
from mtijax.interventions import RouterHook
from mtijax.models import cache as kv
from mtijax.models.decoder import Params, family, forward_hidden, unembed

warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
STOP_CHECK_EVERY = 8
""":func:`run` callers that do not read every token look whether all rows are done this often."""


class State(NamedTuple):
    """The decode loop's state (device arrays, donated to each step). Call ``step`` feeds ``token [B]`` at
    ``position [B]`` into cache slot ``slot``.

    Attributes:
      done: ``[B]`` rows that stopped (padding rows of the batch bucket are done from the start).
      count: ``[B]`` tokens emitted per row, the stop token included. keys: ``[B, 2]`` uint32, each row's PRNG
        key as raw data (``jax.random.key_data``): typed key arrays would take jit's slower Python dispatch
        path at every step.
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
    """What one decode call produced. ``flags [4, B]`` int32 holds the ``token`` (pad where not emitted), ``emit``,
    ``done`` (after this call) and ``halt`` (the policy stopped the row here) rows, read through the properties of
    those names (``[B]`` each): one array, so a call's record reaches the host in one copy. Also the policy's
    ``readings`` (name -> ``[B]``), ``trace`` (site -> ``[len(layers), B, *site_shape]``) and ``logits`` (``[B, V]``,
    only when asked for). A sweep's arrays have a leading ``K`` axis (``flags [K, 4, B]``)."""

    flags: jax.Array
    readings: dict[str, jax.Array]
    trace: dict[str, jax.Array]
    logits: jax.Array | None

    @property
    def token(self) -> jax.Array:
        return self.flags[..., 0, :]

    @property
    def emit(self) -> jax.Array:
        return self.flags[..., 1, :] != 0

    @property
    def done(self) -> jax.Array:
        return self.flags[..., 2, :] != 0

    @property
    def halt(self) -> jax.Array:
        return self.flags[..., 3, :] != 0


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
                         transforms=transforms, router=_router(interventions.router, router_state), layout=layout,
                         unroll=layer_unroll("prefill"))
    return out.cache, {layer: outputs[layer][0] for layer in carry}, out.router_state


def prefill_first(config: ModelConfig, layout: str, params: Params, cache: kv.KVCache, carry: dict[int, Any],
                  router_state: Any, tokens: jax.Array, positions: jax.Array,
                  interventions: Interventions) -> tuple[kv.KVCache, dict[int, Any], Any]:
    """What :func:`prefill_chunk` computes for the first ``C`` slots of an empty cache (``start`` 0): the tokens
    attend to each other only, and their keys and values are written into the cache afterwards, so no query
    scores the cache's empty slots (``C`` queries against every slot of the rung, on the full-attention layers).
    The engine's long chunk (:attr:`~mtijax.engine.ladder.Ladder.long_chunk`)."""
    patches = {**interventions.patches, **chunk_patches(interventions.prompt_patches, jnp.int32(0), tokens.shape[1])}
    transforms, outputs = _grafts(interventions, carry)
    out = forward_hidden(config, params, tokens, positions, keep_kv=True, patches=patches, transforms=transforms,
                         router=_router(interventions.router, router_state), layout=layout,
                         unroll=layer_unroll("prefill"))
    sliding = kv.sliding_layers(cache, family(config).layer_spec(config)["window"])
    written = kv.write(cache, out.cache.k, out.cache.v, positions, jnp.int32(0), sliding)
    return written, {layer: outputs[layer][0] for layer in carry}, out.router_state


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
                 jnp.zeros((rows,), jnp.int32), jnp.int32(0), jax.random.key_data(keys), policy_state, dict(carry),
                 router_state)


def layer_unroll(kind: str) -> bool | int:
    """The layer scan's ``unroll`` for ``kind`` ``"decode"`` (the decode step) or ``"prefill"`` (a prefill chunk).

    The prefill chunk stays rolled. The decode step is unrolled on accelerators, rolled (1) on the CPU backend:
    on the CPU the rolled step compiles several times faster and also runs faster
    (``experiments/probe_cpu_unroll.py``, whose figures the README quotes); on the H200 the unrolled step
    is the faster one (``experiments/probe_compile_levers.py``)."""
    return True if kind == "decode" and jax.default_backend() != "cpu" else 1


SPLIT_FRACTION = 4
"""The decode step gets per-layer weight buffers when the layers' weights take at most ``1 / SPLIT_FRACTION`` of the
device's memory (the split is a copy of them for the call): on the 141 GB H200 every Gemma 3 up to the 12B (about
21.5 GB of layers), not the 27B (about 51 GB)."""


def split_layers(params: Params) -> bool:
    """Whether the decode step takes every layer's weights as arrays of their own (:func:`split_params`).

    On accelerators, when the copy is small beside the device's memory. A stacked layer's weights reach XLA as
    slices of one array at a different offset per layer, so the unrolled step's layers are all different kernels,
    each compiled and autotuned; split, the layers are one kernel set. On the H200 the 270M's first decode call in a
    fresh process took 13.4 s split against 20.2 s stacked, at the same GPU time per step
    (``experiments/probe_step_profile.py``)."""
    if jax.default_backend() == "cpu":
        return False
    stats = jax.devices()[0].memory_stats() or {}
    limit = stats.get("bytes_limit")
    size = sum(a.nbytes for a in jax.tree.leaves(params["layers"]))
    return limit is not None and size * SPLIT_FRACTION <= limit


def split_params(params: Params) -> Params:
    """``params`` with ``layers`` as a tuple of per-layer dicts (each array its own buffer: a copy of the weights)."""
    layers = params["layers"]
    count = jax.tree.leaves(layers)[0].shape[0]
    return {**params, "layers": tuple(jax.tree.map(lambda a: a[l], layers) for l in range(count))}


_split_jit = jax.jit(split_params)


def _joined(params: Params) -> Params:
    """``params`` with split layers (:func:`split_params`) stacked again; XLA folds each layer's slice of the stack
    back to that layer's own array."""
    if not isinstance(params["layers"], tuple):
        return params
    return {**params, "layers": jax.tree.map(lambda *a: jnp.stack(a), *params["layers"])}


def decode_step(config: ModelConfig, layout: str, policy: Policy, record_logits: bool, params: Params, state: State,
                interventions: Interventions, stops: jax.Array, suppress: jax.Array | None) -> tuple[State, Record]:
    """Decode call ``state.step``: feed every row's token, choose the next (see :class:`Record`)."""
    params = _joined(params)
    patches = {**interventions.patches, **{site: p.at(state.step) for site, p in interventions.step_patches.items()}}
    transforms, outputs = _grafts(interventions, state.carry)
    sites = tuple(sorted({site for site, _ in interventions.trace}))
    out = forward_hidden(config, params, state.token[:, None], state.position[:, None], cache=state.cache,
                         write_index=state.slot, patches=patches, capture=sites, transforms=transforms,
                         router=_router(interventions.router, state.router), layout=layout,
                         unroll=layer_unroll("decode"))
    return finish(config, policy, record_logits, params, state, out.hidden[:, -1], out.cache, out.captured,
                  out.router_state, outputs, interventions, stops, suppress)


def decode_block(config: ModelConfig, layout: str, policy: Policy, record_logits: bool, size: int, params: Params,
                 state: State, interventions: Interventions, stops: jax.Array, suppress: jax.Array | None,
                 calls: jax.Array) -> tuple[State, Record]:
    """Up to ``size`` decode calls in one program (an XLA while loop over :func:`decode_step`, so one dispatch
    from the host): the state after the first ``calls`` of them, and their records stacked on a leading
    ``[size]`` axis (``flags [size, 4, B]``, ...).

    Only the first ``calls`` run (the last block of a run whose ``max_new_tokens`` is not a multiple of ``size``
    runs fewer, and a one-token request one): the records past them are zeros and are not read (:func:`run`
    yields the first ``calls``)."""
    one = functools.partial(decode_step, config, layout, policy, record_logits, params)
    shapes = jax.eval_shape(one, state, interventions, stops, suppress)[1]
    records = jax.tree.map(lambda a: jnp.zeros((size, *a.shape), a.dtype), shapes)

    def call(index: jax.Array, carried: tuple[State, Record]) -> tuple[State, Record]:
        state, records = carried
        new, record = one(state, interventions, stops, suppress)
        return new, jax.tree.map(lambda stack, a: stack.at[index].set(a), records, record)

    return jax.lax.fori_loop(0, jnp.minimum(calls, size), call, (state, records))


def finish(config: ModelConfig, policy: Policy, record_logits: bool, params: Params, state: State, hidden: jax.Array,
           cache: kv.KVCache, captured: Mapping[str, jax.Array], router_state: Any,
           outputs: Mapping[int, tuple[Any, dict[str, jax.Array]]], interventions: Interventions, stops: jax.Array,
           suppress: jax.Array | None) -> tuple[State, Record]:
    """The end of a decode call, after the layers: logits, the policy's choice and the bookkeeping
    (``hidden [B, D]``: the last residual stream). Shared by every source of params."""
    logits = unembed(config, params, hidden)
    split = jax.vmap(jax.random.split)(jax.random.wrap_key_data(state.keys))
    metrics = {layer: outputs[layer][1] for layer in sorted(outputs)}
    choice = policy.choose(state.policy, logits, split[:, 1], metrics, state.done, suppress)
    halt = choice.halt & ~state.done
    emit = choice.emit & ~state.done & ~halt
    token = jnp.where(emit, choice.token, config.pad_token_id).astype(jnp.int32)
    done = state.done | halt | (emit & jnp.isin(token, stops))
    trace = {site: captured[site][jnp.asarray(layers), :, -1] for site, layers in interventions.trace}
    carry = {layer: outputs[layer][0] for layer in state.carry}
    new = State(cache, token, state.position + 1, state.slot + 1, done, state.count + emit.astype(jnp.int32),
                state.step + 1, jax.random.key_data(split[:, 0]), choice.state, carry, router_state)
    flags = jnp.stack([token, emit.astype(jnp.int32), done.astype(jnp.int32), halt.astype(jnp.int32)])
    return new, Record(flags, choice.record, trace, logits if record_logits else None)


_chunk_tiers = Tiers(prefill_chunk, static_argnums=(0, 1), donate_argnums=(3,))
_first_tiers = Tiers(prefill_first, static_argnums=(0, 1), donate_argnums=(3,))
_step_tiers = Tiers(decode_step, static_argnums=(0, 1, 2, 3), donate_argnums=(5,))
_block_tiers = Tiers(decode_block, static_argnums=(0, 1, 2, 3, 4), donate_argnums=(6,))
_chunk_jit, _step_jit, _block_jit = _chunk_tiers.tuned, _step_tiers.tuned, _block_tiers.tuned
_start_jit = jax.jit(start, static_argnums=(0,))


def decode_block_size() -> int:
    """How many decode calls a resident run dispatches as one program (:func:`decode_block`): ``MTIJAX_DECODE_BLOCK``
    if set, else 8 on accelerators and 1 on the CPU.

    On an accelerator a small model's step is short beside the host's work to dispatch it (a jitted call with
    every layer's weights as arguments), so the host sets the pace; a block pays that once for ``size`` tokens.
    Tokens then reach the host ``size`` at a time (``generate_stream`` yields them in bursts). On the CPU a step
    takes far longer than its dispatch, and a block would only delay the first streamed token."""
    value = os.environ.get("MTIJAX_DECODE_BLOCK")
    if value is None:
        return 1 if jax.default_backend() == "cpu" else 8
    if not value.isdigit() or int(value) < 1:
        raise MtijaxError(f"MTIJAX_DECODE_BLOCK must be a positive integer, not {value!r}")
    return int(value)


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
    """The default :class:`LayerStack`: ``params`` on the device, through the jitted prefill chunk and decode step.

    ``prefill`` and ``decode``: the builds of this run's prefill chunk and decode program
    (:class:`~mtijax.engine.tiers.Compiling`); each call runs the build :meth:`~Compiling.program` names, so a
    run moves to the tuned build as soon as it exists. ``None``: the tuned jit, compiled at its first call."""

    config: ModelConfig
    layout: str
    params: Params
    chunk_fn: Callable | None = None
    step_fn: Callable | None = None
    step_params: Params | None = None
    block: int = 1
    prefill: Compiling | None = None
    decode: Compiling | None = None
    first: Compiling | None = None

    def prefill_chunk(self, cache, carry, router_state, tokens, positions, start, interventions):
        chunk = self.chunk_fn or (self.prefill.program() if self.prefill else _chunk_jit)
        return chunk(self.config, self.layout, self.params, cache, carry, router_state, tokens, positions, start,
                     interventions)

    def prefill_first(self, cache, carry, router_state, tokens, positions, interventions):
        """The long first call (:func:`prefill_first`), through the build of :attr:`first` that exists."""
        return self.first.program()(self.config, self.layout, self.params, cache, carry, router_state, tokens,
                                    positions, interventions)

    @property
    def decode_params(self) -> Params:
        """The params the decode calls take (the per-layer buffers where the run split them)."""
        return self.params if self.step_params is None else self.step_params

    def decode_step(self, policy, record_logits, state, interventions, stops, suppress):
        step = self.step_fn or (self.decode.program() if self.decode else _step_jit)
        return step(self.config, self.layout, policy, record_logits, self.decode_params, state, interventions, stops,
                    suppress)

    def decode_block(self, policy, record_logits, state, interventions, stops, suppress, calls):
        """The first ``calls`` of ``self.block`` decode calls, in one dispatch (:func:`decode_block`)."""
        block = self.decode.program() if self.decode else _block_jit
        return block(self.config, self.layout, policy, record_logits, self.block, self.decode_params, state,
                     interventions, stops, suppress, calls)

    def lower_decode(self, jit: Callable, policy, record_logits, state, interventions, stops, suppress) -> Any:
        """The decode program :func:`run` will call (the block where ``self.block > 1``, else the step) of the
        tier ``jit`` (one of :data:`decode_tiers`'s jits), lowered for these arguments (``state`` may be
        abstract)."""
        if self.block > 1:
            return jit.lower(self.config, self.layout, policy, record_logits, self.block, self.decode_params, state,
                             interventions, stops, suppress, jnp.int32(self.block))
        return jit.lower(self.config, self.layout, policy, record_logits, self.decode_params, state, interventions,
                         stops, suppress)

    @property
    def decode_tiers(self) -> Tiers:
        """The jits of the decode program :func:`run` calls: the block's where ``self.block > 1``, else the step's."""
        return _block_tiers if self.block > 1 else _step_tiers


def compile_step_ahead(stack: Resident, policy: Policy, record_logits: bool, start_args: tuple, stops: jax.Array,
                       suppress: jax.Array | None) -> Compiling | None:
    """Build ``stack``'s decode program on a background thread (:meth:`Tiers.start`: the quick build, then the
    tuned one, where tiered), so that it compiles while the small programs before the prefill (the split layers,
    the empty cache, the row keys) and the prefill compile and run (all XLA work that releases the GIL). A
    signature this process has started before returns its earlier builds.

    ``start_args`` are :func:`start`'s arguments after ``config`` (the cache before the prefill: the prefill keeps
    its shapes); the cache and the keys, like ``stack.step_params``, may be abstract (``jax.ShapeDtypeStruct``),
    so that the compile starts before the programs that make them. The program is lowered with the abstract state
    :func:`start` will return. Its leaves, and abstract step params, are committed to the device exactly when one of
    the concrete arguments or params is (a jit's outputs are committed when any input is), as the real ones will
    be, so the call finds the compiled program in jit's caches instead of compiling again
    (``tests/test_generation.py`` counts the compiles). ``MTIJAX_COMPILE_AHEAD=0`` switches it off (``None``):
    the tuned program then compiles at its first call, after the prefill."""
    if os.environ.get("MTIJAX_COMPILE_AHEAD", "1") == "0":
        return None
    args = (stack.decode_params, start_args, stops, suppress)
    device = committed_devices((args, stack.params))
    if len(device) > 1:
        return None
    key = (signature((stack.config, stack.layout, policy, record_logits, stack.block), args), device)
    sharding = jax.sharding.SingleDeviceSharding(device[0]) if device else None

    def placed(a: Any) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(a.shape, a.dtype, weak_type=a.weak_type, sharding=sharding)

    def lower(jit: Callable) -> Any:
        state = jax.tree.map(placed, jax.eval_shape(functools.partial(start, stack.config), *start_args))
        abstract = stack
        if stack.step_params is not None:
            abstract = stack._replace(step_params=jax.tree.map(
                lambda a: placed(a) if isinstance(a, jax.ShapeDtypeStruct) else a, stack.step_params))
        return abstract.lower_decode(jit, policy, record_logits, state, start_args[-1], stops, suppress)

    return stack.decode_tiers.start(key, lower)


def compile_first(stack: Resident, first_args: tuple) -> Compiling:
    """Start the builds of ``stack``'s long first prefill call for :func:`prefill_first`'s arguments after
    ``params`` (``first_args``) on a background thread (:meth:`Tiers.start`), without waiting for them."""
    key = signature((stack.config, stack.layout), (stack.params, first_args))
    return _first_tiers.start(key, lambda jit: jit.lower(stack.config, stack.layout, stack.params, *first_args))


def compile_prefill(stack: Resident, chunk_args: tuple) -> Compiling | None:
    """The builds of ``stack``'s prefill chunk for :func:`prefill_chunk`'s arguments after ``params``
    (``chunk_args``), started where compiles are tiered and the stack calls the engine's chunk (``None``
    otherwise: the tuned jit compiles at its first call, on the caller's thread); waits for the first build."""
    if stack.chunk_fn is not None or not tiered_compile():
        return None
    key = signature((stack.config, stack.layout), (stack.params, chunk_args))
    compiling = _chunk_tiers.start(key, lambda jit: jit.lower(stack.config, stack.layout, stack.params, *chunk_args))
    compiling.ready()
    return compiling


def row_keys(seed: int, rows: int) -> jax.Array:
    """Row ``r``'s sampling key: ``fold_in(key(seed), r)``, so a row's draws do not depend on the batch."""
    return _row_keys_jit(np.uint32(seed % 2**32), rows)  # the 32 bits jax.random.key keeps of an int


@functools.partial(jax.jit, static_argnums=1)
def _row_keys_jit(seed: jax.Array, rows: int) -> jax.Array:
    """:func:`row_keys` as one program (op by op, its vmap cost a generate call about 2 ms of Python)."""
    return jax.vmap(lambda r: jax.random.fold_in(jax.random.key(seed), r))(jnp.arange(rows))


_empty_cache = jax.jit(kv.init_cache, static_argnums=(0, 1, 2, 3, 4, 5, 6))
"""``kv.init_cache`` as one program (``windows`` as a tuple): a handful of dispatches fewer per call."""


def compiled_counts() -> dict[str, int]:
    """How many programs each engine function has compiled in this process (for the no-recompile tests)."""
    return {"prefill_chunk": _chunk_tiers.cache_size(), "prefill_first": _first_tiers.cache_size(),
            "start": _start_jit._cache_size(),
            "decode_step": _step_tiers.cache_size(), "decode_block": _block_tiers.cache_size()}


def _sweep_size(sweep_axes: Any, interventions: Interventions) -> int:
    """``K``, the length of the swept axis of every leaf that ``sweep_axes`` (a pytree prefix of
    ``interventions`` with leaves ``0`` or ``None``) marks; raises unless they agree and there is one."""
    sizes: set[int] = set()

    def visit(axis: int | None, subtree: Any) -> None:
        if axis is not None:
            sizes.update(int(jnp.shape(leaf)[axis]) for leaf in jax.tree.leaves(subtree))

    jax.tree.map(visit, sweep_axes, interventions, is_leaf=lambda x: x is None)
    if len(sizes) != 1:
        raise MtijaxError("a sweep needs swept intervention leaves of one common length; got "
                          f"{sorted(sizes) or 'none'}")
    return sizes.pop()


@functools.lru_cache(maxsize=None)
def _swept_jits(axes_def: Any, axes_leaves: tuple, batch: int, rows: int) -> tuple[Callable, Callable, Callable]:
    """The prefill chunk, start and decode step vmapped over the swept interventions (and everything that
    depends on them: cache, carries, router state, decode state), jitted; the per-prompt axes of the
    interventions are padded to the bucket inside the vmap, where each variant has its unswept shapes."""
    axes = jax.tree.unflatten(axes_def, axes_leaves)

    def chunk(config, layout, params, cache, carry, router_state, tokens, positions, begin, interventions):
        return jax.vmap(lambda c, ca, r, i: prefill_chunk(config, layout, params, c, ca, r, tokens, positions, begin,
                                                          pad_batch(i, batch, rows)),
                        in_axes=(0, 0, 0, axes))(cache, carry, router_state, interventions)

    def begin_decode(config, cache, carry, router_state, policy_state, first_token, first_position, lengths, width,
                     keys, interventions):
        return jax.vmap(lambda c, ca, r, i: start(config, c, ca, r, policy_state, first_token, first_position,
                                                  lengths, width, keys, pad_batch(i, batch, rows)),
                        in_axes=(0, 0, 0, axes))(cache, carry, router_state, interventions)

    def step(config, layout, policy, record_logits, params, state, interventions, stops, suppress):
        return jax.vmap(lambda st, i: decode_step(config, layout, policy, record_logits, params, st,
                                                  pad_batch(i, batch, rows), stops, suppress),
                        in_axes=(0, axes))(state, interventions)

    return (jax.jit(chunk, static_argnums=(0, 1), donate_argnums=(3,)), jax.jit(begin_decode, static_argnums=(0,)),
            jax.jit(step, static_argnums=(0, 1, 2, 3), donate_argnums=(5,)))


def _initial(interventions: Interventions, rows: int) -> tuple[dict[int, Any], Any]:
    carry = {layer: graft.module.init_carry(rows) for layer, graft in interventions.grafts.items()}
    hook = interventions.router
    router_state = None if hook is None else (hook.init(hook.params, rows) if hook.state is None else hook.state)
    return carry, router_state


def run(config: ModelConfig, params: Params, request: Request, *, policy: Policy,
        interventions: Interventions = Interventions(), keys: jax.Array | None = None, seed: int = 0,
        suppress: np.ndarray | None = None, record_logits: bool = False,
        layout: str = "params", stack: LayerStack | None = None,
        sweep_axes: Any = None) -> Iterator[tuple[State, Record]]:
    """Prefill ``request``, then yield ``(state, record)`` after every decode call (device arrays, not
    synchronised), ``request.max_new_tokens`` times at most; the caller stops iterating when it likes. With
    decode blocks (:func:`decode_block_size` > 1; the default stack without a sweep) the records come as numpy,
    a block at a time, with the latest dispatched block's state (see :func:`_blocks`).

    ``keys``: ``[rows]`` per-row PRNG keys (default :func:`row_keys` of ``seed``, made after the decode program's
    compile has started). ``layout``: the params layout
    of ``params`` (``"fused_qkv"`` for :func:`~mtijax.models.fused.fuse_qkv` params). ``stack``: what computes
    the prefill chunks and decode calls (default :class:`Resident` over ``params``); with another stack,
    ``params`` needs only what :func:`finish` reads (embedding, final norm, output head), and the KV cache
    takes the embedding's dtype. With the default stack and no ``cache_edit``, a cache rung longer than the
    sliding layers' window takes the rolling layout (:mod:`mtijax.models.cache`: those layers keep a ring of
    ``window`` slots); a cache edit and other stacks work on the full layout, so they get it.

    ``sweep_axes``: run a sweep (see the module docstring; resident params only). A pytree prefix of
    ``interventions`` whose leaves are ``0`` (this subtree's leaves carry the ``K`` variants on their leading
    axis) or ``None`` (shared), e.g. ``jax.tree.map(lambda _: None, interventions)`` with one patch's mask set
    to ``0``. Params, the request, ``keys``, the policy and ``suppress`` are shared by the variants; every array
    of the yielded states and records has a leading ``K`` axis (``done [K, rows]``, ...).
    """
    enable_compilation_cache()
    if sweep_axes is not None and stack is not None:
        raise MtijaxError("a sweep runs on resident params; give params, not a layer stack")
    rolling = request.rolling and stack is None and interventions.cache_edit is None
    resident = stack is None and sweep_axes is None
    split = resident and split_layers(params)
    if stack is None:
        stack = Resident(config, layout, params, step_params=_split_jit.eval_shape(params) if split else None,
                         block=decode_block_size())
    rows = request.rows
    start_fn = _start_jit
    windows = tuple(int(w) for w in family(config).layer_spec(config)["window"]) if rolling else None
    cache_args = (config.num_layers, rows, request.cache_length, config.num_kv_heads, config.head_dim,
                  jnp.dtype(params["embed"].dtype), windows)
    stops = jnp.asarray(request.stops)
    suppress = None if suppress is None or not suppress.any() else jnp.asarray(suppress)
    if sweep_axes is None:
        interventions = pad_batch(interventions, request.batch, rows)
        carry, router_state = _initial(interventions, rows)
    else:
        size = _sweep_size(sweep_axes, interventions)
        leaves, treedef = jax.tree.flatten(sweep_axes, is_leaf=lambda x: x is None)
        chunk_fn, start_fn, step_fn = _swept_jits(treedef, tuple(leaves), request.batch, rows)
        stack = Resident(config, layout, params, chunk_fn, step_fn)
        carry, router_state = jax.vmap(lambda i: _initial(i, rows), in_axes=(sweep_axes,), axis_size=size)(
            interventions)
    rest = (policy.start(rows), jnp.asarray(request.first_token), jnp.asarray(request.first_position),
            jnp.asarray(request.lengths), jnp.int32(request.width))
    ahead = None
    if resident:  # the decode program starts compiling before the programs that make its inputs
        # the keys' shape does not depend on the seed; the jit's eval_shape is cached, a fresh partial's is not
        abstract_keys = _row_keys_jit.eval_shape(np.uint32(0), rows) if keys is None else keys
        ahead = compile_step_ahead(stack, policy, record_logits,
                                   (_empty_cache.eval_shape(*cache_args), carry, router_state, *rest,
                                    abstract_keys, interventions), stops, suppress)
    if split:
        stack = stack._replace(step_params=_split_jit(params))
    cache = _empty_cache(*cache_args)
    if sweep_axes is not None:
        cache = jax.tree.map(lambda x: jnp.repeat(x[None], size, axis=0), cache)
    keys = row_keys(seed, rows) if keys is None else keys
    tokens, positions = jnp.asarray(request.tokens), jnp.asarray(request.positions)
    if resident and request.width:
        stack = stack._replace(prefill=compile_prefill(stack, (
            cache, carry, router_state, tokens[:, :request.chunk], positions[:, :request.chunk], jnp.int32(0),
            interventions)))
    begin, long = 0, request.long_chunk if resident else None
    if long:
        stack = stack._replace(first=compile_first(stack, (
            cache, carry, router_state, tokens[:, :long], positions[:, :long], interventions)))
        if stack.first.available():
            cache, carry, router_state = stack.prefill_first(cache, carry, router_state, tokens[:, :long],
                                                             positions[:, :long], interventions)
            begin = long
    for begin in range(begin, request.width, request.chunk):
        cache, carry, router_state = stack.prefill_chunk(
            cache, carry, router_state, tokens[:, begin:begin + request.chunk],
            positions[:, begin:begin + request.chunk], jnp.int32(begin), interventions)
    state = start_fn(config, cache, carry, router_state, *rest, keys, interventions)
    if ahead is not None:
        ahead.ready()  # a build of the step exists (or its compile error is raised here)
        stack = stack._replace(decode=ahead)
    if isinstance(stack, Resident) and stack.block > 1:
        yield from _blocks(stack, request.max_new_tokens, policy, record_logits, state, interventions, stops,
                           suppress)
        return
    for _ in range(request.max_new_tokens):
        state, record = stack.decode_step(policy, record_logits, state, interventions, stops, suppress)
        yield state, record


def _blocks(stack: Resident, calls: int, policy: Policy, record_logits: bool, state: State,
            interventions: Interventions, stops: jax.Array, suppress: jax.Array | None
            ) -> Iterator[tuple[State, Record]]:
    """:func:`run`'s decode calls, ``stack.block`` per dispatch: each block's records are copied to the host as it
    is dispatched and yielded one call at a time (as numpy) once the next block is dispatched, so the device always
    has a block queued. The state yielded with a call's record is the latest dispatched block's (an earlier one
    was donated to it). Stops dispatching once a block ends with every row done."""
    def calls_of(block: Record, count: int) -> Iterator[tuple[State, Record]]:
        """Yield the first ``count`` calls of ``block`` (with the latest ``state``); return whether all rows are
        done after them."""
        host = jax.tree.map(np.asarray, block)
        for index in range(count):
            yield state, jax.tree.map(lambda a: a[index], host)
        return bool(host.done[count - 1].all())

    pending: tuple[Record, int] | None = None
    while calls > 0:
        count = min(stack.block, calls)
        calls -= count
        state, block = stack.decode_block(policy, record_logits, state, interventions, stops, suppress,
                                          jnp.int32(count))
        for leaf in jax.tree.leaves(block):
            leaf.copy_to_host_async()
        if pending is not None and (yield from calls_of(*pending)):
            return
        pending = block, count
    if pending is not None:
        yield from calls_of(*pending)


class Collected(NamedTuple):
    """A whole run on the host: ``tokens [B, N]`` (pad after a row stopped), ``lengths [B]`` (emitted, stop token
    included), ``stopped [B]`` (ended with a stop token), ``halted [B]`` (stopped by the policy), ``records``
    (every call's :class:`Record`, real rows only, as numpy). A sweep's arrays have the leading ``K`` axis:
    ``tokens [K, B, N]``, ``lengths [K, B]``, ...; so do its records."""

    tokens: np.ndarray
    lengths: np.ndarray
    stopped: np.ndarray
    halted: np.ndarray
    records: list[Record]


def _real_rows(a: jax.Array, batch: int, axis: int) -> np.ndarray:
    """``a`` as numpy, with only the first ``batch`` entries (the real rows) of axis ``axis``."""
    return np.asarray(a)[(slice(None),) * axis + (slice(0, batch),)]


def _on_host(record: Record, batch: int, lead: int) -> Record:
    """``record`` as numpy, real rows only (the row axis follows ``lead`` sweep axes; traces have their layer
    axis before it)."""
    def cut(a: jax.Array, axis: int = lead) -> np.ndarray:
        return _real_rows(a, batch, axis)

    return Record(cut(record.flags, lead + 1),
                  {name: cut(v) for name, v in record.readings.items()},
                  {site: cut(v, lead + 1) for site, v in record.trace.items()},
                  None if record.logits is None else cut(record.logits))


def collect(steps: Iterator[tuple[State, Record]], request: Request, pad_id: int,
            check_every: int = STOP_CHECK_EVERY, lag: int = STOP_CHECK_EVERY) -> Collected:
    """Run ``steps`` to the end and gather the records on the host. Every ``check_every`` calls it looks whether
    all rows were done ``lag`` calls earlier, and stops if so: that record's copy has long reached the host, so
    the look does not wait for the device and steps are dispatched without a gap (at most ``check_every + lag -
    1`` calls run after the last row stopped; their tokens are pad). ``check_every=1, lag=0`` stops at once.
    Each record's copy to the host starts when its step is dispatched (``experiments/probe_engine_gap.py``
    measured what reading them one by one at the end cost). Takes the steps of a sweep too (``run(...,
    sweep_axes=...)``): then every array has the leading ``K`` axis."""
    records, state = [], None
    on_device = jax.default_backend() != "cpu"  # on the CPU a record already is in host memory
    for index, (state, record) in enumerate(steps):
        if on_device:  # to the host as soon as it exists, not one by one at the end
            for leaf in jax.tree.leaves(record):
                if isinstance(leaf, jax.Array):  # a block's records come as numpy
                    leaf.copy_to_host_async()
        records.append(record)
        if (index + 1) % check_every == 0 and index >= lag and _flags_on_host(records[index - lag]).done.all():
            break
    batch, lead = request.batch, np.ndim(state.done) - 1
    host = [_on_host(r, batch, lead) for r in records]
    rows = host[0].token.shape
    tokens = np.full((*rows, request.max_new_tokens), pad_id, np.int32)
    tokens[..., :len(host)] = np.stack([r.token for r in host], axis=-1)
    halted = np.any(np.stack([r.halt for r in host]), axis=0)
    done = _real_rows(state.done, batch, lead)
    return Collected(tokens, _real_rows(state.count, batch, lead), done & ~halted, halted, host)


def _flags_on_host(record: Record) -> Record:
    """``record`` with its flags as numpy (one copy), so its ``token``, ``emit``, ``done`` and ``halt`` are host
    arrays."""
    return record._replace(flags=np.asarray(record.flags))


def stream(steps: Iterator[tuple[State, Record]], request: Request) -> Iterator[tuple[State, Record]]:
    """``steps`` read one call at a time (each record's flags on the host), ending once every row is done."""
    for state, record in steps:
        record = _flags_on_host(record)
        yield state, record
        if record.done.all():
            return
