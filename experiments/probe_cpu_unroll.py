"""Rolled against unrolled layer scans in one decode step on the CPU backend (Gemma 3 270M shapes, float32).

Prints and writes, for each choice, the step's compile time and its steady time per token (20 timed steps
after 3 untimed ones, greedy, a 256-slot cache), beside the bound of reading the float32 weights once per
token at the host's measured read bandwidth. ``mtijax.engine.loop.layer_unroll`` picks the rolled scan on
the CPU from this.

    python experiments/probe_cpu_unroll.py --out experiments/results/probe_cpu_unroll.json
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from machine import describe
from mtijax.config import preset
from mtijax.models import cache as kv
from mtijax.models.decoder import forward_hidden, init_params, unembed


def read_bandwidth(nbytes: int = 1 << 30) -> float:
    """Bytes per second the host reads: a numpy float32 sum over 1 GiB (best of 3)."""
    src = np.ones(nbytes // 4, np.float32)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        src.sum()
        best = min(best, time.perf_counter() - start)
    return nbytes / best


def measure(config, params, unroll: bool | int) -> dict[str, float]:
    """Compile seconds and steady milliseconds per token of one greedy decode step."""
    cache = kv.init_cache(config.num_layers, 1, 256, config.num_kv_heads, config.head_dim)

    def step(params, cache, token, position, slot):
        out = forward_hidden(config, params, token[:, None], position[:, None], cache=cache, write_index=slot,
                             unroll=unroll)
        return jnp.argmax(unembed(config, params, out.hidden[:, -1]), -1).astype(jnp.int32), out.cache

    token = jnp.zeros(1, jnp.int32)
    start = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(1,)).lower(params, cache, token, token, jnp.int32(0)).compile()
    compile_s = time.perf_counter() - start
    for i in range(23):
        if i == 3:
            token.block_until_ready()
            start = time.perf_counter()
        token, cache = compiled(params, cache, token, jnp.full(1, i, jnp.int32), jnp.int32(i))
    token.block_until_ready()
    return {"compile_s": round(compile_s, 2), "ms_per_token": round((time.perf_counter() - start) / 20 * 1e3, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    config = preset("gemma3-270m")
    params = init_params(config, jax.random.key(0))
    weight_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(params))
    bandwidth = read_bandwidth()
    result = {**describe(), "model": "gemma3-270m", "dtype": "float32",
              "bound_ms_per_token": round(weight_bytes / bandwidth * 1e3, 1),
              "read_bandwidth_gb_s": round(bandwidth / 1e9, 1),
              "unrolled": measure(config, params, True), "rolled": measure(config, params, 1)}
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
