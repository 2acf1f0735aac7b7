"""Fusion layers' forward-time and device-memory overhead (seed 002), per preset and model size, on the GPU.

Random bfloat16 weights in Gemma 3 shapes (``mtijax.init_params(mtijax.preset(name), key, jnp.bfloat16)``),
random-init fusion layers of the ``minimal``, ``standard`` and ``full`` presets
(``mtijax.fusion.for_model``), a jitted forward to logits. The seed claims +5 / +15 / +25% forward time and
+2 / +5 / +8% memory.

* Time: in one process per size, the base forward, each preset's fused forward, and the preset's positions
  with identity transforms (what splitting the layer scan costs by itself) run interleaved ``--repeats``
  times; each run is timed to ``block_until_ready`` of its logits; medians.
* Memory: each (size, variant) runs in a process of its own, so the allocator's peak
  (``device.memory_stats()["peak_bytes_in_use"]``) is that forward's and nothing earlier's. The params are
  made by a jitted ``init_params`` (no temporaries beyond the params), and the peak right after that is
  recorded too: the forward's peak must exceed it to be a reading of the forward. Beside the allocator, every
  variant has XLA's own accounting of the compiled forward (arguments, outputs and temporaries from
  ``memory_analysis()``), which the CPU, with no allocator statistics, reports alone.

    python experiments/bench_fusion.py                                  # H200: 270M, 1B, 12B; batch 1 x 512
    python experiments/bench_fusion.py --sizes gemma3-270m --seq-len 16 --repeats 2 --out /tmp/f.json  # CPU smoke

Writes ``experiments/results/bench_fusion.json`` (``experiments/report.py`` renders its README table).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

# Allocate on demand, in this process and the memory processes it starts: XLA's default takes 75% of the
# GPU up front, which would leave the memory processes nothing, and make every peak the pool's size.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import mtijax  # noqa: E402
import mtijax.fusion as fusion_lib  # noqa: E402
from machine import describe  # noqa: E402
from seed_claims import FUSION_MEMORY_OVERHEAD, FUSION_TIME_OVERHEAD  # noqa: E402

SIZES = ("gemma3-270m", "gemma3-1b", "gemma3-12b")


def make_params(config: mtijax.ModelConfig) -> dict:
    """Random bfloat16 params of ``config``, made on the device by one jitted ``init_params``."""
    init = jax.jit(mtijax.init_params, static_argnums=(0, 2))
    return jax.block_until_ready(init(config, jax.random.key(0), jnp.bfloat16))


def tokens_of(config: mtijax.ModelConfig, batch: int, seq_len: int) -> jax.Array:
    return jax.random.randint(jax.random.key(1), (batch, seq_len), 3, config.vocab_size, jnp.int32)


def variant(config: mtijax.ModelConfig, name: str) -> tuple[Callable, tuple, dict[str, Any]]:
    """The jitted forward of variant ``name`` (``base``, a preset, or ``"<preset> identity"``), the arguments
    it takes after the params and tokens, and what describes it."""
    if name == "base":
        return jax.jit(lambda params, tokens: mtijax.forward(config, params, tokens).logits), (), {}
    preset = name.split()[0]
    fusion = fusion_lib.for_model(config, preset)
    info = {"positions": list(fusion.positions), "components": list(fusion.components),
            "fusion_parameters": fusion_lib.param_count(fusion, config.hidden_size)}
    if name.endswith("identity"):
        identity = {p: (lambda h, _: h) for p in fusion.positions}
        return jax.jit(lambda params, tokens: mtijax.forward(config, params, tokens, transforms=identity).logits), \
            (), info
    variables = fusion_lib.init_fusion(fusion, config, jax.random.key(2))
    fused = jax.jit(lambda params, tokens, variables: fusion_lib.fused_forward(config, params, fusion, variables,
                                                                              tokens).logits)
    return fused, (variables,), info


def variant_names() -> list[str]:
    return ["base", *fusion_lib.PRESETS, *(f"{p} identity" for p in fusion_lib.PRESETS)]


def time_size(size: str, batch: int, seq_len: int, repeats: int) -> dict[str, dict[str, Any]]:
    """Median seconds of every variant's forward on one set of params, the variants interleaved."""
    config = mtijax.preset(size)
    params, tokens = make_params(config), tokens_of(config, batch, seq_len)
    runs = {}
    for name in variant_names():
        fn, extra, info = variant(config, name)
        runs[name] = (lambda fn=fn, extra=extra: fn(params, tokens, *extra), info)
    for run, _ in runs.values():  # compile and warm up
        run().block_until_ready()
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, (run, _) in runs.items():
            start = time.perf_counter()
            run().block_until_ready()
            seconds[name].append(time.perf_counter() - start)
    out = {name: {**info, "seconds": statistics.median(seconds[name]), "all_seconds": seconds[name]}
           for name, (_, info) in runs.items()}
    del params, runs
    gc.collect()
    return out


