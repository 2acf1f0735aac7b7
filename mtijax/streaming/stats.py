"""What a streamed model did: passes, bytes moved, cache behaviour, device memory."""

from __future__ import annotations

import dataclasses
from typing import Any

from mtijax.streaming.cache import CacheStats
from mtijax.streaming.memory import format_bytes


@dataclasses.dataclass(frozen=True)
class StreamStats:
    """Counters of a :class:`~mtijax.streaming.StreamedModel` since it was made (or since ``reset_stats``).

    Attributes:
      passes: forward steps over the layers (a prefill, or one decode step).
      layers_run, layers_skipped: layer computations done, and skipped as identity by a layer selection.
      bytes_to_device: host -> device bytes of layers (OLMoE expert streaming: of layer cores).
      bytes_read: bytes read from the checkpoint files into host memory.
      seconds: wall time inside the passes (each pass ends by waiting for its result).
      host_cache: the layer cache's counters (``host_cache.hit_rate``: hits per lookup).
      host_cache_policy: the host caches' policy (``resident`` or ``lru``; see ``mtijax.streaming.cache``).
      pinned_layers: layers pinned in host memory by ``inject`` or ``override_layer`` (served without a lookup).
      max_live_layers: the most layers on the device at once (at most prefetch + 1).
      accounted_peak_bytes: resident + KV cache + live layers + the compiled step's work (+ experts), at its largest.
      allocator_peak_bytes: the device allocator's own peak since the process started (None on CPU).
      host_memory: where host copies live (``pinned_host`` or ``numpy``) and why.
      experts_moved, expert_bytes_to_device, expert_device_hits: OLMoE expert streaming (else 0).
      expert_host_cache: the host expert cache's counters (None unless experts are streamed).
      tokens: tokens processed by the passes (batch x positions, padding included).
    """

    passes: int
    layers_run: int
    layers_skipped: int
    bytes_to_device: int
    bytes_read: int
    seconds: float
    host_cache: CacheStats
    max_live_layers: int
    accounted_peak_bytes: int
    allocator_peak_bytes: int | None
    host_memory: str
    tokens: int = 0
    host_cache_policy: str = "resident"
    pinned_layers: int = 0
    experts_moved: int = 0
    expert_bytes_to_device: int = 0
    expert_device_hits: int = 0
    expert_host_cache: CacheStats | None = None

    @property
    def total_bytes_to_device(self) -> int:
        return self.bytes_to_device + self.expert_bytes_to_device

    @property
    def effective_gbps(self) -> float:
        """Streamed bytes (layers and experts) per second of pass time, in GB/s."""
        return self.total_bytes_to_device / self.seconds / 1e9 if self.seconds else 0.0

    @property
    def peak_device_bytes(self) -> int:
        """The allocator's peak where the backend reports one, else the accounted peak."""
        return self.allocator_peak_bytes if self.allocator_peak_bytes is not None else self.accounted_peak_bytes

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["host_cache"]["hit_rate"] = self.host_cache.hit_rate
        if self.expert_host_cache is not None:
            out["expert_host_cache"]["hit_rate"] = self.expert_host_cache.hit_rate
        out.update(effective_gbps=self.effective_gbps, peak_device_bytes=self.peak_device_bytes,
                   total_bytes_to_device=self.total_bytes_to_device)
        return out

    def lines(self) -> list[str]:
        """A short human-readable report (the CLI prints it)."""
        how = "allocator" if self.allocator_peak_bytes is not None else "accounted"
        c = self.host_cache
        out = [f"peak device memory {format_bytes(self.peak_device_bytes)} ({how}; "
               f"at most {self.max_live_layers} layer(s) on the device)",
               f"streamed {format_bytes(self.total_bytes_to_device)} to the device in {self.seconds:.2f} s "
               f"({self.effective_gbps:.2f} GB/s effective), read {format_bytes(self.bytes_read)} from disk",
               f"host cache ({self.host_cache_policy}) hit rate {100 * c.hit_rate:.1f}% ({c.hits} hits, "
               f"{c.misses} misses, {c.evictions} evictions); host memory: {self.host_memory}"]
        if self.expert_host_cache is not None:
            e = self.expert_host_cache
            out.append(f"experts: {self.experts_moved} moved ({format_bytes(self.expert_bytes_to_device)}), "
                       f"{self.expert_device_hits} device-cache hits, host expert cache hit rate "
                       f"{100 * e.hit_rate:.1f}%")
        if self.pinned_layers:
            out.append(f"layers pinned in host memory (injected or overridden): {self.pinned_layers}")
        if self.layers_skipped:
            out.append(f"layers skipped as identity: {self.layers_skipped} of {self.layers_run + self.layers_skipped}")
        return out
