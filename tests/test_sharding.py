"""Sharding on a mesh of 8 CPU devices: ``tests/sharded/mesh_checks.py``, run in one subprocess.

A process fixes its device count when JAX starts, so the checks run in a child started with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` and the rest of the suite keeps one device. The child
compiles with LLVM's cheap passes only (the checks compare sharded and unsharded runs compiled alike, and
most of their time is compiling tiny programs). What they check: sharded forward passes equal one device's
for Gemma 3 on (data, model) meshes (1, 2), (2, 4), (1, 8) and OLMoE on (expert, model) meshes (2, 1), (4, 2);
leaves carry the rules' partition specs (kv heads replicated where the mesh does not divide them); greedy
generation with the KV cache split over rows and kv heads gives the same tokens; a fusion train step on a
data-parallel batch gives the same loss, gradient norm and params; injection-alpha and patch-mask sweeps
split over ``data`` give the same logits; a sharded load (safetensors and Q8_0 GGUF) reads every stored
tensor in device-sized blocks only, once per distinct block, and gives the unsharded load's values.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FLAGS = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def test_sharded_runs_on_eight_cpu_devices_equal_one_device():
    env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {FLAGS}".strip(), "JAX_PLATFORMS": "cpu"}
    run = subprocess.run([sys.executable, "-m", "pytest", "tests/sharded/mesh_checks.py", "-q", "-x",
                          "-p", "no:cacheprovider"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout
