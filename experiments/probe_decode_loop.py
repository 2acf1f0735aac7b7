"""Why generation unrolls the layer scan and loops over decode steps in Python.

Times one greedy decode step (batch 1, bfloat16, random weights in the real
shapes, 256-slot cache) four ways and prints each against the bandwidth
bound (every weight read once per step, at the device's copy bandwidth):

* ``while``: N steps inside one ``lax.fori_loop``, layers a rolled ``lax.scan``;
* ``while+unroll``: the same with the layer scan unrolled;
* ``python``: a jitted, cache-donating step called N times from Python, rolled scan;
* ``python+unroll``: the same, unrolled (what ``mtijax.generate`` does).

    XLA_PYTHON_CLIENT_PREALLOCATE=false python experiments/probe_decode_loop.py --sizes gemma3-270m,gemma3-12b
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp

import mtijax

STEPS = 32


def step_fn(config, unroll):
    def step(params, i, state):
        cache, token = state
        out = mtijax.forward(config, params, token[:, None], jnp.full((1, 1), i, jnp.int32), cache=cache,
                             write_index=i, unroll=unroll)
        return out.cache, jnp.argmax(out.logits[:, -1], -1).astype(jnp.int32)
    return step


def best_of(fn, repeats=3):
    jax.block_until_ready(fn())
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - start)
    return best / STEPS


def probe(size: str, bandwidth: float) -> dict:
    config = mtijax.preset(size)
    params = mtijax.init_params(config, jax.random.key(0), jnp.bfloat16)
    fresh = lambda: (mtijax.init_cache(config.num_layers, 1, 256, config.num_kv_heads, config.head_dim,
                                       jnp.bfloat16), jnp.zeros((1,), jnp.int32))
    times = {}
    for unroll in (False, True):
        step = step_fn(config, True if unroll else 1)
        looped = jax.jit(lambda p, s: jax.lax.fori_loop(0, STEPS, lambda i, s: step(p, i, s), s))
        times["while+unroll" if unroll else "while"] = best_of(lambda: looped(params, fresh()))
        jitted = jax.jit(step, donate_argnums=(2,))

        def python_loop():
            state = fresh()
            for i in range(STEPS):
                state = jitted(params, i, state)
            return state
        times["python+unroll" if unroll else "python"] = best_of(python_loop)
    bound = 2 * config.num_params / bandwidth
    for name, seconds in times.items():
        print(f"{size:<12} {name:<14} {seconds * 1e3:8.2f} ms/step  {100 * bound / seconds:5.1f}% of bound", flush=True)
    return {"model": size, "ms_per_step": {k: v * 1e3 for k, v in times.items()}, "bound_ms": bound * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="gemma3-270m,gemma3-1b,gemma3-12b")
    parser.add_argument("--bandwidth-gbps", type=float, default=None,
                        help="copy bandwidth; measured with torch when omitted")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.bandwidth_gbps:
        bandwidth = args.bandwidth_gbps * 1e9
    else:
        from bench_generate import copy_bandwidth
        bandwidth = copy_bandwidth()
    report = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "bandwidth_GBps": bandwidth / 1e9,
              "runs": [probe(size, bandwidth) for size in args.sizes.split(",")]}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
