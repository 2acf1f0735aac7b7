"""Host caches capped by item count and/or bytes, with exact counters: least-recently-used, and a fixed
resident subset.

:class:`LRUCache` is the seed's "metabolic eviction" with "touch on read": a
hit moves the item to the most-recently-used end, a new item is added there,
and the least recently used items are evicted until both caps hold again.

A streamed model scans its layers cyclically (0, 1, ..., L-1, 0, 1, ...), and
on a cyclic scan over more items than it holds LRU never hits: each item is
evicted just before it comes round again. :class:`ResidentCache` keeps the
first items that fit and never evicts, so with room for ``C`` of ``L`` layers
``C`` of every ``L`` lookups hit from the second pass on (the optimum for a
cyclic scan: no policy can keep more than ``C``). It is the streamer's default
(:data:`POLICIES`, :func:`host_cache`). The streamer keeps layers in one
(keys are layer indices), and OLMoE experts (keys ``(layer, expert)``) in a
second one.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from typing import Any, Hashable

from mtijax.errors import MtijaxError


@dataclasses.dataclass(frozen=True)
class CacheStats:
    """Counters of a cache since it was made.

    Attributes:
      hits: lookups that found the key. misses: lookups that did not.
      evictions: items dropped to make room (never the item just added).
      items, bytes: what the cache holds now.
    """

    hits: int
    misses: int
    evictions: int
    items: int
    bytes: int

    @property
    def hit_rate(self) -> float:
        """hits / lookups (0 when there were none)."""
        lookups = self.hits + self.misses
        return self.hits / lookups if lookups else 0.0


class LRUCache:
    """Least-recently-used cache of at most ``max_items`` items and ``max_bytes`` bytes (None: no such cap).

    An item that cannot fit even in an empty cache (``max_items == 0``, or more
    bytes than ``max_bytes``) is not stored, and nothing is evicted for it.
    Thread-safe.
    """

    def __init__(self, max_items: int | None = 8, max_bytes: int | None = None):
        for name, cap in (("max_items", max_items), ("max_bytes", max_bytes)):
            if cap is not None and cap < 0:
                raise MtijaxError(f"cache {name} must be >= 0, got {cap}")
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._items: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._hits = self._misses = self._evictions = 0
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> Any | None:
        """The value of ``key`` (touching it), or None; counts a hit or a miss."""
        with self._lock:
            entry = self._items.get(key)
            if entry is None:
                self._misses += 1
                return None
            self._hits += 1
            self._items.move_to_end(key)
            return entry[0]

    def put(self, key: Hashable, value: Any, nbytes: int) -> list[Hashable]:
        """Add (or replace) ``key`` as the most recently used item; returns the keys evicted for it."""
        with self._lock:
            if key in self._items:
                self._bytes -= self._items.pop(key)[1]
            if self.max_items == 0 or (self.max_bytes is not None and nbytes > self.max_bytes):
                return []
            self._items[key] = (value, nbytes)
            self._bytes += nbytes
            evicted = []
            while self._over():
                old, (_, old_bytes) = self._items.popitem(last=False)
                self._bytes -= old_bytes
                self._evictions += 1
                evicted.append(old)
            return evicted

    def discard(self, key: Hashable, value: Any = None) -> None:
        """Drop ``key`` (only if it still holds ``value``, when given); not an eviction."""
        with self._lock:
            entry = self._items.get(key)
            if entry is not None and (value is None or entry[0] is value):
                self._bytes -= self._items.pop(key)[1]

    def keys(self) -> list[Hashable]:
        """Keys from least to most recently used."""
        with self._lock:
            return list(self._items)

    def __contains__(self, key: Hashable) -> bool:
        """Whether ``key`` is held (not a lookup: no counter moves, nothing is touched)."""
        with self._lock:
            return key in self._items

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(self._hits, self._misses, self._evictions, len(self._items), self._bytes)

    def _over(self) -> bool:
        too_many = self.max_items is not None and len(self._items) > self.max_items
        too_big = self.max_bytes is not None and self._bytes > self.max_bytes
        return too_many or too_big


class ResidentCache(LRUCache):
    """A fixed resident subset: the first items that fit both caps stay, later ones are not stored (and nothing
    is ever evicted). Replacing a held key and dropping one (:meth:`discard`, e.g. a failed read) work as in
    :class:`LRUCache`; a dropped item makes room for the next new one. Thread-safe."""

    def put(self, key: Hashable, value: Any, nbytes: int) -> list[Hashable]:
        """Add (or replace) ``key`` if it fits beside what is held; never evicts (returns ``[]``)."""
        with self._lock:
            held = self._items.pop(key, None)
            if held is not None:
                self._bytes -= held[1]
            self._items[key] = (value, nbytes)
            self._bytes += nbytes
            if self._over():
                del self._items[key]
                self._bytes -= nbytes
            return []


POLICIES = {"resident": ResidentCache, "lru": LRUCache}
"""Host cache policies by name: ``"resident"`` (the default: a fixed resident subset) and ``"lru"``."""


def host_cache(policy: str, max_items: int | None, max_bytes: int | None = None) -> LRUCache:
    """A host cache of policy ``policy`` (:data:`POLICIES`) with these caps."""
    if policy not in POLICIES:
        raise MtijaxError(f"unknown host cache policy {policy!r} ({', '.join(POLICIES)})")
    return POLICIES[policy](max_items, max_bytes)
