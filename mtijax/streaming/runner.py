"""The streamed runner: prefill and generation with a model whose layers arrive from disk one at a time.

The embedding, final norm and output head stay on the device; so does the KV
cache (``KVCache``, ``[L, B, T, K, H]``). Each layer's weights exist on the
device only while its turn comes: a :class:`~mtijax.streaming.prefetch.LayerPipeline`
copies them there ``prefetch`` layers ahead of the compute, from a host LRU
cache that background threads fill from the checkpoint files.

Every layer runs the model's own ``family(config).block``, through one
compiled step for all layers (the layer index, its ``layer_spec`` slice and
the cache slot are arguments, not constants), so streamed logits are the
resident model's. The step writes the layer's new keys and values into the
cache in place (the cache is donated).

Before a call touches any weights, the device memory it needs (resident parts,
``prefetch + 1`` layers, the KV cache and the compiled step's own temporaries,
from XLA's memory analysis) is checked against ``max_device_memory``.

OLMoE with ``stream_experts=True`` streams only the layer *core* (attention,
norms, router) this way; see :mod:`mtijax.streaming.experts`.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mtijax.config import ModelConfig
from mtijax.errors import MtijaxError
from mtijax.generate import Generation, Sampling, check_token_ids, pad_prompts, sample, stop_tokens
from mtijax.models import cache as kv
from mtijax.models.decoder import ForwardOutput, family
from mtijax.streaming.cache import LRUCache
from mtijax.streaming.experts import ExpertStreamer
from mtijax.streaming.host import HostMemory
from mtijax.streaming.memory import Budget, allocator_peak, check_budget, check_one_layer
from mtijax.streaming.prefetch import Fetcher, LayerPipeline
from mtijax.streaming.stats import StreamStats
from mtijax.interventions import Sites
from mtijax.streaming.store import Leaf, LayerStore, set_leaf, to_params_layout

Tree = dict[str, Any]


def prepare(config: ModelConfig, prompts, max_new_tokens: int, stop_ids):
    """Temporary layout of the old streamed loop (replaced by the engine's)."""
    if max_new_tokens < 1:
        raise MtijaxError(f"max-new-tokens must be >= 1, got {max_new_tokens}")
    check_token_ids(config, [t for p in prompts for t in p])
    width = -(-max(len(p) for p in prompts) // 16) * 16 if prompts and all(prompts) else 0
    tokens, positions, lengths = pad_prompts(prompts, config.pad_token_id, width or None)
    return tokens, positions, lengths, -(-(tokens.shape[1] + max_new_tokens) // 16) * 16, stop_tokens(config, stop_ids)


def _abstract(tree: Any, sharding: jax.sharding.Sharding) -> Any:
    """Shapes and dtypes of ``tree``'s arrays (or ShapeDtypeStructs), placed on ``sharding``."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)


def _layer_step(config: ModelConfig, leaves: tuple[Leaf, ...], stored: Tree, spec: Tree, x: jax.Array,
                positions: jax.Array, cache_k: jax.Array, cache_v: jax.Array, cache_positions: jax.Array,
                layer: jax.Array, write_index: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One layer: the model's block on this layer's weights (file layout) and cache; writes its new keys and
    values at ``[layer, :, write_index]`` of the ``[L, B, T, K, H]`` cache."""
    params = to_params_layout(stored, leaves)
    cache_kv = (cache_k[layer], cache_v[layer], cache_positions)
    x, (k, v) = family(config).block(config, params, spec, x, positions, cache_kv, None)
    zero = jnp.zeros((), jnp.int32)
    at = (layer, zero, write_index, zero, zero)
    cache_k = jax.lax.dynamic_update_slice(cache_k, k[None].astype(cache_k.dtype), at)
    cache_v = jax.lax.dynamic_update_slice(cache_v, v[None].astype(cache_v.dtype), at)
    return x, cache_k, cache_v


def _route_step(config: ModelConfig, leaves: tuple[Leaf, ...], stored: Tree, spec: Tree, x: jax.Array,
                positions: jax.Array, cache_k: jax.Array, cache_v: jax.Array, cache_positions: jax.Array,
                layer: jax.Array) -> jax.Array:
    """The experts the model's block routes this layer's tokens to: ``[B, S, k]`` (its other outputs unused)."""
    sites = Sites(("router_experts",), None)
    family(config).block(config, to_params_layout(stored, leaves), spec, x, positions,
                         (cache_k[layer], cache_v[layer], cache_positions), sites)
    return sites.captured["router_experts"]


_COMPILED: dict[Any, Any] = {}
"""Compiled steps by (function, config, leaves, argument shapes and placement), shared by every model."""


@functools.partial(jax.jit, static_argnums=0)
def _embed(config: ModelConfig, resident: Tree, tokens: jax.Array) -> jax.Array:
    return family(config).embed(config, resident, tokens)


@functools.partial(jax.jit, static_argnums=0)
def _logits(config: ModelConfig, resident: Tree, x: jax.Array) -> jax.Array:
    return family(config).unembed(config, resident, x)


_sample = jax.jit(sample, static_argnames=("sampling",))


class StreamedModel:
    """A model run with its layers streamed from a checkpoint (Hugging Face directory or GGUF file).

    Args:
      model: a model directory, a ``.gguf`` file, ``"gemma3-270m"``, or an open :class:`LayerStore`.
      dtype: compute dtype (``"float32"`` or ``"bfloat16"``).
      host_cache_layers: at most this many layers in the host cache (None: no count cap; 0: no cache).
      host_cache_bytes: at most this many bytes in the host cache (None: no byte cap).
      prefetch: device copies (and background reads) run this many layers ahead of the compute; 0 is
        sequential. At most ``prefetch + 1`` layers are on the device at once.
      max_device_memory: bytes; a call that needs more is refused before it starts (None: no cap).
      host_memory: ``"auto"``, ``"pinned_host"``, ``"numpy"`` or ``"device"`` (see
        :class:`~mtijax.streaming.host.HostMemory`).
      stream_experts: OLMoE only: stream each layer's routed experts instead of whole layers.
      device_experts_per_layer: expert streaming: experts kept on the device per layer (default: top-k).
      host_cache_experts: expert streaming: experts kept in host memory (default: ``host_cache_layers`` layers' worth).
      read_threads: background reading threads (default: ``min(prefetch, 8)``).
      device: where to run (default: the first device).
    """

    def __init__(self, model: str | Path | LayerStore | None, dtype: str = "float32", *,
                 host_cache_layers: int | None = 8, host_cache_bytes: int | None = None, prefetch: int = 2,
                 max_device_memory: int | None = None, host_memory: str = "auto", stream_experts: bool = False,
                 device_experts_per_layer: int | None = None, host_cache_experts: int | None = None,
                 read_threads: int | None = None, device: jax.Device | None = None):
        if prefetch < 0:
            raise MtijaxError(f"prefetch must be >= 0, got {prefetch}")
        self.store = model if isinstance(model, LayerStore) else LayerStore(model, dtype)
        self.config = self.store.config
        self.device = device or jax.devices()[0]
        self.prefetch = prefetch
        self.max_device_memory = max_device_memory
        if stream_experts and not self.store.streams_experts:
            raise MtijaxError(f"expert streaming needs a mixture-of-experts model; {self.store.location} is "
                              f"{self.config.architecture}")
        self._leaves = self.store.core_leaves() if stream_experts else self.store.leaves
        self.layer_nbytes = self.store.nbytes(self._leaves)
        check_one_layer(max_device_memory, self.store.resident_nbytes, self.layer_nbytes)
        self.host = HostMemory(self.device, host_memory)
        workers = min(prefetch, 8) if read_threads is None else read_threads
        self._fetcher = Fetcher(self._read_layer, lambda layer: self.layer_nbytes,
                                LRUCache(host_cache_layers, host_cache_bytes), workers)
        self._pipeline = LayerPipeline(self._fetcher, self.host.to_device, prefetch, self._count_transfer)
        self._host_cache_bytes = self._host_cache_capacity(host_cache_layers, host_cache_bytes)
        self.experts: ExpertStreamer | None = None
        if stream_experts:
            if host_cache_experts is None and host_cache_layers is not None:
                host_cache_experts = host_cache_layers * self.config.num_experts
            if device_experts_per_layer is None:
                device_experts_per_layer = self.config.num_experts_per_tok
            self.experts = ExpertStreamer(self.store, self.host, workers, host_cache_experts, device_experts_per_layer)
        self.host.reserve(self._host_cache_bytes + prefetch * self.layer_nbytes, self.layer_nbytes)
        self.resident = jax.device_put(self.store.read_resident(), self.host.device_sharding)
        spec = family(self.config).layer_spec(self.config)
        self._specs = [jax.device_put(jax.tree.map(lambda a: a[layer], spec), self.host.device_sharding)
                       for layer in range(self.config.num_layers)]
        self._used_steps: set[Any] = set()
        self.reset_stats()

    # ----------------------------------------------------------------------------------------- public API

    def forward(self, tokens: Any, positions: Any = None, *, cache: kv.KVCache | None = None,
                write_index: int = 0, layers: Sequence[int] | None = None) -> ForwardOutput:
        """The streamed counterpart of ``mtijax.forward``: ``ForwardOutput(logits [B, S, V] float32, cache, {})``.

        ``cache``, if given, is consumed (its arrays are donated) and the
        updated one returned. ``layers`` selects the layers that run; the
        others are skipped as identity.
        """
        tokens = np.asarray(tokens, np.int32)
        b, s = tokens.shape
        check_token_ids(self.config, tokens)
        positions = (np.broadcast_to(np.arange(s, dtype=np.int32), (b, s)) if positions is None
                     else np.asarray(positions, np.int32))
        own_cache = cache is None
        if own_cache:
            cache = self._new_cache(b, s)
        elif not 0 <= write_index <= cache.length - s:
            raise MtijaxError(f"cannot write {s} tokens at slot {write_index} of a {cache.length}-slot cache")
        order = self._order(layers)
        self._check_memory(b, (s,), cache.length, logits_per_row=s)
        x, cache = self._pass(_embed(self.config, self.resident, tokens), positions, cache, write_index, order, ())
        logits = _logits(self.config, self.resident, x)
        return ForwardOutput(logits, None if own_cache else cache, {})

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 32, *,
                 sampling: Sampling = Sampling(), seed: int = 0, stop_ids: Sequence[int] | None = None,
                 layers: Sequence[int] | None = None) -> Generation:
        """Like ``mtijax.generate`` (same arguments, padding, sampling keys and stop rules, so the same tokens).

        Every step is one streamed pass over the layers, whatever the batch,
        so the cost of streaming is shared by all rows. ``layers`` selects
        the layers that run (the rest are skipped as identity at every step).
        """
        tokens, positions, lengths, cache_length, stops = prepare(self.config, prompts, max_new_tokens, stop_ids)
        batch, width = tokens.shape
        order = self._order(layers)
        self._check_memory(batch, (width, 1) if max_new_tokens > 1 else (width,), cache_length, logits_per_row=1)
        pad = self.config.pad_token_id
        try:
            cache = self._new_cache(batch, cache_length)
            then = order if max_new_tokens > 1 else ()
            x, cache = self._pass(_embed(self.config, self.resident, tokens), positions, cache, 0, order, then)
            key, sub = jax.random.split(jax.random.key(seed))
            token = np.asarray(_sample(_logits(self.config, self.resident, x[:, -1]), sub, sampling))
            out = np.full((batch, max_new_tokens), pad, np.int32)
            out[:, 0] = token
            done, count = np.isin(token, stops), np.ones((batch,), np.int32)
            for step in range(max_new_tokens - 1):
                if done.all():
                    break
                then = order if step < max_new_tokens - 2 else ()
                x, cache = self._pass(_embed(self.config, self.resident, token[:, None]), (lengths + step)[:, None],
                                      cache, width + step, order, then)
                key, sub = jax.random.split(key)
                sampled = np.asarray(_sample(_logits(self.config, self.resident, x[:, -1]), sub, sampling))
                token = np.where(done, pad, sampled).astype(np.int32)
                out[:, step + 1] = token
                count += ~done
                done = done | np.isin(token, stops)
        finally:
            self._pipeline.reset()
        return Generation(out, count, done)

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
            host_memory=f"{self.host.kind} ({self.host.reason})", tokens=c["tokens"], **experts)

    def reset_stats(self) -> None:
        """Zero the pass, byte and time counters (cache counters and the allocator's peak keep counting)."""
        self._counts = dict(passes=0, layers_run=0, layers_skipped=0, transfers=0, seconds=0.0, peak=0, tokens=0,
                            bytes_read_base=self._fetcher.bytes_read)
        self._pipeline.max_live = 0
        if self.experts:
            self.experts.reset_stats()

    def compiled_steps(self) -> int:
        """How many layer-step executables were compiled (one per call shape, never one per layer)."""
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

    def _pass(self, x: jax.Array, positions: np.ndarray, cache: kv.KVCache, write_index: int,
              order: list[int], then: Sequence[int]) -> tuple[jax.Array, kv.KVCache]:
        """One forward pass over ``order``'s layers; writes this call's keys and values into the cache."""
        start = time.perf_counter()
        positions = jnp.asarray(positions)
        state = {"x": x, "k": cache.k, "v": cache.v}
        at = np.int32(write_index)

        def run_layer(layer: int, stored: Tree) -> jax.Array:
            if self.experts is not None:
                stored = self.experts.complete(layer, stored, self._route_fn(state, positions, cache, layer),
                                               np.asarray(positions))
            step = self._executable("step", _layer_step, (4, 5), stored, self._specs[layer], state["x"], positions,
                                    state["k"], state["v"], cache.positions, np.int32(layer), at)
            state["x"], state["k"], state["v"] = step(stored, self._specs[layer], state["x"], positions, state["k"],
                                                      state["v"], cache.positions, np.int32(layer), at)
            return state["x"]

        self._pipeline.run(order, run_layer, then)
        slot_positions = np.array(cache.positions)
        slot_positions[:, write_index:write_index + positions.shape[1]] = np.asarray(positions)
        cache = kv.KVCache(state["k"], state["v"], jax.device_put(slot_positions, self.host.device_sharding))
        x = jax.block_until_ready(state["x"])
        c = self._counts
        c["seconds"] += time.perf_counter() - start
        c["passes"] += 1
        c["layers_run"] += len(order)
        c["layers_skipped"] += self.config.num_layers - len(order)
        c["tokens"] += int(np.prod(positions.shape))
        return x, cache

    def _route_fn(self, state: dict, positions: jax.Array, cache: kv.KVCache,
                  layer: int) -> Callable[[Tree], np.ndarray]:
        """For expert streaming: a function of the expert slab giving this layer's routed experts ``[B, S, k]``."""
        def route(layer_params: Tree) -> np.ndarray:
            args = (layer_params, self._specs[layer], state["x"], positions, state["k"], state["v"], cache.positions,
                    np.int32(layer))
            return np.asarray(self._executable("route", _route_step, (), *args)(*args))
        return route

    def _executable(self, name: str, fn: Callable, donate: tuple[int, ...], *args: Any) -> Any:
        """``fn`` compiled for these argument shapes: once per shape for every layer (and every model)."""
        leaves = self.store.leaves if self.experts else self._leaves
        abstract = _abstract(args, self.host.device_sharding)
        key = (name, self.config, leaves, self.host.device_sharding, jax.tree.structure(abstract),
               tuple((a.shape, a.dtype) for a in jax.tree.leaves(abstract)))
        exe = _COMPILED.get(key)
        if exe is None:
            exe = jax.jit(functools.partial(fn, self.config, leaves), donate_argnums=donate).lower(*abstract).compile()
            _COMPILED[key] = exe
        self._used_steps.add(key)
        return exe

    # ----------------------------------------------------------------------------------------- memory

    def _check_memory(self, batch: int, lengths: tuple[int, ...], cache_length: int, logits_per_row: int) -> None:
        """Compile the step for each of this call's shapes (``batch x length`` tokens per pass) and check the
        whole device-memory budget before any weight moves."""
        dtype = jnp.dtype(self.store.dtype)
        c = self.config
        cache_bytes = 2 * c.num_layers * batch * cache_length * c.num_kv_heads * c.head_dim * dtype.itemsize
        cache_bytes += batch * cache_length * 4
        stored: Tree = {}
        for leaf in self.store.leaves if self.experts else self._leaves:
            set_leaf(stored, leaf.path, jax.ShapeDtypeStruct(leaf.shape, dtype))
        kv_shape = jax.ShapeDtypeStruct((c.num_layers, batch, cache_length, c.num_kv_heads, c.head_dim), dtype)
        scalar = jax.ShapeDtypeStruct((), jnp.int32)
        work = 0
        for length in lengths:
            x = jax.ShapeDtypeStruct((batch, length, c.hidden_size), dtype)
            exe = self._executable("step", _layer_step, (4, 5), stored, self._specs[0], x,
                                   jax.ShapeDtypeStruct((batch, length), jnp.int32), kv_shape, kv_shape,
                                   jax.ShapeDtypeStruct((batch, cache_length), jnp.int32), scalar, scalar)
            analysis = exe.memory_analysis()
            temp = int(getattr(analysis, "temp_size_in_bytes", 0) or 0) if analysis is not None else 0
            work = max(work, temp + 2 * x.size * dtype.itemsize)
        work += batch * logits_per_row * c.vocab_size * 4
        if self.host.kind == "device":
            work += self._host_cache_bytes
        budget = Budget(self.store.resident_nbytes, self.layer_nbytes, self.prefetch + 1, cache_bytes, work,
                        self.experts.device_bytes() if self.experts else 0)
        check_budget(self.max_device_memory, budget)
        self._counts["peak"] = max(self._counts["peak"], budget.total)

    # ----------------------------------------------------------------------------------------- helpers

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

    def _order(self, layers: Sequence[int] | None) -> list[int]:
        if layers is None:
            return list(range(self.config.num_layers))
        chosen = sorted({int(layer) for layer in layers})
        bad = [layer for layer in chosen if not 0 <= layer < self.config.num_layers]
        if bad:
            raise MtijaxError(f"layer {bad[0]} is out of range: the model has layers 0..{self.config.num_layers - 1}")
        return chosen

