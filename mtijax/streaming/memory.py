"""Device-memory sizes: parsing ``4GB``-style caps, the streamer's budget, and the allocator's peak.

Units follow the usual convention: ``KB``/``MB``/``GB``/``TB`` are powers of
1000, ``KiB``/``MiB``/``GiB``/``TiB`` powers of 1024; a bare number is bytes.

A cap (``max_device_memory``) is held twice: before a call, against the bytes
the call is accounted to need (:class:`Budget`, :func:`check_budget`: on every
backend), and after every pass, against the device allocator's own peak
(:func:`check_allocator_peak`), where the backend reports one
(``device.memory_stats()["peak_bytes_in_use"]``: CUDA and other accelerators;
the CPU backend reports none, so there only the accounted check holds). The
allocator's peak is the process's since it started (JAX cannot reset it), so
it holds the cap for everything the process put on the device.
"""

from __future__ import annotations

import dataclasses
import re

import jax

from mtijax.errors import MtijaxError

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """``"4GB"`` -> 4_000_000_000, ``"1.5GiB"`` -> 1_610_612_736, ``"1024"`` -> 1024."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise MtijaxError(f"cannot read {text!r} as a size (examples: 4GB, 512MB, 1.5GiB, 1048576)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def format_bytes(n: float) -> str:
    """``1234567`` -> ``"1.23 MB"`` (powers of 1000)."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


@dataclasses.dataclass(frozen=True)
class Budget:
    """What a streamed call needs on the device, in bytes.

    Attributes:
      resident: embedding, final norm and output head.
      layer: one streamed layer (the core of an OLMoE layer when experts are streamed).
      live_layers: layers on the device at once (prefetch depth + 1).
      cache: the KV cache. work: the compiled step's temporaries, inputs and outputs.
      experts: OLMoE expert streaming: the expert slab and the device expert caches.
    """

    resident: int
    layer: int
    live_layers: int
    cache: int
    work: int
    experts: int = 0

    @property
    def total(self) -> int:
        return self.resident + self.live_layers * self.layer + self.cache + self.work + self.experts

    def describe(self) -> str:
        parts = [f"resident {format_bytes(self.resident)}", f"{self.live_layers} x layer {format_bytes(self.layer)}",
                 f"KV cache {format_bytes(self.cache)}", f"work {format_bytes(self.work)}"]
        if self.experts:
            parts.append(f"experts {format_bytes(self.experts)}")
        return " + ".join(parts)


def check_one_layer(cap: int | None, resident: int, layer: int) -> None:
    """Refuse a cap that cannot hold the resident parts and one layer (before anything is loaded)."""
    if cap is None:
        return
    if cap < layer:
        raise MtijaxError(f"max device memory {format_bytes(cap)} is less than one layer ({format_bytes(layer)}); "
                          "streaming needs room for at least one layer")
    if cap < resident + layer:
        raise MtijaxError(f"max device memory {format_bytes(cap)} cannot hold the resident embedding and head "
                          f"({format_bytes(resident)}) plus one layer ({format_bytes(layer)})")


def check_budget(cap: int | None, budget: Budget) -> None:
    """Refuse a call whose budget exceeds ``cap``, saying which prefetch depth would fit (before any work)."""
    if cap is None or budget.total <= cap:
        return
    fits = [k for k in range(budget.live_layers - 1, -1, -1)
            if dataclasses.replace(budget, live_layers=k + 1).total <= cap]
    hint = f"; --prefetch {fits[0]} would fit" if fits else "; use a smaller batch or fewer new tokens"
    raise MtijaxError(f"max device memory {format_bytes(cap)} is below what this call needs "
                      f"({format_bytes(budget.total)}: {budget.describe()}){hint}")


def allocator_peak(device: jax.Device) -> int | None:
    """The device allocator's peak bytes in use since the process started, where the backend reports it."""
    stats = device.memory_stats()
    return None if not stats else stats.get("peak_bytes_in_use")


def check_allocator_peak(cap: int | None, peak: int | None, accounted: int) -> None:
    """Refuse to go on once the allocator's ``peak`` (None: not reported) exceeded ``cap`` (one line naming both
    figures and the accounted bytes)."""
    if cap is None or peak is None or peak <= cap:
        return
    raise MtijaxError(f"the device allocator's peak {format_bytes(peak)} exceeded max device memory "
                      f"{format_bytes(cap)} (accounted {format_bytes(accounted)}); lower --prefetch or the batch")
