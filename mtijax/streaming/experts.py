"""Expert streaming for OLMoE: move to the device only the experts the router chose for this step's tokens.

An OLMoE layer is mostly experts (OLMoE-1B-7B: 64 experts, 8 per token; the
experts are 98% of a layer's bytes), and a decode step of one token uses 8 of
them per layer. Streaming whole layers moves all 64; this moves the ones used.

Per layer and step:

1. the layer *core* (attention, norms, router: streamed like a whole layer)
   runs the model's own block once to capture ``router_experts``;
2. the routed experts of the real tokens (padding is never read by a real
   token, so its routing is ignored) come from the per-layer device expert
   cache (LRU, ``device_experts_per_layer`` experts), else from the host
   expert cache (LRU over ``(layer, expert)``), else from disk, read in
   parallel by background threads;
3. they are written into the *expert slab*, one device buffer of a layer's
   ``E`` experts shared by all layers, and the block runs again with the
   core and the slab, giving exactly the resident logits.

The slab's other rows hold stale experts of earlier layers (zeros at first).
The block never reads them for this step's output: the gathered and grouped
dispatches read only routed experts, and the dense one weights the others by
exactly 0. The block is called twice, so the attention half is computed twice
(small next to the transfer it saves); the host must read the routing back
after step 1, so experts cannot be prefetched across layers.

The block takes every expert's weights as ``[E, ...]`` arrays, hence the
slab: device memory holds one layer's worth of experts plus the caches, while
only routed experts cross the bus.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from mtijax.streaming.cache import LRUCache, host_cache
from mtijax.streaming.host import HostMemory
from mtijax.streaming.prefetch import Fetcher
from mtijax.streaming.store import LayerStore, get_leaf, set_leaf

Tree = dict[str, Any]


def merge(core: Tree, experts: Tree) -> Tree:
    """A layer's core plus ``{"moe": {gate_proj, up_proj, down_proj}}`` -> the whole layer (file layout)."""
    return {**core, "moe": {**core["moe"], **experts["moe"]}}


class ExpertStreamer:
    """The expert slab, the per-layer device expert caches and the host expert cache of one streamed model.

    Args:
      store: the checkpoint. host: where host copies live.
      workers: background reading threads.
      host_cache_experts: experts in the host cache (None: no cap).
      device_experts_per_layer: experts kept on the device per layer (0: none kept between steps).
      policy: the host cache's policy (``mtijax.streaming.cache.POLICIES``).
    """

    def __init__(self, store: LayerStore, host: HostMemory, workers: int, host_cache_experts: int | None,
                 device_experts_per_layer: int, policy: str = "resident"):
        self.store = store
        self.host = host
        self.expert_nbytes = store.expert_nbytes
        self.fetcher = Fetcher(lambda key: host.place(store.read_expert(*key)), lambda key: self.expert_nbytes,
                               host_cache(policy, host_cache_experts), workers)
        self.device_experts_per_layer = device_experts_per_layer
        self.device_caches = [LRUCache(device_experts_per_layer) for _ in range(store.num_layers)]
        slab: Tree = {}
        for leaf in store.expert_leaves():
            set_leaf(slab, leaf.path, jnp.zeros(leaf.shape, jnp.dtype(store.dtype), device=host.device_sharding))
        self.slab = slab
        self._put = jax.jit(lambda slab, expert, weights: jax.tree.map(lambda s, w: s.at[expert].set(w), slab, weights),
                            donate_argnums=0)
        self.reset_stats()

    def complete(self, layer: int, core: Tree, route: Callable[[Tree], np.ndarray], positions: np.ndarray) -> Tree:
        """Route this step's tokens at ``layer``, bring their experts into the slab; the whole layer for the step."""
        routed = route(merge(core, self.slab))
        needed = np.unique(routed[positions >= 0]).tolist()
        cache = self.device_caches[layer]
        on_device = {e: cache.get(e) for e in needed}
        missing = [e for e, weights in on_device.items() if weights is None]
        pending = {e: self.fetcher.request((layer, e)) for e in missing}
        for expert in needed:
            weights = on_device[expert]
            if weights is None:
                weights = self.host.to_device(self.fetcher.result((layer, expert), pending[expert]))
                cache.put(expert, weights, self.expert_nbytes)
                self._moved += 1
            else:
                self._device_hits += 1
            self.slab = self._put(self.slab, np.int32(expert), weights)
        return merge(core, self.slab)

    def pin(self, layer: int, experts: Tree) -> None:
        """Serve layer ``layer``'s experts from ``experts`` (``{"moe": {...: [E, ...]}}``, file layout, host arrays)
        from now on, never from disk; drops the layer's device-cached experts."""
        for expert in range(self.store.config.num_experts):
            one: Tree = {}
            for leaf in self.store.expert_leaves():
                set_leaf(one, leaf.path, np.ascontiguousarray(get_leaf(experts, leaf.path)[expert]))
            self.fetcher.pin((layer, expert), self.host.place(one))
        self.device_caches[layer] = LRUCache(self.device_experts_per_layer)

    def host_experts(self, layer: int) -> Tree:
        """Layer ``layer``'s experts as host arrays ``{"moe": {...: [E, ...]}}`` (pinned ones, else read from disk)."""
        rows = [self.fetcher.pinned[(layer, e)].result() if (layer, e) in self.fetcher.pinned
                else self.store.read_expert(layer, e) for e in range(self.store.config.num_experts)]
        out: Tree = {}
        for leaf in self.store.expert_leaves():
            set_leaf(out, leaf.path, np.stack([np.asarray(get_leaf(row, leaf.path)) for row in rows]))
        return out

    def device_bytes(self) -> int:
        """Device bytes of the slab and of full device expert caches."""
        slab = sum(int(np.prod(get_leaf(self.slab, leaf.path).shape)) for leaf in self.store.expert_leaves())
        slab *= jnp.dtype(self.store.dtype).itemsize
        return slab + self.store.num_layers * self.device_experts_per_layer * self.expert_nbytes

    def stats(self) -> dict[str, Any]:
        return dict(experts_moved=self._moved, expert_bytes_to_device=self._moved * self.expert_nbytes,
                    expert_device_hits=self._device_hits, expert_host_cache=self.fetcher.cache.stats())

    def bytes_read(self) -> int:
        """Expert bytes read from disk since :meth:`reset_stats`."""
        return self.fetcher.bytes_read - self._read_base

    def reset_stats(self) -> None:
        self._moved = 0
        self._device_hits = 0
        self._read_base = self.fetcher.bytes_read
