"""Where host copies of layers live, and how they reach the device.

On an accelerator that has it (``memory_kind="pinned_host"``), a layer read
from disk is copied once into page-locked host memory, from which the device
copies it by DMA without the runtime staging it again (measured on an H100
with JAX 0.11: 46-52 GB/s pinned -> device). Page-locking memory the first
time is slow (1-2.5 GB/s), so :meth:`HostMemory.reserve` touches the host
cache's worth of pinned memory once at start; XLA's pinned-host allocator is a
pool (a BFC allocator) that hands freed blocks out again, so every later layer
reuses those pages. ``experiments/bench_stream.py`` measures the first-touch
and the reused fill rates side by side.

On the CPU backend host and device memory are the same RAM: layers stay numpy
arrays and "moving one to the device" hands JAX the array. ``kind`` says which
is in use and ``reason`` why.

``"device"`` keeps the cached layers on the device itself: nothing is copied
per pass, so with a cache that holds every layer this is the resident model
run layer by layer through the same compiled step (the benchmark's
compute-only baseline), and the cache counts against the device memory cap.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import SingleDeviceSharding

from mtijax.errors import MtijaxError

HOST_MEMORY_CHOICES = ("auto", "pinned_host", "numpy", "device")


class HostMemory:
    """Placement of host layer copies for ``device``.

    Args:
      device: the device layers are streamed to.
      choice: ``"auto"`` (pinned host memory on an accelerator that has it,
        numpy on CPU), ``"pinned_host"`` (required; the CPU backend also
        offers it, which the tests use to run this path) or ``"numpy"``.
    """

    def __init__(self, device: jax.Device, choice: str = "auto"):
        if choice not in HOST_MEMORY_CHOICES:
            raise MtijaxError(f"unknown host memory {choice!r} ({', '.join(HOST_MEMORY_CHOICES)})")
        kinds = {m.kind for m in device.addressable_memories()}
        self.device = device
        self.device_sharding = SingleDeviceSharding(device, memory_kind=device.default_memory().kind)
        if choice == "pinned_host" and "pinned_host" not in kinds:
            raise MtijaxError(f"{device.platform} device has no pinned_host memory (it has {sorted(kinds)})")
        self._on_device = choice == "device"
        if self._on_device:
            self.kind = "device"
            self.reason = "cached layers kept on the device, nothing copied per pass"
            self._pinned = None
        elif choice == "pinned_host" or (choice == "auto" and device.platform != "cpu" and "pinned_host" in kinds):
            self.kind = "pinned_host"
            self.reason = "page-locked host memory, copied to the device by DMA"
            self._pinned: SingleDeviceSharding | None = SingleDeviceSharding(device, memory_kind="pinned_host")
        else:
            self.kind = "numpy"
            self.reason = ("the CPU backend's host and device memory are the same RAM: numpy arrays, no pinned staging"
                           if device.platform == "cpu" else "pageable numpy arrays (asked for)")
            self._pinned = None

    def place(self, tree: Any) -> Any:
        """Host numpy arrays -> their cached form (pinned copies, waited for; or the arrays themselves)."""
        if self._on_device:
            return jax.block_until_ready(jax.device_put(tree, self.device_sharding))
        if self._pinned is None:
            return tree
        return jax.block_until_ready(jax.device_put(tree, self._pinned))

    def to_device(self, tree: Any) -> Any:
        """Start copying a cached layer to the device; returns device arrays at once (asynchronous)."""
        return tree if self._on_device else jax.device_put(tree, self.device_sharding)

    def reserve(self, nbytes: int, chunk: int) -> None:
        """Touch ``nbytes`` of pinned memory once, in ``chunk``-sized blocks, then free it to the allocator's pool."""
        if self._pinned is None or nbytes <= 0:
            return
        blocks = [jax.device_put(np.zeros(max(chunk, 1), np.uint8), self._pinned) for _ in range(-(-nbytes // chunk))]
        jax.block_until_ready(blocks)
        del blocks
