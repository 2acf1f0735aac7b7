"""Layer streaming (seeds 004 and 000): run models larger than the device, their layers read from disk as needed.

::

    from mtijax.streaming import StreamedModel

    with StreamedModel("path/to/hf-dir", "bfloat16", host_cache_layers=8, prefetch=2,
                       max_device_memory=parse_size("4GB")) as model:
        gen = model.generate([prompt_ids], 32)
        print(model.stats().lines())

The source may also be a params pytree in memory (``StreamedModel(params,
config=config)``); generation runs on the engine (``mtijax.engine``) with any
interventions (``model.generate(prompts, 32, interventions=...)``), and
injection writes into the host layers only (``model.inject(teacher, spec,
alpha)``).

Modules: ``store`` (the on-disk layer index and reader), ``params_store``
(params in memory as a store), ``cache`` (host caches: a fixed resident subset,
LRU), ``host`` (pinned host memory), ``prefetch`` (background reads, device
pipeline), ``step`` (the compiled layer step), ``runner`` (the streamed model:
forward, the engine's layer stack, injection), ``experts`` (OLMoE expert
streaming), ``selection`` (layers skipped as identity, and what it costs),
``memory`` (device-memory budget and the allocator's peak), ``synthetic``
(random checkpoints for benchmarks), ``command`` (the ``mtijax generate
--stream`` flags).
"""

from mtijax.streaming.cache import CacheStats, LRUCache, ResidentCache
from mtijax.streaming.memory import format_bytes, parse_size
from mtijax.streaming.params_store import ParamsStore
from mtijax.streaming.runner import StreamedModel
from mtijax.streaming.selection import KeywordSectors, LayerPredictor, SelectionResult, selection_study
from mtijax.streaming.stats import StreamStats
from mtijax.streaming.store import LayerStore
from mtijax.streaming.synthetic import write_random_checkpoint

__all__ = [
    "CacheStats", "LRUCache", "ResidentCache", "format_bytes", "parse_size", "ParamsStore", "StreamedModel",
    "KeywordSectors", "LayerPredictor", "SelectionResult", "selection_study", "StreamStats", "LayerStore", "write_random_checkpoint",
]
