"""Background reading into a host cache, and the pipeline that moves layers to the device ahead of compute.

:class:`Fetcher` answers "give me layer (or expert) ``key``" from its pinned
items (values put in host memory by the caller, e.g. injected layers, never read
from disk), else from the host cache, or starts reading it on a background
thread and caches the pending result at once, so the cache's order (and its
counters) follow the order of requests, not the order in which reads happen to
finish.

:class:`LayerPipeline` runs one pass over a list of layers with prefetch depth
``k``: before dispatching layer ``i``'s compute it has issued the device copies
of layers ``i .. i + k`` and started host reads of layers up to ``i + 2k``
(JAX dispatch is asynchronous, so the copy of layer ``i + 1`` runs while layer
``i`` computes; this ordering is the one measured to hide the copy on an
H100). Before issuing a new copy it waits until the previous layer's compute
has finished, so at most ``k + 1`` layers are ever on the device. ``k = 0`` is
fully sequential: read, copy, compute, wait.
"""

from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Hashable, Sequence

import jax

from mtijax.streaming.cache import LRUCache


class Fetcher:
    """Host copies of items through an LRU cache, read by ``workers`` background threads (0: in the caller).

    Args:
      read: key -> host value (a fresh copy from disk, placed in host memory).
      nbytes: key -> bytes of its value, for the cache's byte cap.
      cache: the host cache (it stores the pending reads themselves).
    """

    def __init__(self, read: Callable[[Hashable], Any], nbytes: Callable[[Hashable], int], cache: LRUCache,
                 workers: int):
        self._read_fn = read
        self._nbytes = nbytes
        self.cache = cache
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="mtijax-read") if workers > 0 else None
        self._lock = threading.Lock()
        self.bytes_read = 0
        self.reads = 0
        self.pinned: dict[Hashable, Future] = {}

    def pin(self, key: Hashable, value: Any) -> None:
        """Serve ``key`` from ``value`` from now on (not a cache lookup, never read); drops it from the cache."""
        done: Future = Future()
        done.set_result(value)
        self.pinned[key] = done
        self.cache.discard(key)

    def request(self, key: Hashable) -> Future:
        """A future of ``key``'s host value: the pinned one, the cached one (a hit, touched) or a read started now
        (a miss)."""
        if key in self.pinned:
            return self.pinned[key]
        pending = self.cache.get(key)
        if pending is None:
            pending = self._start(key)
            self.cache.put(key, pending, self._nbytes(key))
        return pending

    def result(self, key: Hashable, pending: Future) -> Any:
        """Wait for a requested value; a failed read is dropped from the cache and its error raised here."""
        try:
            return pending.result()
        except BaseException:
            self.cache.discard(key, pending)
            raise

    def get(self, key: Hashable) -> Any:
        """``result(key, request(key))``."""
        return self.result(key, self.request(key))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def _read(self, key: Hashable) -> Any:
        value = self._read_fn(key)
        with self._lock:
            self.bytes_read += self._nbytes(key)
            self.reads += 1
        return value

    def _start(self, key: Hashable) -> Future:
        if self._pool is not None:
            return self._pool.submit(self._read, key)
        done: Future = Future()
        try:
            done.set_result(self._read(key))
        except BaseException as e:  # delivered by result(), as from a worker thread
            done.set_exception(e)
        return done


class LayerPipeline:
    """Runs passes over layers, keeping device copies ``depth`` layers ahead of compute (see the module docstring).

    Args:
      fetcher: host copies of layers (keys are layer indices).
      to_device: host copy -> device copy (asynchronous).
      depth: the prefetch depth ``k``.
      on_transfer: called with the layer index of every device copy issued.
    """

    def __init__(self, fetcher: Fetcher, to_device: Callable[[Any], Any], depth: int,
                 on_transfer: Callable[[int], None]):
        self.fetcher = fetcher
        self.to_device = to_device
        self.depth = depth
        self.on_transfer = on_transfer
        self._host: deque[tuple[int, Future]] = deque()
        self._device: deque[tuple[int, Any]] = deque()
        self._last: jax.Array | None = None
        self.max_live = 0

    def run(self, order: Sequence[int], compute: Callable[[int, Any], jax.Array], then: Sequence[int] = ()) -> None:
        """Call ``compute(layer, device_layer)`` for each layer of ``order``, in order.

        ``compute`` dispatches the layer's work and returns an array that is
        ready when it is done. ``then`` is the order of the next pass, if one
        will follow: its first ``depth`` layers are prefetched at the end of
        this one (a different next order just discards them).
        """
        stream = list(order) + list(then)[: self.depth]
        try:
            self._keep_matching(stream)
            for i, layer in enumerate(order):
                if self._last is not None:
                    jax.block_until_ready(self._last)
                    self._last = None
                self._advance(stream, i)
                queued, device_layer = self._device.popleft()
                assert queued == layer
                self._last = compute(layer, device_layer)
                del device_layer
        except BaseException:
            self.reset()
            raise

    def reset(self) -> None:
        """Drop every prefetched layer (host reads still running finish in the background)."""
        self._host.clear()
        self._device.clear()
        self._last = None

    def _keep_matching(self, stream: list[int]) -> None:
        """Keep what the previous pass prefetched only if it is what this pass starts with."""
        device = [layer for layer, _ in self._device]
        if device != stream[: len(device)]:
            self.reset()
            return
        host = [layer for layer, _ in self._host]
        if host != stream[len(device): len(device) + len(host)]:
            self._host.clear()

    def _advance(self, stream: list[int], i: int) -> None:
        last_device = min(i + self.depth, len(stream) - 1)
        while i + len(self._device) <= last_device:
            j = i + len(self._device)
            if self._host:
                layer, pending = self._host.popleft()
            else:
                layer, pending = stream[j], self.fetcher.request(stream[j])
            self._device.append((layer, self.to_device(self.fetcher.result(layer, pending))))
            self.on_transfer(layer)
        self.max_live = max(self.max_live, len(self._device))
        last_host = min(i + 2 * self.depth, len(stream) - 1)
        while i + len(self._device) + len(self._host) <= last_host:
            j = i + len(self._device) + len(self._host)
            self._host.append((stream[j], self.fetcher.request(stream[j])))
