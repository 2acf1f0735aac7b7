"""Which decode-step form compiles fast and runs fast: the measurement behind the engine's decode step.

For one model (random bfloat16 weights in the real shapes) and batch, each variant is compiled in a fresh
process (so XLA flags apply and nothing is cached) and timed over warm steps:

- ``unrolled``: the layer scan unrolled (straight-line code, one copy of the block per layer);
- ``rolled``: a rolled ``lax.scan`` over the stacked weights (one copy of the block);
- ``multistep_K``: ``K`` decode steps inside one jitted ``lax.scan``, the layers a Python loop over per-layer
  weights held unstacked (so no slice of a stacked weight sits inside the loop), ``K`` tokens per dispatch;

each under XLA flag sets: the defaults, ``--xla_gpu_autotune_level=0`` (no autotuning), ``=1`` (autotuning
without the buffer checks) and ``--xla_gpu_enable_triton_gemm=false`` (cuBLAS for every matmul).
``multistep_1`` is one step over unstacked weights: every layer's kernels are then the same program. Reported: compile seconds, milliseconds per token, and the
bandwidth bound (weights + live KV bytes per token over the measured copy bandwidth).

    XLA_PYTHON_CLIENT_PREALLOCATE=false python experiments/probe_compile_levers.py --model gemma3-12b \\
        --out experiments/results/probe_compile_levers_h200.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

FLAGS = {"default": "", "autotune0": "--xla_gpu_autotune_level=0", "autotune1": "--xla_gpu_autotune_level=1",
         "no_triton_gemm": "--xla_gpu_enable_triton_gemm=false"}
VARIANTS = ("unrolled", "rolled", "multistep_8")


def child(model: str, variant: str, batch: int, cache: int, steps: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import mtijax
    from mtijax.models import cache as kv
    from mtijax.models.decoder import forward_hidden, unembed
    from mtijax.models.fused import LAYOUT, fuse_qkv

    config = mtijax.preset(model)
    params = fuse_qkv(mtijax.init_params(config, jax.random.key(0), jnp.bfloat16))
    c = kv.init_cache(config.num_layers, batch, cache, config.num_kv_heads, config.head_dim, jnp.bfloat16)
    c = c._replace(positions=jnp.broadcast_to(jnp.arange(cache, dtype=jnp.int32), (batch, cache)) - cache // 2)
    token = jnp.ones((batch,), jnp.int32)
    pos = jnp.full((batch,), cache // 2, jnp.int32)

    def one(params, c, token, pos, slot, unroll):
        out = forward_hidden(config, params, token[:, None], pos[:, None], cache=c, write_index=slot,
                             layout=LAYOUT, unroll=unroll)
        return out.cache, jnp.argmax(unembed(config, params, out.hidden[:, -1]), -1).astype(jnp.int32)

    if variant.startswith("multistep"):
        k = int(variant.split("_")[1])
        arch = mtijax.family(config)
        spec = arch.layer_spec(config)
        specs = [jax.tree.map(lambda a: jnp.asarray(a[l]), spec) for l in range(config.num_layers)]
        layers = [jax.tree.map(lambda a: a[l], params["layers"]) for l in range(config.num_layers)]
        caches = [(c.k[l], c.v[l]) for l in range(config.num_layers)]
        rest = {n: v for n, v in params.items() if n != "layers"}

        def body(carry, _):
            caches, positions, token, pos, slot = carry
            x = arch.embed(config, rest, token[:, None])
            new = []
            for l, (ck, cv) in enumerate(caches):
                x, (nk, nv) = arch.block(config, layers_in[l], specs[l], x, pos[:, None], (ck, cv, positions), None,
                                         LAYOUT)
                zero = jnp.int32(0)
                new.append((jax.lax.dynamic_update_slice(ck, nk.astype(ck.dtype), (zero, slot, zero, zero)),
                            jax.lax.dynamic_update_slice(cv, nv.astype(cv.dtype), (zero, slot, zero, zero))))
            positions = jax.lax.dynamic_update_slice(positions, pos[:, None], (jnp.int32(0), slot))
            token = jnp.argmax(unembed(config, rest, x[:, -1]), -1).astype(jnp.int32)
            return (new, positions, token, pos + 1, slot + 1), token

        layers_in = layers

        def run(layers, rest_, caches, positions, token, pos, slot):
            nonlocal layers_in
            layers_in = layers
            carry, tokens = jax.lax.scan(body, (caches, positions, token, pos, slot), None, length=k)
            return carry[0], carry[2], tokens

        fn = jax.jit(run, donate_argnums=(2,))
        args = (layers, rest, caches, c.positions, token, pos, jnp.int32(cache // 2))
        per_call = k
    else:
        fn = jax.jit(lambda p, c, t, q, s: one(p, c, t, q, s, variant == "unrolled"), donate_argnums=(1,))
        args = (params, c, token, pos, jnp.int32(cache // 2))
        per_call = 1
    start = time.perf_counter()
    compiled = fn.lower(*args).compile()
    compile_s = time.perf_counter() - start
    out = compiled(*args)
    jax.block_until_ready(out)
    def again(args, out):
        return (args[0], args[1], out[0], *args[3:]) if variant.startswith("multistep") else (args[0], out[0], *args[2:])

    args = again(args, out)
    calls = max(1, steps // per_call)
    start = time.perf_counter()
    for _ in range(calls):
        out = compiled(*args)
        args = again(args, out)
    jax.block_until_ready(out)
    ms = (time.perf_counter() - start) / (calls * per_call) * 1e3
    weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    return {"compile_s": compile_s, "ms_per_token": ms, "weight_bytes": weight_bytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma3-12b")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--cache", type=int, default=1024, help="cache slots (half of them live)")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--flags", nargs="+", default=list(FLAGS))
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.model, args.child[0], int(args.child[1]), args.cache, args.steps)))
        return
    import torch

    n = 2**30 // 2
    src = torch.empty(n, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    best = 1e9
    for _ in range(10):
        torch.cuda.synchronize()
        t = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    bandwidth = 2 * n * 2 / best
    del src, dst
    results = {"model": args.model, "cache_slots": args.cache, "copy_bandwidth_bytes_per_s": bandwidth,
               "device": torch.cuda.get_device_name(), "runs": []}
    for flags in args.flags:
        for variant in args.variants:
            for batch in args.batch:
                env = dict(os.environ, XLA_FLAGS=FLAGS[flags], MTIJAX_COMPILATION_CACHE="0")
                proc = subprocess.run([sys.executable, __file__, "--model", args.model, "--cache", str(args.cache),
                                       "--steps", str(args.steps), "--child", variant, str(batch)],
                                      env=env, capture_output=True, text=True)
                try:
                    row = json.loads(proc.stdout.strip().splitlines()[-1])
                except (IndexError, json.JSONDecodeError):
                    row = {"error": proc.stderr.strip().splitlines()[-1:]}
                row.update(flags=flags, variant=variant, batch=batch)
                if "ms_per_token" in row:
                    row["bound_ms_per_token"] = row["weight_bytes"] / bandwidth * 1e3 / batch
                    row["fraction_of_bound"] = row["bound_ms_per_token"] / (row["ms_per_token"] / batch)
                results["runs"].append(row)
                print(json.dumps(row), flush=True)
                if args.out:
                    json.dump(results, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
