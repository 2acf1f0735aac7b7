"""What a results file records about the machine it was measured on (``experiments/report.py`` names it)."""

from __future__ import annotations

import os
import platform

import jax


def describe() -> dict[str, str | int]:
    """``{"device", "platform", "jax", "python", "host_cores"}`` of the default JAX device and this host."""
    device = jax.devices()[0]
    return {"device": device.device_kind, "platform": device.platform, "jax": jax.__version__,
            "python": platform.python_version(), "host_cores": os.cpu_count()}