def memory_of(size: str, name: str, batch: int, seq_len: int) -> dict[str, Any]:
    """Run in a fresh process: the device memory of variant ``name``'s forward (see the module docstring)."""
    config = mtijax.preset(size)
    device = jax.devices()[0]
    params = make_params(config)
    tokens = tokens_of(config, batch, seq_len)
    fn, extra, _ = variant(config, name)
    stats = device.memory_stats() or {}
    after_init = stats.get("peak_bytes_in_use")
    compiled = fn.lower(params, tokens, *extra).compile()
    analysis = compiled.memory_analysis()
    compiled(params, tokens, *extra).block_until_ready()
    stats = device.memory_stats() or {}
    param_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(params))
    extra_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(extra))
    accounted = None
    if analysis is not None:
        accounted = {"arguments": int(analysis.argument_size_in_bytes), "outputs": int(analysis.output_size_in_bytes),
                     "temporaries": int(analysis.temp_size_in_bytes)}
        accounted["total"] = sum(accounted.values())
    peak = stats.get("peak_bytes_in_use")
    return {"peak_bytes": peak, "peak_after_init_bytes": after_init,
            "peak_is_the_forwards": None if peak is None else peak > after_init,
            "param_bytes": param_bytes, "fusion_bytes": extra_bytes, "accounted": accounted}


def memory_in_subprocess(size: str, name: str, args: argparse.Namespace) -> dict[str, Any]:
    command = [sys.executable, __file__, "--memory-of", size, name, "--batch", str(args.batch),
               "--seq-len", str(args.seq_len)]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def overheads(timing: dict, memory: dict) -> dict[str, Any]:
    """One size's rows: the base, and per preset its time and memory against the base's."""
    base_time = timing["base"]["seconds"]
    base = {"seconds": base_time, **memory["base"]}

    def ratio(new: int | None, old: int | None) -> float | None:
        return None if new is None or not old else new / old - 1.0

    presets = {}
    for preset in fusion_lib.PRESETS:
        mem = memory[preset]
        presets[preset] = {
            **timing[preset], "time_overhead": timing[preset]["seconds"] / base_time - 1.0,
            "identity_seconds": timing[f"{preset} identity"]["seconds"],
            "identity_time_overhead": timing[f"{preset} identity"]["seconds"] / base_time - 1.0, **mem,
            "memory_overhead": ratio(mem["peak_bytes"], base["peak_bytes"]),
            "accounted_memory_overhead": ratio((mem["accounted"] or {}).get("total"),
                                               (base["accounted"] or {}).get("total")),
            "seed_time_overhead": FUSION_TIME_OVERHEAD[preset], "seed_memory_overhead": FUSION_MEMORY_OVERHEAD[preset]}
    return {"base": base, "presets": presets}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated presets (default {SIZES})")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=10, help="timed forwards per variant")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_fusion.json"))
    parser.add_argument("--memory-of", nargs=2, metavar=("SIZE", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_of:
        print(json.dumps(memory_of(*args.memory_of, args.batch, args.seq_len)))
        return

    results = {**describe(), "dtype": "bfloat16", "batch": args.batch, "seq_len": args.seq_len,
               "repeats": args.repeats, "runs": []}
    results["memory_source"] = ("the allocator's `peak_bytes_in_use`, one process per variant"
                                if jax.devices()[0].memory_stats() else "none: this device keeps no allocator statistics")
    for size in args.sizes.split(","):
        start = time.perf_counter()
        memory = {name: memory_in_subprocess(size, name, args) for name in ("base", *fusion_lib.PRESETS)}
        timing = time_size(size, args.batch, args.seq_len, args.repeats)
        row = {"size": size, **overheads(timing, memory), "seconds": time.perf_counter() - start}
        results["runs"].append(row)
        Path(args.out).write_text(json.dumps(results, indent=1))
        print(f"{size}: base {1e3 * row['base']['seconds']:.2f} ms, peak {row['base']['peak_bytes']}")
        for preset, p in row["presets"].items():
            mem = p["memory_overhead"] if p["memory_overhead"] is not None else p["accounted_memory_overhead"]
            print(f"  {preset}: {1e3 * p['seconds']:.2f} ms ({100 * p['time_overhead']:+.1f}%; identity "
                  f"{100 * p['identity_time_overhead']:+.1f}%; seed +{100 * p['seed_time_overhead']:.0f}%), memory "
                  f"{'n/a' if mem is None else f'{100 * mem:+.1f}%'} (seed +{100 * p['seed_memory_overhead']:.0f}%)")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
