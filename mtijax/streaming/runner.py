"""The streamed model: a param source whose layers arrive one at a time, run by the generation engine.

The embedding, final norm and output head stay on the device; so does the KV
cache (``KVCache``, ``[L, B, T, K, H]``). Each layer's weights exist on the
device only while its turn comes: a :class:`~mtijax.streaming.prefetch.LayerPipeline`
copies them there ``prefetch`` layers ahead of the compute, from a host cache
that background threads fill from the source (a checkpoint, or a params pytree
in memory: :class:`~mtijax.streaming.params_store.ParamsStore`).

Every layer runs the model's own ``family(config).block`` through one compiled
step for all layers (:func:`~mtijax.streaming.step.layer_step`: the layer
index, its ``layer_spec`` slice, the cache slot and the interventions are
arguments, not constants), so streamed logits are the resident model's. The
step writes the layer's new keys and values into the cache in place (the cache
is donated).

Generation is the engine's (:mod:`mtijax.engine.loop`): :meth:`StreamedModel.start_run`
lays out the request and hands :func:`~mtijax.engine.loop.run` a
:class:`~mtijax.engine.loop.LayerStack` whose prefill chunk and decode call
are one streamed pass each (embed, every layer with its slice of the
interventions and the grafts after it, then the engine's ``finish``), so
sampling, policies, stop rules and every intervention behave as in resident
generation and give the same tokens.

Device memory: before a call touches any weights, what it needs (resident
parts, ``prefetch + 1`` layers, the KV cache, the interventions and the
compiled step's own temporaries, from XLA's memory analysis) is checked
against ``max_device_memory``; after every pass the device allocator's own
peak is checked too, where the backend reports one (see
:mod:`mtijax.streaming.memory`: on the CPU only the accounted check holds).

OLMoE with ``stream_experts=True`` streams only the layer *core* (attention,
norms, router) this way; see :mod:`mtijax.streaming.experts`.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mtijax.config import ModelConfig
from mtijax.engine import loop
from mtijax.engine.interventions import Interventions, check
from mtijax.engine.ladder import Ladder, default_ladder
from mtijax.engine.request import Request, check_token_ids, lay_out
from mtijax.engine.sampling import Plain, Policy, Sampling, suppress_mask
from mtijax.errors import MtijaxError
from mtijax.generate import Generation
from mtijax.injection.blend import InjectionSpec, plan
from mtijax.injection.blend import inject as blend
from mtijax.interventions import Patch, RouterHook, check_sites
from mtijax.models import cache as kv
from mtijax.models.decoder import ForwardOutput, ResidualTransform, family
from mtijax.streaming.cache import host_cache
from mtijax.streaming.experts import ExpertStreamer, merge
from mtijax.streaming.host import HostMemory
from mtijax.streaming.memory import Budget, allocator_peak, check_allocator_peak, check_budget, check_one_layer
from mtijax.streaming.params_store import ParamsStore
from mtijax.streaming.prefetch import Fetcher, LayerPipeline
from mtijax.streaming.stats import StreamStats
from mtijax.streaming.step import (STEP_DONATE, apply_graft, decode_patches, embed, layer_step, logits,
                                   prefill_patches, route_step, write_positions)
from mtijax.streaming.store import LayerStore, get_leaf, set_leaf, to_params_layout

Tree = dict[str, Any]


class LayerCalls(NamedTuple):
    """What a pass does at its layers besides the blocks.

    Attributes:
      patches: site -> :class:`~mtijax.interventions.Patch` with a leading ``[L]`` axis (layer ``l`` gets ``[l]``).
      hook: the router hook without its state (its params ``[L, ...]``), or None.
      capture: sites recorded at every layer.
      after: layer -> ``f(h [B, S, D], positions [B, S]) -> h'``, applied to the residual stream leaving it.
    """

    patches: dict[str, Patch]
    hook: RouterHook | None
    capture: tuple[str, ...]
    after: dict[int, Callable[[jax.Array, jax.Array], jax.Array]]


class PassOutput(NamedTuple):
    """A pass: the last residual stream ``x [B, S, D]``, the cache with the pass written, ``captured`` (site ->
    ``[layers run, B, S, ...]``) and the router state after it (``[L, B, ...]`` leaves, or None)."""

    x: jax.Array
    cache: kv.KVCache
    captured: dict[str, jax.Array]
    router_state: Any


def _abstract(tree: Any, sharding: jax.sharding.Sharding) -> Any:
    """Shapes and dtypes of ``tree``'s arrays (or ShapeDtypeStructs), placed on ``sharding``."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype, sharding=sharding), tree)


