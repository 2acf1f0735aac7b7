"""Expert dispatch for OLMoE: ``dense`` (every expert on every token), ``grouped`` (``lax.ragged_dot``),
``tiled`` (the grouped product as a Pallas kernel over one-expert row tiles; GPU only), ``gathered`` (each
token's chosen experts' weights gathered) and ``in_place`` (the same products, the experts read where they are
by the Pallas kernels of ``mtijax.models.olmoe.kernels``; GPU only).

Times one OLMoE-1B-7B layer (random bfloat16 weights, real shapes) on ``T``
tokens with each dispatch and prints them against dense, so that
``mtijax.models.olmoe.choose_dispatch`` can be set from a measurement on the
device it will run on (``gathered`` and ``in_place`` only while pairs < experts x 8: they run every pair's
products)::

    XLA_PYTHON_CLIENT_PREALLOCATE=false python experiments/bench_moe.py --out experiments/results/bench_moe_h100.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import jax
import jax.numpy as jnp

import mtijax
from mtijax.models import olmoe


def time_layer(config, layer, spec, x, positions, dispatch: str, repeats: int = 10) -> float:
    block = mtijax.family(config).block
    run = jax.jit(lambda layer, x: block(config, layer, spec, x, positions, dispatch=dispatch)[0])
    jax.block_until_ready(run(layer, x))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(run(layer, x))
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", default="1,8,64,512,4096")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    config = dataclasses.replace(mtijax.preset("olmoe-1b-7b"), num_layers=1)
    params = mtijax.init_params(config, jax.random.key(0), jnp.bfloat16)
    layer = jax.tree.map(lambda a: a[0], params["layers"])
    spec = jax.tree.map(lambda a: jnp.asarray(a[0]), mtijax.family(config).layer_spec(config))
    rows = []
    dispatches = ("dense", "grouped", "tiled", "gathered", "in_place")
    print(f"{'tokens':>7}" + "".join(f"{name + ' ms':>13}" for name in dispatches) + f"{'chosen':>10}")
    for tokens in (int(t) for t in args.tokens.split(",")):
        x = jax.random.normal(jax.random.key(1), (1, tokens, config.hidden_size), jnp.bfloat16)
        positions = jnp.arange(tokens, dtype=jnp.int32)[None]
        pairs = tokens * config.num_experts_per_tok
        row = {"tokens": tokens, "chosen": olmoe.choose_dispatch(config, tokens)}
        for name in dispatches:
            if name not in ("gathered", "in_place") or pairs <= 8 * config.num_experts:
                row[f"{name}_ms"] = time_layer(config, layer, spec, x, positions, name) * 1e3
        rows.append(row)
        print(f"{tokens:>7}" + "".join(f"{row.get(name + '_ms', float('nan')):>13.3f}" for name in dispatches)
              + f"{row['chosen']:>10}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__, "runs": rows}, f, indent=2)


if __name__ == "__main__":
    main()
