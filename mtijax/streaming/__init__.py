"""Layer streaming (seeds 004 and 000): run models larger than the device, their layers read from disk as needed.

::

    from mtijax.streaming import StreamedModel

    with StreamedModel("path/to/hf-dir", "bfloat16", host_cache_layers=8, prefetch=2,
                       max_device_memory=parse_size("4GB")) as model:
        gen = model.generate([prompt_ids], 32)
        print(model.stats().lines())

Modules: ``store`` (the on-disk layer index and reader), ``cache`` (host LRU),
``host`` (pinned host memory), ``prefetch`` (background reads, device
pipeline), ``runner`` (prefill and generation), ``experts`` (OLMoE expert
streaming), ``selection`` (layers skipped as identity, and what it costs),
``memory`` (device-memory budget), ``synthetic`` (random checkpoints for
benchmarks), ``command`` (the ``mtijax generate --stream`` flags).
"""

from mtijax.streaming.cache import CacheStats, LRUCache
from mtijax.streaming.memory import format_bytes, parse_size
from mtijax.streaming.runner import StreamedModel
from mtijax.streaming.selection import KeywordSectors, LayerPredictor, SelectionResult, selection_study
from mtijax.streaming.stats import StreamStats
from mtijax.streaming.store import LayerStore
from mtijax.streaming.synthetic import write_random_checkpoint

__all__ = [
    "CacheStats", "LRUCache", "format_bytes", "parse_size", "StreamedModel", "KeywordSectors", "LayerPredictor",
    "SelectionResult", "selection_study", "StreamStats", "LayerStore", "write_random_checkpoint",
]
