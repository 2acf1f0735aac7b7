"""A least-recently-used cache capped by item count and/or bytes, with exact counters.

This is the seed's "metabolic eviction" with "touch on read": a hit moves the
item to the most-recently-used end, a new item is added there, and the least
recently used items are evicted until both caps hold again. The streamer keeps
layers in it (keys are layer indices), and OLMoE experts (keys ``(layer,
expert)``) in a second one.
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
