"""Where a decode step's and a prefill's time goes on the GPU: kernels per step, GPU busy time, the top kernels.

For each variant (a model of random bfloat16 weights in a preset's shapes, greedy, no stop token), the engine is
warmed up, then a few calls run under ``jax.profiler.trace`` and the trace's device plane is read back
(``jax.profiler.ProfileData``): every kernel on the GPU's streams, with its duration. Per step:

* ``steady_ms`` (decode): milliseconds per step of 64 untraced steps (``bench_generate.steady_step_s``);
* ``untraced_ms`` (prefill): the best of two untraced calls, after one more;
* ``wall_ms``: the calls' wall time over the profiled window, per step (the tracer's own cost included);
* ``kernels``: kernels launched per step; ``busy_ms``: the sum of their durations per step;
* ``gap_ms``: ``wall - busy``, time the GPU waited (launch latency, host work, synchronisation);
* ``top``: the kernels that took the most time per step (name, launches and microseconds per step);
* ``first_call_s`` and ``first_call_host_events``: the variant's first call (its compiles), traced too, with the
  host's events summed by name (XLA's compiler passes among them);
* ``bound_ms`` (decode): the bytes a step must read (``bench_generate.decode_bytes``: the weights it uses and the
  KV entries it attends to) over the copy bandwidth measured at the start of the run (``copy_bandwidth_GBps``),
  and ``busy_over_bound``: the GPU time per step over that bound (1 would be a step that only moves its bytes).

Variants: decode at batch 1 and 8 on the default ladder (a 128-token prompt; ``r256``: the committed runs put it
on a 512-slot rung, which 7ac38a9 replaced by 8192 slots on accelerators), on a
rung pinned at 8k and 32k (``Ladder(max_context=...)``; the rolling layout) and at 8k in the full layout, with the
decode layer scan unrolled (the default on GPUs) and rolled; and a 2k-token prefill (the call up to its first
token) with 256- and 2048-token chunks, its layer scan rolled (the default) and unrolled; and decode with every
layer's weights in buffers of their own (``split``: ``mtijax.engine.loop.split_params``). ``XLA_FLAGS`` is
recorded: run the script again under other flags to compare them.

    python experiments/probe_step_profile.py gemma3-270m /tmp/profile.json [variant,variant,...]
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import json
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import mtijax
from mtijax.engine import loop, settle_compiles
from mtijax.engine.ladder import Ladder, default_ladder
from mtijax.engine.sampling import Plain, Sampling
from mtijax.generate import start_run

from bench_generate import copy_bandwidth, decode_bytes, model_config, steady_step_s

STEPS, SKIP, TIMED = 16, 8, 64

VARIANTS = {
    "decode_b1_r256": dict(batch=1, prompt=128),
    "decode_b1_r256_rolled": dict(batch=1, prompt=128, unroll=1),
    "decode_b1_r8k_ring": dict(batch=1, prompt=128, max_context=8192),
    "decode_b1_r32k_ring": dict(batch=1, prompt=128, max_context=32768),
    "decode_b1_r8k_full": dict(batch=1, prompt=128, max_context=8192, rolling=False),
    "decode_b8_r256": dict(batch=8, prompt=128),
    "decode_b8_r8k_ring": dict(batch=8, prompt=128, max_context=8192),
    "prefill_2k_chunk256": dict(batch=1, prompt=2048, prefill=True),
    "prefill_2k_chunk2048": dict(batch=1, prompt=2048, prefill=True, chunk=2048),
    "prefill_2k_chunk256_unrolled": dict(batch=1, prompt=2048, prefill=True, prefill_unroll=True),
    "prefill_2k_chunk2048_unrolled": dict(batch=1, prompt=2048, prefill=True, chunk=2048, prefill_unroll=True),
    "decode_b8_r256_rolled": dict(batch=8, prompt=128, unroll=1),
    "decode_b1_r256_split": dict(batch=1, prompt=128, split=True),
    "decode_b8_r256_split": dict(batch=8, prompt=128, split=True),
    "decode_b1_r8k_ring_split": dict(batch=1, prompt=128, max_context=8192, split=True),
    "decode_b1_r8k_ring_rolled": dict(batch=1, prompt=128, max_context=8192, unroll=1),
}


def planes(trace_dir: str) -> list:
    """The planes (one per device, and the host's) of the trace that ``jax.profiler.trace`` wrote in ``trace_dir``."""
    path = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)[0]
    return list(jax.profiler.ProfileData.from_file(path).planes)


def device_kernels(trace_dir: str) -> list[tuple[str, int, int]]:
    """``(name, start_ns, duration_ns)`` of every kernel on the GPU streams of the trace in ``trace_dir``."""
    kernels = []
    for plane in planes(trace_dir):
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            if "Stream" not in line.name:
                continue
            kernels += [(e.name, int(e.start_ns), int(e.duration_ns)) for e in line.events]
    return kernels


