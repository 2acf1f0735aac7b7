"""The streamer's host cache, size parsing, the original keyword rule, and the prefetch pipeline's ordering.

None of these need a model: the LRU cache is driven through scripted access
patterns whose evictions and counters are worked out by hand, the keyword
rule is checked against the original's layer lists for Gemma 3 12B written
out by hand, and the pipeline is run with fake transfers and computations that
log what happens in which order.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from mtijax.errors import MtijaxError
from mtijax.streaming import KeywordSectors, LRUCache, ResidentCache, format_bytes, parse_size
from mtijax.streaming.cache import CacheStats, host_cache
from mtijax.streaming.prefetch import Fetcher, LayerPipeline


def test_lru_evicts_least_recently_used_and_touches_on_read():
    cache = LRUCache(max_items=3)
    for key in "abc":
        cache.put(key, key.upper(), 1)
    assert cache.get("a") == "A"                      # hit: a becomes the most recent (b, c, a)
    assert cache.put("d", "D", 1) == ["b"]            # b is the least recently used
    assert cache.get("b") is None                     # miss
    assert cache.get("c") == "C"                      # hit (a, d, c)
    assert cache.put("e", "E", 1) == ["a"]
    assert cache.keys() == ["d", "c", "e"]
    assert cache.stats() == CacheStats(hits=2, misses=1, evictions=2, items=3, bytes=3)
    assert cache.stats().hit_rate == pytest.approx(2 / 3)


def test_lru_cyclic_scan_larger_than_the_cache_never_hits():
    """The streamer's access pattern: layers 0..L-1 again and again. With room for fewer than L, LRU never hits."""
    cache = LRUCache(max_items=3)
    for _ in range(4):
        for layer in range(5):
            if cache.get(layer) is None:
                cache.put(layer, layer, 10)
    assert cache.stats() == CacheStats(hits=0, misses=20, evictions=17, items=3, bytes=30)


def test_resident_subset_keeps_hitting_on_a_cyclic_scan_larger_than_the_cache():
    """12 layers through room for 8: the first 8 stay, so 8 of 12 lookups hit on every pass after the first."""
    cache = ResidentCache(max_items=8)
    hits = []
    for _ in range(3):
        before = cache.stats().hits
        for layer in range(12):
            if cache.get(layer) is None:
                cache.put(layer, layer, 10)
        hits.append(cache.stats().hits - before)
    assert hits == [0, 8, 8]
    assert cache.keys() == list(range(8))
    assert cache.stats() == CacheStats(hits=16, misses=20, evictions=0, items=8, bytes=80)


def test_resident_subset_admits_while_both_caps_hold_and_a_dropped_item_makes_room():
    cache = ResidentCache(max_items=None, max_bytes=100)
    assert cache.put("a", 1, 60) == [] and cache.put("b", 2, 50) == []   # 110 > 100: b is not stored
    assert cache.keys() == ["a"]
    cache.put("a", 3, 70)                                                # replacing a held key is allowed
    assert cache.get("a") == 3 and cache.stats().bytes == 70
    cache.discard("a")
    cache.put("b", 2, 50)
    assert cache.keys() == ["b"] and cache.stats().evictions == 0


def test_host_cache_policies_by_name():
    assert type(host_cache("resident", 2)) is ResidentCache and type(host_cache("lru", 2)) is LRUCache
    with pytest.raises(MtijaxError, match="unknown host cache policy 'mru'"):
        host_cache("mru", 2)


def test_lru_byte_cap_evicts_until_it_fits():
    cache = LRUCache(max_items=None, max_bytes=100)
    cache.put("a", 1, 40)
    cache.put("b", 2, 40)
    cache.get("a")                                    # b is now the least recently used
    assert cache.put("c", 3, 50) == ["b"]             # 40 + 40 + 50 > 100: dropping b is enough
    assert cache.keys() == ["a", "c"] and cache.stats().bytes == 90
    assert cache.put("d", 4, 95) == ["a", "c"]
    assert cache.stats() == CacheStats(hits=1, misses=0, evictions=3, items=1, bytes=95)


def test_lru_item_larger_than_the_cap_is_not_stored_and_evicts_nothing():
    cache = LRUCache(max_items=8, max_bytes=100)
    cache.put("a", 1, 60)
    assert cache.put("huge", 2, 101) == []
    assert cache.keys() == ["a"] and cache.stats().evictions == 0
    assert "huge" not in cache


def test_lru_of_size_zero_keeps_nothing():
    cache = LRUCache(max_items=0)
    cache.put("a", 1, 1)
    assert cache.get("a") is None
    assert cache.stats() == CacheStats(hits=0, misses=1, evictions=0, items=0, bytes=0)


def test_lru_replacing_a_key_is_not_an_eviction():
    cache = LRUCache(max_items=2)
    cache.put("a", 1, 5)
    cache.put("a", 2, 7)
    assert cache.get("a") == 2
    assert cache.stats() == CacheStats(hits=1, misses=0, evictions=0, items=1, bytes=7)


def test_lru_rejects_negative_caps():
    with pytest.raises(MtijaxError, match="max_items must be >= 0"):
        LRUCache(max_items=-1)


@pytest.mark.parametrize("text, size", [("4GB", 4_000_000_000), ("512MB", 512_000_000), ("1.5GiB", 1_610_612_736),
                                        ("1048576", 1_048_576), ("64 kib", 65_536), ("2TB", 2 * 10**12)])
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["4XB", "", "GB", "-1GB", "1.2.3MB"])
def test_parse_size_rejects_what_it_cannot_read(text):
    with pytest.raises(MtijaxError, match="cannot read"):
        parse_size(text)


def test_format_bytes():
    assert [format_bytes(n) for n in (512, 1_234, 4_000_000_000)] == ["512 B", "1.23 kB", "4.00 GB"]