def _nbytes(tree: Any) -> int:
    return sum(int(np.prod(np.shape(a))) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree))


_blend = jax.jit(blend, static_argnums=2)
"""``mtijax.inject`` compiled (once for all layers of one shape)."""

_COMPILED: dict[Any, Any] = {}
"""Compiled steps by (function, config, leaves, captures, argument shapes and placement), shared by every model."""


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _finish(config: ModelConfig, policy: Policy, record_logits: bool, resident: Tree, state: loop.State,
            hidden: jax.Array, captured: dict, router_state: Any, outputs: dict, interventions: Interventions,
            stops: jax.Array, suppress: jax.Array | None) -> tuple[loop.State, loop.Record]:
    """The engine's :func:`~mtijax.engine.loop.finish` of a streamed decode call (``state`` without its cache: the
    caller puts the pass's cache into the new state, so the cache is never copied)."""
    return loop.finish(config, policy, record_logits, resident, state, hidden, None, captured, router_state, outputs,
                       interventions, stops, suppress)


class StreamedModel:
    """A model run with its layers streamed from a checkpoint (Hugging Face directory or GGUF file) or from a
    params pytree in memory.

    Forward passes and generation are driven from the host, one layer at a time, so ``jax.jit`` over them is
    impossible by nature (nothing to trace: the weights are not arguments, they arrive during the call); each
    layer's step is compiled instead, once for every layer.

    Args:
      model: a model directory, a ``.gguf`` file, ``"gemma3-270m"``, an open :class:`LayerStore`, or a params
        pytree (the documented layout; host numpy or device arrays) with ``config``.
      dtype: compute dtype (``"float32"`` or ``"bfloat16"``; default float32, or the params' own dtype).
      config: the config of ``model`` when it is a params pytree.
      host_cache_layers: at most this many layers in the host cache (None: no count cap; 0: no cache).
      host_cache_bytes: at most this many bytes in the host cache (None: no byte cap).
      host_cache_policy: ``"resident"`` (the default: the first layers that fit stay, so a cyclic scan over more
        layers than the cache holds still hits) or ``"lru"`` (see :mod:`mtijax.streaming.cache`).
      prefetch: device copies (and background reads) run this many layers ahead of the compute; 0 is
        sequential. At most ``prefetch + 1`` layers are on the device at once.
      max_device_memory: bytes; a call accounted to need more is refused before it starts, and a run whose
        device allocator's peak exceeds it stops after the pass that did (where the backend reports a peak;
        not on the CPU). None: no cap.
      host_memory: ``"auto"``, ``"pinned_host"``, ``"numpy"`` or ``"device"`` (see
        :class:`~mtijax.streaming.host.HostMemory`).
      stream_experts: OLMoE only: stream each layer's routed experts instead of whole layers.
      device_experts_per_layer: expert streaming: experts kept on the device per layer (default: top-k).
      host_cache_experts: expert streaming: experts kept in host memory (default: ``host_cache_layers`` layers' worth).
      read_threads: background reading threads (default: ``min(prefetch, 8)``).
      device: where to run (default: the first device).
    """

    def __init__(self, model: str | Path | LayerStore | Mapping[str, Any] | None, dtype: str | None = None, *,
                 config: ModelConfig | None = None, host_cache_layers: int | None = 8,
                 host_cache_bytes: int | None = None, host_cache_policy: str = "resident", prefetch: int = 2,
                 max_device_memory: int | None = None, host_memory: str = "auto", stream_experts: bool = False,
                 device_experts_per_layer: int | None = None, host_cache_experts: int | None = None,
                 read_threads: int | None = None, device: jax.Device | None = None):
        if prefetch < 0:
            raise MtijaxError(f"prefetch must be >= 0, got {prefetch}")
        if isinstance(model, Mapping):
            if config is None:
                raise MtijaxError("streaming params from memory needs their config (config=...)")
            self.store: LayerStore = ParamsStore(config, model, dtype)
        elif config is not None:
            raise MtijaxError("config= is for params in memory; a checkpoint has its own")
        else:
            self.store = model if isinstance(model, LayerStore) else LayerStore(model, dtype or "float32")
        self.config = self.store.config
        self.device = device or jax.devices()[0]
        self.prefetch = prefetch
        self.max_device_memory = max_device_memory
        self.host_cache_policy = host_cache_policy
        if stream_experts and not self.store.streams_experts:
            raise MtijaxError(f"expert streaming needs a mixture-of-experts model; {self.store.location} is "
                              f"{self.config.architecture}")
        self._leaves = self.store.core_leaves() if stream_experts else self.store.leaves
        self.layer_nbytes = self.store.nbytes(self._leaves)
        check_one_layer(max_device_memory, self.store.resident_nbytes, self.layer_nbytes)
        self.host = HostMemory(self.device, host_memory)
        workers = min(prefetch, 8) if read_threads is None else read_threads
        self._fetcher = Fetcher(self._read_layer, lambda layer: self.layer_nbytes,
                                host_cache(host_cache_policy, host_cache_layers, host_cache_bytes), workers)
        self._pipeline = LayerPipeline(self._fetcher, self.host.to_device, prefetch, self._count_transfer)
        self._host_cache_bytes = self._host_cache_capacity(host_cache_layers, host_cache_bytes)
        self.experts: ExpertStreamer | None = None
        if stream_experts:
            if host_cache_experts is None and host_cache_layers is not None:
                host_cache_experts = host_cache_layers * self.config.num_experts
            if device_experts_per_layer is None:
                device_experts_per_layer = self.config.num_experts_per_tok
            self.experts = ExpertStreamer(self.store, self.host, workers, host_cache_experts, device_experts_per_layer,
                                          host_cache_policy)
        self.host.reserve(self._host_cache_bytes + prefetch * self.layer_nbytes, self.layer_nbytes)
        self.resident = jax.device_put(self.store.read_resident(), self.host.device_sharding)
        spec = family(self.config).layer_spec(self.config)
        self._specs = [jax.device_put(jax.tree.map(lambda a: a[layer], spec), self.host.device_sharding)
                       for layer in range(self.config.num_layers)]
        self._used_steps: set[Any] = set()
        self.reset_stats()

    # ----------------------------------------------------------------------------------------- forward

    def forward(self, tokens: Any, positions: Any = None, *, cache: kv.KVCache | None = None,
                write_index: int = 0, layers: Sequence[int] | None = None, capture: Sequence[str] = (),
                patches: Mapping[str, Patch] | None = None, transforms: Mapping[int, ResidualTransform] | None = None,
                router: RouterHook | None = None) -> ForwardOutput:
        """The streamed counterpart of ``mtijax.forward``: ``ForwardOutput(logits [B, S, V] float32, cache,
        captured, router_state)``, with the same ``capture``, ``patches``, ``transforms`` and ``router``.

        ``cache``, if given, is consumed (its arrays are donated) and the updated one returned. ``layers`` selects
        the layers that run; the others are skipped as identity (``captured[site]`` then holds the layers run).
        ``transforms`` are called from the host between layers (pass jitted functions to run them compiled).
        Not jittable (see the class docstring).
        """
        tokens = np.asarray(tokens, np.int32)
        b, s = tokens.shape
        check_token_ids(self.config, tokens)
        architecture = family(self.config)
        capture = check_sites(capture, architecture=architecture)
        check_sites((patches or {}).keys(), patching=True, architecture=architecture)
        positions = (np.broadcast_to(np.arange(s, dtype=np.int32), (b, s)) if positions is None
                     else np.asarray(positions, np.int32))
        order = self._order(layers)
        transforms = dict(transforms or {})
        self._check_after(transforms, order, "transform")
        own_cache = cache is None
        if own_cache:
            cache = self._new_cache(b, s)
        elif not 0 <= write_index <= cache.length - s:
            raise MtijaxError(f"cannot write {s} tokens at slot {write_index} of a {cache.length}-slot cache")
        hook, router_state = None, None
        if router is not None:
            hook = router.replace(state=None)
            router_state = router.start(b).state if router.state is None else router.state
        calls = LayerCalls(jax.device_put(dict(patches or {}), self.host.device_sharding), hook, capture, transforms)
        x = embed(self.config, self.resident, jnp.asarray(tokens))
        positions, at = jnp.asarray(positions), np.int32(write_index)
        self._check_memory([(capture, self._step_args(None, 0, x, positions, cache.k, cache.v, cache.positions, at,
                                                      calls, router_state))], b, cache.length, logits_rows=b * s)
        out = self._pass(x, positions, cache, at, order, (), calls, router_state)
        return ForwardOutput(logits(self.config, self.resident, out.x), None if own_cache else out.cache,
                             out.captured, out.router_state)

    # ----------------------------------------------------------------------------------------- generation

    def start_run(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, policy: Policy, seed: int = 0,
                  stop_ids: Sequence[int] | None = None, suppress_ids: Sequence[int] | None = None,
                  interventions: Interventions | None = None, ladder: Ladder | None = None,
                  record_logits: bool = False, layers: Sequence[int] | None = None,
                  ) -> tuple[Request, Iterator[tuple[loop.State, loop.Record]]]:
        """``mtijax.generate.start_run`` for this source: check and lay out a request and start the engine on it,
        every prefill chunk and decode call one streamed pass: ``(request, steps)``.

        ``layers`` selects the layers that run (the rest are skipped as identity at every call; grafts and traces
        must then be at layers that run, and a trace needs them all). Close ``steps`` when done with it early
        (it drops the prefetched layers).
        """
        interventions = Interventions() if interventions is None else interventions
        check(interventions, self.config)
        order = self._order(layers)
        self._check_after(interventions.grafts, order, "graft")
        if interventions.trace and len(order) < self.config.num_layers:
            raise MtijaxError("a trace needs every layer to run; drop the layer selection or the trace")
        request = lay_out(self.config, prompts, max_new_tokens, ladder or default_ladder(rolling=False), stop_ids,
                          edits_cache=interventions.cache_edit is not None)
        suppress = suppress_mask(self.config.vocab_size, suppress_ids)
        stack = _StreamedStack(self, order, request)
        steps = loop.run(self.config, self.resident, request, policy=policy,
                         interventions=jax.device_put(interventions, self.host.device_sharding),
                         seed=seed, suppress=suppress, record_logits=record_logits,
                         stack=stack)
        return request, self._dropping_prefetch(steps)

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 32, *,
                 sampling: Sampling = Sampling(), seed: int = 0, stop_ids: Sequence[int] | None = None,
                 suppress_ids: Sequence[int] | None = None, interventions: Interventions | None = None,
                 ladder: Ladder | None = None, layers: Sequence[int] | None = None) -> Generation:
        """``mtijax.generate`` with the layers streamed (same arguments, padding, sampling keys, stop rules and
        interventions, so the same tokens). Every call is one streamed pass over the layers, whatever the batch,
        so the cost of streaming is shared by all rows; the run ends as soon as every row has stopped.
        ``layers``: see :meth:`start_run`."""
        request, steps = self.start_run(prompts, max_new_tokens, policy=Plain(sampling), seed=seed,
                                        stop_ids=stop_ids, suppress_ids=suppress_ids, interventions=interventions,
                                        ladder=ladder, layers=layers)
        try:
            run = loop.collect(steps, request, self.config.pad_token_id, check_every=1, lag=0)
        finally:
            steps.close()
        return Generation(run.tokens, run.lengths, run.stopped)

    def generate_stream(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 32, *,
                        sampling: Sampling = Sampling(), seed: int = 0, stop_ids: Sequence[int] | None = None,
                        suppress_ids: Sequence[int] | None = None, interventions: Interventions | None = None,
                        ladder: Ladder | None = None, layers: Sequence[int] | None = None) -> Iterator[np.ndarray]:
        """Like :meth:`generate`, but yields each call's ``[B]`` tokens as soon as they exist (as
        ``mtijax.generate_stream``)."""
        request, steps = self.start_run(prompts, max_new_tokens, policy=Plain(sampling), seed=seed,
                                        stop_ids=stop_ids, suppress_ids=suppress_ids, interventions=interventions,
                                        ladder=ladder, layers=layers)
        try:
            for _, record in loop.stream(steps, request):
                yield np.asarray(record.token)[:request.batch]
        finally:
            steps.close()

    # ----------------------------------------------------------------------------------------- host layers

    def override_layer(self, layer: int, layer_params: Mapping[str, Any]) -> None:
        """Run layer ``layer`` with ``layer_params`` from now on (one layer in the params layout, e.g.
        ``tree_map(lambda a: a[layer], params["layers"])``).

        The layer is pinned in host memory (outside the host cache and its caps) and never read from the source
        again; nothing is written to disk.
        """
        self._check_layer(layer)
        stored: Tree = {}
        for leaf in self.store.leaves:
            try:
                value = get_leaf(layer_params, leaf.path)
            except (KeyError, TypeError):
                raise MtijaxError(f"layer params have no leaf {'/'.join(leaf.path)}") from None
            want = leaf.shape[:-2] + leaf.shape[-2:][::-1] if leaf.transpose else leaf.shape
            if tuple(np.shape(value)) != tuple(want):
                raise MtijaxError(f"layer params leaf {'/'.join(leaf.path)} has shape {list(np.shape(value))}, "
                                  f"expected {list(want)}")
            value = np.asarray(value).astype(self.store.dtype)
            set_leaf(stored, leaf.path, np.ascontiguousarray(value.swapaxes(-1, -2) if leaf.transpose else value))
        self._pipeline.reset()
        core: Tree = {}
        for leaf in self._leaves:
            set_leaf(core, leaf.path, get_leaf(stored, leaf.path))
        self._fetcher.pin(layer, self.host.place(core))
        if self.experts is not None:
            self.experts.pin(layer, stored)

    def layer_params(self, layer: int) -> Tree:
        """Layer ``layer``'s weights as this model runs them (overridden, else read from the source), as host
        arrays in the params layout."""
        self._check_layer(layer)
        if layer in self._fetcher.pinned:
            stored = jax.tree.map(np.asarray, self._fetcher.pinned[layer].result())
        else:
            stored = self.store.read_layer(layer, self._leaves)
        if self.experts is not None:
            stored = merge(stored, self.experts.host_experts(layer))
        return to_params_layout(stored, self.store.leaves)

    def inject(self, teacher: Mapping[str, Any], spec: InjectionSpec, alpha: float | jax.Array) -> list[int]:
        """Seed 000's injection into the host layers: ``mtijax.inject`` applied to each layer ``spec`` touches,
        which is then pinned in host memory (:meth:`override_layer`); the source (checkpoint files or params) is
        never changed. ``teacher`` is a params pytree; its layers pair with this model's as ``mtijax.inject``
        pairs them. Returns the layers injected."""
        shapes = family(self.config).param_shapes(self.config)["layers"]
        stand_in = {"layers": jax.tree.map(lambda shape: jax.ShapeDtypeStruct(shape, self.store.dtype), shapes,
                                           is_leaf=lambda x: isinstance(x, tuple))}
        pairs = {student: source for _, student, source in plan(stand_in, teacher, spec)}
        one = dataclasses.replace(spec, layers=(0,), teacher_layers=(0,))
        for student, source in sorted(pairs.items()):
            mine = {"layers": jax.tree.map(lambda a: jnp.asarray(a[None]), self.layer_params(student))}
            theirs = {"layers": jax.tree.map(lambda a: a[source][None], teacher["layers"])}
            blended = _blend(mine, theirs, one, alpha)["layers"]
            self.override_layer(student, jax.tree.map(lambda a: np.asarray(a[0]), blended))
        return sorted(pairs)

    # ----------------------------------------------------------------------------------------- settings, stats

    def set_prefetch(self, prefetch: int) -> None:
        """Change the prefetch depth, keeping the host cache (and the reading threads)."""
        if prefetch < 0:
            raise MtijaxError(f"prefetch must be >= 0, got {prefetch}")
        self._pipeline.reset()
        self.prefetch = prefetch
        self._pipeline = LayerPipeline(self._fetcher, self.host.to_device, prefetch, self._count_transfer)

    def stats(self) -> StreamStats:
        """Counters since the model was made or :meth:`reset_stats` was called."""
        c = self._counts
        experts = self.experts.stats() if self.experts else {}
        bytes_read = self._fetcher.bytes_read - c["bytes_read_base"]
        bytes_read += self.experts.bytes_read() if self.experts else 0
        return StreamStats(
            passes=c["passes"], layers_run=c["layers_run"], layers_skipped=c["layers_skipped"],
            bytes_to_device=c["transfers"] * self.layer_nbytes, bytes_read=bytes_read, seconds=c["seconds"],
            host_cache=self._fetcher.cache.stats(), max_live_layers=self._pipeline.max_live,
            accounted_peak_bytes=c["peak"], allocator_peak_bytes=allocator_peak(self.device),
            host_memory=f"{self.host.kind} ({self.host.reason})", tokens=c["tokens"],
            host_cache_policy=self.host_cache_policy, pinned_layers=len(self._fetcher.pinned), **experts)

    def reset_stats(self) -> None:
        """Zero the pass, byte and time counters (cache counters and the allocator's peak keep counting)."""
        self._counts = dict(passes=0, layers_run=0, layers_skipped=0, transfers=0, seconds=0.0, peak=0, tokens=0,
                            bytes_read_base=self._fetcher.bytes_read)
        self._pipeline.max_live = 0
        if self.experts:
            self.experts.reset_stats()

    def compiled_steps(self) -> int:
        """How many layer-step executables were compiled (one per call shape and intervention structure, never
        one per layer)."""
        return sum(1 for key in self._used_steps if key[0] == "step")

    def close(self) -> None:
        """Stop the reading threads and drop prefetched layers."""
        self._pipeline.reset()
        self._fetcher.close()

    def __enter__(self) -> "StreamedModel":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ----------------------------------------------------------------------------------------- the passes

    def _pass(self, x: jax.Array, positions: jax.Array, cache: kv.KVCache, write_index: Any, order: list[int],
              then: Sequence[int], calls: LayerCalls, router_state: Any, rows: int | None = None) -> PassOutput:
        """One forward pass over ``order``'s layers, writing this call's keys and values into the cache (consumed).
        ``rows``: the real rows (the rest are the batch bucket's padding, whose routing moves no experts)."""
        start = time.perf_counter()
        state = {"x": x, "k": cache.k, "v": cache.v, "router": router_state}
        captured: dict[int, dict[str, jax.Array]] = {}
        routed_positions = None
        if self.experts is not None:
            routed_positions = np.array(positions)
            routed_positions[len(routed_positions) if rows is None else rows:] = -1

        def run_layer(layer: int, stored: Tree) -> jax.Array:
            if self.experts is not None:
                route = self._route_fn(state, positions, cache.positions, write_index, calls, layer)
                stored = self.experts.complete(layer, stored, route, routed_positions)
            args = self._step_args(stored, layer, state["x"], positions, state["k"], state["v"], cache.positions,
                                   write_index, calls, state["router"])
            step = self._executable("step", layer_step, calls.capture, STEP_DONATE, *args)
            state["x"], state["k"], state["v"], captured[layer], state["router"] = step(*args)
            if layer in calls.after:
                state["x"] = calls.after[layer](state["x"], positions)
            return state["x"]

        self._pipeline.run(order, run_layer, then)
        cache = kv.KVCache(state["k"], state["v"], write_positions(cache.positions, positions, write_index))
        x = jax.block_until_ready(state["x"])
        c = self._counts
        c["seconds"] += time.perf_counter() - start
        c["passes"] += 1
        c["layers_run"] += len(order)
        c["layers_skipped"] += self.config.num_layers - len(order)
        c["tokens"] += int(np.prod(positions.shape))
        check_allocator_peak(self.max_device_memory, allocator_peak(self.device), c["peak"])
        stacked = {site: jnp.stack([captured[layer][site] for layer in order]) for site in calls.capture}
        return PassOutput(x, cache, stacked, state["router"])

    def _step_args(self, stored: Tree | None, layer: int, x: Any, positions: Any, cache_k: Any, cache_v: Any,
                   cache_positions: Any, write_index: Any, calls: LayerCalls, router_state: Any) -> tuple:
        """The arguments of :func:`~mtijax.streaming.step.layer_step` (``stored`` None: the layer's shapes)."""
        if stored is None:
            stored = {}
            for leaf in self.store.leaves if self.experts else self._leaves:
                set_leaf(stored, leaf.path, jax.ShapeDtypeStruct(leaf.shape, self.store.dtype))
        return (stored, self._specs[layer], x, positions, cache_k, cache_v, cache_positions, np.int32(layer),
                write_index, calls.patches, calls.hook, router_state)

    def _route_fn(self, state: dict, positions: jax.Array, cache_positions: jax.Array, write_index: Any,
                  calls: LayerCalls, layer: int) -> Callable[[Tree], np.ndarray]:
        """For expert streaming: a function of the expert slab giving this layer's routed experts ``[B, S, k]``."""
        def route(layer_params: Tree) -> np.ndarray:
            args = self._step_args(layer_params, layer, state["x"], positions, state["k"], state["v"],
                                   cache_positions, write_index, calls, state["router"])
            return np.asarray(self._executable("route", route_step, (), (), *args)(*args))
        return route

    def _executable(self, name: str, fn: Callable, capture: tuple[str, ...], donate: tuple[int, ...],
                    *args: Any) -> Any:
        """``fn`` compiled for these argument shapes: once per shape for every layer (and every model)."""
        leaves = self.store.leaves if self.experts else self._leaves
        abstract = _abstract(args, self.host.device_sharding)
        key = (name, self.config, leaves, capture, self.host.device_sharding, jax.tree.structure(abstract),
               tuple((a.shape, a.dtype) for a in jax.tree.leaves(abstract)))
        exe = _COMPILED.get(key)
        if exe is None:
            exe = jax.jit(functools.partial(fn, self.config, leaves, capture),
                          donate_argnums=donate).lower(*abstract).compile()
            _COMPILED[key] = exe
        self._used_steps.add(key)
        return exe

    # ----------------------------------------------------------------------------------------- memory

    def _check_memory(self, cases: Sequence[tuple[tuple[str, ...], tuple]], batch: int, cache_length: int,
                      logits_rows: int) -> None:
        """Compile the step for each of a call's shapes (``cases``: captures and step arguments, arrays or
        ShapeDtypeStructs) and check the whole device-memory budget before any weight moves."""
        dtype = jnp.dtype(self.store.dtype)
        c = self.config
        cache_bytes = 2 * c.num_layers * batch * cache_length * c.num_kv_heads * c.head_dim * dtype.itemsize
        cache_bytes += batch * cache_length * 4
        work = 0
        for capture, args in cases:
            exe = self._executable("step", layer_step, capture, STEP_DONATE, *args)
            analysis = exe.memory_analysis()
            temp = int(getattr(analysis, "temp_size_in_bytes", 0) or 0) if analysis is not None else 0
            work = max(work, temp + 2 * _nbytes(args[2]) + _nbytes(args[9:]))
        work += logits_rows * c.vocab_size * 4
        if self.host.kind == "device":  # the host cache and the pinned layers are on the device itself
            work += self._host_cache_bytes + len(self._fetcher.pinned) * self.layer_nbytes
        budget = Budget(self.store.resident_nbytes, self.layer_nbytes, self.prefetch + 1, cache_bytes, work,
                        self.experts.device_bytes() if self.experts else 0)
        check_budget(self.max_device_memory, budget)
        self._counts["peak"] = max(self._counts["peak"], budget.total)

    # ----------------------------------------------------------------------------------------- helpers

    def _dropping_prefetch(self, steps: Iterator) -> Iterator:
        """``steps``, dropping the prefetched layers when it ends or is closed."""
        try:
            yield from steps
        finally:
            self._pipeline.reset()

    def _read_layer(self, layer: int) -> Tree:
        return self.host.place(self.store.read_layer(layer, self._leaves))

    def _count_transfer(self, layer: int) -> None:
        self._counts["transfers"] += 1

    def _host_cache_capacity(self, items: int | None, nbytes: int | None) -> int:
        """The most bytes of layers the host cache can hold for this model."""
        layers = self.config.num_layers if items is None else min(items, self.config.num_layers)
        capacity = layers * self.layer_nbytes
        return capacity if nbytes is None else min(capacity, nbytes // self.layer_nbytes * self.layer_nbytes)

    def _new_cache(self, batch: int, length: int) -> kv.KVCache:
        c = self.config
        with jax.default_device(self.device):
            return kv.init_cache(c.num_layers, batch, length, c.num_kv_heads, c.head_dim, jnp.dtype(self.store.dtype))

    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.config.num_layers:
            raise MtijaxError(f"layer {layer} is out of range: the model has layers 0..{self.config.num_layers - 1}")

    def _check_after(self, after: Mapping[int, Any], order: list[int], what: str) -> None:
        """Refuse a graft or transform at a layer out of range or skipped by the layer selection."""
        for layer in sorted(after):
            self._check_layer(layer)
            if layer not in order:
                raise MtijaxError(f"{what} at layer {layer}, which the layer selection skips")

    def _order(self, layers: Sequence[int] | None) -> list[int]:
        if layers is None:
            return list(range(self.config.num_layers))
        chosen = sorted({int(layer) for layer in layers})
        for layer in chosen:
            self._check_layer(layer)
        return chosen


class _StreamedStack:
    """The engine's :class:`~mtijax.engine.loop.LayerStack` of one streamed run: every prefill chunk and decode call
    is one pass of ``model`` over ``order`` (see the module docstring). The device-memory budget of both call
    shapes, with this run's interventions, is checked at the first call, before any weight moves."""

    def __init__(self, model: StreamedModel, order: list[int], request: Request):
        self.model = model
        self.order = order
        self.request = request
        self.passes_left = request.width // request.chunk + request.max_new_tokens
        self.checked = False

    def prefill_chunk(self, cache, carry, router_state, tokens, positions, start, interventions):
        outputs: dict[int, tuple[Any, dict]] = {}
        calls = self._calls(interventions, prefill_patches(interventions, start, tokens.shape[1]), (), carry, outputs)
        self._check(cache, router_state, interventions)
        x = embed(self.model.config, self.model.resident, tokens)
        out = self.model._pass(x, positions, cache, start, self.order, self._then(), calls, router_state,
                               self.request.batch)
        return out.cache, {layer: outputs[layer][0] for layer in carry}, out.router_state

    def decode_step(self, policy, record_logits, state, interventions, stops, suppress):
        outputs: dict[int, tuple[Any, dict]] = {}
        capture = tuple(sorted({site for site, _ in interventions.trace}))
        calls = self._calls(interventions, decode_patches(interventions, state.step), capture, state.carry, outputs)
        self._check(state.cache, state.router, interventions)
        model = self.model
        x = embed(model.config, model.resident, state.token[:, None])
        slot = state.slot % state.cache.length  # decode slots wrap into the left padding (mtijax.engine.request)
        out = model._pass(x, state.position[:, None], state.cache, slot, self.order, self._then(), calls, state.router,
                          self.request.batch)
        new, record = _finish(model.config, policy, record_logits, model.resident, state._replace(cache=None),
                              out.x[:, -1], out.captured, out.router_state, outputs, interventions, stops, suppress)
        return new._replace(cache=out.cache), record

    def _calls(self, interventions: Interventions, patches: dict[str, Patch], capture: tuple[str, ...],
               carry: Mapping[int, Any], outputs: dict) -> LayerCalls:
        """The pass's layer calls; each graft's ``(new carry, metrics)`` goes into ``outputs``."""
        def graft(layer: int) -> Callable[[jax.Array, jax.Array], jax.Array]:
            def apply(h: jax.Array, positions: jax.Array) -> jax.Array:
                h, new_carry, metrics = apply_graft(interventions.grafts[layer], h, positions, carry[layer])
                outputs[layer] = (new_carry, metrics)
                return h
            return apply

        hook = None if interventions.router is None else interventions.router.replace(state=None)
        return LayerCalls(patches, hook, capture, {layer: graft(layer) for layer in interventions.grafts})

    def _then(self) -> list[int]:
        """The next pass's order, to prefetch at the end of this one (none after the run's last pass)."""
        self.passes_left -= 1
        return self.order if self.passes_left > 0 else []

    def _check(self, cache: kv.KVCache, router_state: Any, interventions: Interventions) -> None:
        if self.checked:
            return
        self.checked = True
        model, request = self.model, self.request
        rows, width = request.rows, model.config.hidden_size
        dtype = jnp.dtype(model.store.dtype)
        scalar = jax.ShapeDtypeStruct((), jnp.int32)
        hook = None if interventions.router is None else interventions.router.replace(state=None)
        cases = []
        shapes = [(request.chunk, jax.eval_shape(lambda i, s: prefill_patches(i, s, request.chunk), interventions,
                                                 scalar), ())] if request.width else []
        capture = tuple(sorted({site for site, _ in interventions.trace}))
        shapes.append((1, jax.eval_shape(decode_patches, interventions, scalar), capture))
        for length, patches, sites in shapes:
            calls = LayerCalls(patches, hook, sites, {})
            args = model._step_args(None, 0, jax.ShapeDtypeStruct((rows, length, width), dtype),
                                    jax.ShapeDtypeStruct((rows, length), jnp.int32), cache.k, cache.v,
                                    cache.positions, scalar, calls, router_state)
            cases.append((sites, args))
        model._check_memory(cases, rows, cache.length, logits_rows=rows)