def host_events(trace_dir: str) -> list[dict]:
    """The host-side events of the trace in ``trace_dir`` (XLA's compiler passes among them), summed by name:
    the 40 longest (nested events each count their own whole duration)."""
    total: dict[str, list[int]] = collections.defaultdict(list)
    for plane in planes(trace_dir):
        if plane.name.startswith("/host"):
            for line in plane.lines:
                for e in line.events:
                    if not e.name.startswith("$"):
                        total[e.name].append(int(e.duration_ns))
    top = sorted(total.items(), key=lambda kv: -sum(kv[1]))[:40]
    return [{"name": n[:160], "count": len(d), "s": sum(d) / 1e9} for n, d in top]


def summarise(kernels: list[tuple[str, int, int]], steps: int, wall_s: float) -> dict:
    by_name: dict[str, list[int]] = collections.defaultdict(list)
    for name, _, duration in kernels:
        by_name[name].append(duration)
    busy = sum(d for _, _, d in kernels) / 1e6 / steps
    top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:20]
    return {"steps": steps, "wall_ms": 1e3 * wall_s / steps, "kernels": len(kernels) / steps, "busy_ms": busy,
            "gap_ms": 1e3 * wall_s / steps - busy,
            "top": [{"name": n[:120], "launches": len(d) / steps, "us": sum(d) / 1e3 / steps} for n, d in top]}


def ladder_for(spec: dict) -> Ladder:
    ladder = default_ladder()
    return dataclasses.replace(ladder, chunk=spec.get("chunk", ladder.chunk), max_context=spec.get("max_context"),
                               rolling=spec.get("rolling", True))


def profile(config: mtijax.ModelConfig, params: dict, spec: dict) -> dict:
    rng = np.random.default_rng(0)
    prompts = rng.integers(3, config.vocab_size, (spec["batch"], spec["prompt"])).tolist()
    ladder = ladder_for(spec)
    unroll = spec.get("unroll", True)
    jax.clear_caches()  # the step's unroll is no jit argument: compile each variant afresh
    unrolls = {"decode": unroll, "prefill": spec.get("prefill_unroll", 1)}
    original, original_split = loop.layer_unroll, loop.split_layers
    loop.layer_unroll = unrolls.get
    loop.split_layers = lambda _: spec.get("split", False)
    try:
        def steps(n: int):
            return start_run(config, params, prompts, n, policy=Plain(Sampling()), stop_ids=(), ladder=ladder)[1]

        compile_dir = tempfile.mkdtemp()
        with jax.profiler.trace(compile_dir):
            t0 = time.perf_counter()
            state, _ = next(steps(1))
            jax.block_until_ready(state.token)
            first_s = time.perf_counter() - t0
            settle_compiles()  # tiered compiles: every profiled call runs the tuned builds
        trace_dir = tempfile.mkdtemp()
        if spec.get("prefill"):
            untraced = []
            for _ in range(3):
                t0 = time.perf_counter()
                jax.block_until_ready(next(steps(1))[0].token)
                untraced.append(time.perf_counter() - t0)
            with jax.profiler.trace(trace_dir):
                t0 = time.perf_counter()
                jax.block_until_ready(next(steps(1))[0].token)
                wall = time.perf_counter() - t0
            out = summarise(device_kernels(trace_dir), 1, wall)
            out["untraced_ms"] = 1e3 * min(untraced[1:])
        else:
            steady_ms = 1e3 * steady_step_s(config, params, prompts, TIMED, SKIP, ladder)
            run = steps(SKIP + STEPS)
            for _ in range(SKIP):
                state, _ = next(run)
            jax.block_until_ready(state.token)
            with jax.profiler.trace(trace_dir):
                t0 = time.perf_counter()
                for _ in range(STEPS):
                    state, _ = next(run)
                jax.block_until_ready(state.token)
                wall = time.perf_counter() - t0
            out = summarise(device_kernels(trace_dir), STEPS, wall)
            out["steady_ms"] = steady_ms
        out["first_call_s"] = first_s
        out["first_call_host_events"] = host_events(compile_dir)
        return out
    finally:
        loop.layer_unroll, loop.split_layers = original, original_split


def main() -> None:
    name, path = sys.argv[1], sys.argv[2]
    chosen = sys.argv[3].split(",") if len(sys.argv) > 3 else list(VARIANTS)
    config = model_config(name)
    bandwidth = copy_bandwidth("cuda", 1.0)
    params = mtijax.init_params(config, jax.random.key(0), jnp.bfloat16)
    result = {"model": name, "device": jax.devices()[0].device_kind, "jax": jax.__version__,
              "xla_flags": os.environ.get("XLA_FLAGS"), "copy_bandwidth_GBps": bandwidth / 1e9, "variants": {}}
    for label in chosen:
        spec = VARIANTS[label]
        result["variants"][label] = {"spec": spec, **profile(config, params, spec)}
        row = result["variants"][label]
        if not spec.get("prefill"):
            row["bound_ms"] = 1e3 * decode_bytes(config, spec["batch"], spec["prompt"], 2) / bandwidth
            row["busy_over_bound"] = row["busy_ms"] / row["bound_ms"]
        shown = ("first_call_s", "steady_ms", "untraced_ms", "wall_ms", "kernels", "busy_ms", "gap_ms", "bound_ms", "busy_over_bound")
        print(label, {k: round(row[k], 3) for k in shown if k in row}, flush=True)
        for top in row["top"][:6]:
            print("   ", round(top["us"], 1), "us", top["launches"], top["name"][:90], flush=True)
        with open(path, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