# --- the original keyword rule (MTI-EVO resonance_loader.predict_active_layers, Gemma 3 12B: 48 layers) ------

ALWAYS_48 = [0, 1, 2, 15, 25, 35, 47]


@pytest.mark.parametrize("prompt, layers", [
    ("Hello there", ALWAYS_48),
    ("What is the boiling point of water?", list(range(0, 13)) + [15, 25, 35, 47]),
    ("Explain this CODE to me", [0, 1, 2] + list(range(13, 31)) + [35, 47]),
    ("Describe the sea", [0, 1, 2, 15, 25] + list(range(31, 48))),
    ("whatever you imagine, explain why", list(range(0, 48))),
])
def test_keyword_rule_reproduces_the_original_at_48_layers(prompt, layers):
    assert KeywordSectors().select(prompt, 48) == tuple(layers)


def test_keyword_rule_scales_its_ranges_to_other_depths():
    """18 layers: layer i of 48 becomes floor(18 i / 48); sectors [0, 4), [4, 11), [11, 18)."""
    rule = KeywordSectors()
    assert rule.select("hello", 18) == (0, 5, 9, 13, 17)
    assert rule.select("what", 18) == (0, 1, 2, 3, 5, 9, 13, 17)
    assert rule.select("a story", 18) == (0, 5, 9, 11, 12, 13, 14, 15, 16, 17)
    assert rule.sectors("Why? A poem.") == ("Bridge", "Ghost")


# --- background reads and the device pipeline ------------------------------------------------------------------

def test_fetcher_caches_in_request_order_whatever_order_reads_finish():
    """Slow reads of early keys finish last, yet the LRU order (and which key is evicted) follows the requests."""
    def read(key):
        time.sleep(0.05 * (3 - key))
        return key * 10

    fetcher = Fetcher(read, lambda key: 1, LRUCache(max_items=2), workers=3)
    pending = [fetcher.request(key) for key in range(3)]
    assert [fetcher.result(key, p) for key, p in enumerate(pending)] == [0, 10, 20]
    assert fetcher.cache.keys() == [1, 2]
    assert fetcher.cache.stats() == CacheStats(hits=0, misses=3, evictions=1, items=2, bytes=2)
    fetcher.close()


def test_fetcher_forgets_a_failed_read_and_raises_it_to_the_caller():
    calls = []

    def read(key):
        calls.append(key)
        if len(calls) == 1:
            raise MtijaxError("disk went away")
        return "ok"

    fetcher = Fetcher(read, lambda key: 1, LRUCache(max_items=4), workers=1)
    with pytest.raises(MtijaxError, match="disk went away"):
        fetcher.get("layer")
    assert fetcher.get("layer") == "ok"              # read again, not served from the cache
    assert calls == ["layer", "layer"]
    fetcher.close()


def test_fetcher_serves_a_pinned_key_without_a_lookup_or_a_read():
    reads = []
    fetcher = Fetcher(lambda key: reads.append(key) or "from disk", lambda key: 1, LRUCache(max_items=4), workers=0)
    assert fetcher.get("layer") == "from disk"
    fetcher.pin("layer", "injected")
    assert "layer" not in fetcher.cache
    assert fetcher.get("layer") == "injected" and fetcher.get("layer") == "injected"
    assert reads == ["layer"] and fetcher.cache.stats() == CacheStats(hits=0, misses=1, evictions=0, items=0, bytes=0)
    fetcher.close()


class _Recorder:
    """Fake transfers and computations that log their order and how many layers are on the 'device'."""

    def __init__(self):
        self.events: list[str] = []
        self.live: set[int] = set()
        self.most_live = 0
        self.lock = threading.Lock()

    def to_device(self, host):
        with self.lock:
            self.events.append(f"put {host}")
            self.live.add(host)
            self.most_live = max(self.most_live, len(self.live))
        return host

    def compute(self, layer, device_layer):
        assert layer == device_layer
        self.events.append(f"compute {layer}")
        self.live.discard(layer)  # freed once its compute is done (the pipeline waits for it before a new put)
        return np.zeros(())


@pytest.mark.parametrize("depth", [0, 1, 2])
def test_pipeline_issues_copies_depth_layers_ahead_and_bounds_live_layers(depth):
    recorder = _Recorder()
    fetcher = Fetcher(lambda layer: layer, lambda layer: 1, LRUCache(max_items=0), workers=depth)
    pipeline = LayerPipeline(fetcher, recorder.to_device, depth, lambda layer: None)
    pipeline.run(range(5), recorder.compute)
    expected = [f"put {l}" for l in range(min(depth + 1, 5))]
    for layer in range(5):
        expected.append(f"compute {layer}")
        if layer + depth + 1 < 5:
            expected.append(f"put {layer + depth + 1}")
    # the copy of layer l + depth is issued before layer l's compute is dispatched
    assert recorder.events == expected
    assert pipeline.max_live == recorder.most_live == depth + 1
    fetcher.close()


def test_pipeline_prefetches_the_next_pass_and_reuses_it():
    recorder = _Recorder()
    transfers = []
    fetcher = Fetcher(lambda layer: layer, lambda layer: 1, LRUCache(max_items=0), workers=1)
    pipeline = LayerPipeline(fetcher, recorder.to_device, 1, transfers.append)
    pipeline.run([0, 1, 2], recorder.compute, then=[0, 1, 2])
    assert recorder.events[-2:] == ["put 0", "compute 2"]     # the next pass's layer 0 is already on its way
    pipeline.run([0, 1, 2], recorder.compute)
    assert transfers == [0, 1, 2, 0, 1, 2]                    # ... and not copied a second time
    pipeline.run([1, 2], recorder.compute)
    assert transfers[-2:] == [1, 2]
