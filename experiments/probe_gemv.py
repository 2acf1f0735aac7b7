"""How fast are a decode step's matrix-vector products on this GPU, and what makes the small ones faster?

Gemma 3 12B at batch 1 reads its attention projections (q, k, v, o: 94 MB a
layer) at a far lower fraction of the copy bandwidth than its MLP (354 MB a
layer). This probe times, over 8 layers of distinct random bfloat16 weights in
the 12B shapes (so nothing stays in L2), one jitted function per variant:

* ``q,k,v separate``: three products, as the model computes them;
* ``qkv concatenated``: one product with ``[Wq | Wk | Wv]``;
* ``o``: the o-projection; ``mlp gate+up`` and ``mlp down``: the MLP's products;
* ``mlp gate+up, [out, in]`` and ``mlp down, [out, in]``: the same products with the weights stored transposed
  (``x @ w.T``), so that each output reduces along a contiguous row of the weights: whether XLA's
  matrix-vector kernels read that layout closer to the bandwidth (for a decode-time layout transform);

each as GB/s of weights read and as a fraction of the device's copy bandwidth.
``--xla-flags-variants`` reruns it in subprocesses under other ``XLA_FLAGS``.

    XLA_PYTHON_CLIENT_PREALLOCATE=false python experiments/probe_gemv.py --out experiments/results/probe_gemv_h100.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

LAYERS = 8
FLAG_VARIANTS = ("", "--xla_gpu_enable_triton_gemm=false", "--xla_gpu_enable_cublaslt=true")


def measure(size: str, batch: int) -> dict:
    import jax
    import jax.numpy as jnp

    import mtijax

    c = mtijax.preset(size)
    d, q, kv, f = c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size
    keys = iter(jax.random.split(jax.random.key(0), 128))

    def weights(*shape):
        return [0.02 * jax.random.normal(next(keys), shape, jnp.bfloat16) for _ in range(LAYERS)]

    x = jax.random.normal(next(keys), (batch, d), jnp.bfloat16)
    xq = jax.random.normal(next(keys), (batch, q), jnp.bfloat16)
    xf = jax.random.normal(next(keys), (batch, f), jnp.bfloat16)
    wq, wk, wv, wo = weights(d, q), weights(d, kv), weights(d, kv), weights(q, d)
    wqkv = [jnp.concatenate(parts, axis=1) for parts in zip(wq, wk, wv)]
    wgu, wdown = weights(d, 2 * f), weights(f, d)
    wgu_t, wdown_t = weights(2 * f, d), weights(d, f)
    variants = {
        "q,k,v separate": (lambda ws: [x @ w for triple in ws for w in triple], list(zip(wq, wk, wv))),
        "qkv concatenated": (lambda ws: [x @ w for w in ws], wqkv),
        "o": (lambda ws: [xq @ w for w in ws], wo),
        "mlp gate+up": (lambda ws: [x @ w for w in ws], wgu),
        "mlp down": (lambda ws: [xf @ w for w in ws], wdown),
        "mlp gate+up, [out, in]": (lambda ws: [x @ w.T for w in ws], wgu_t),
        "mlp down, [out, in]": (lambda ws: [xf @ w.T for w in ws], wdown_t),
    }
    out = {}
    for name, (fn, ws) in variants.items():
        jitted = jax.jit(fn)
        jax.block_until_ready(jitted(ws))
        best = float("inf")
        for _ in range(20):
            start = time.perf_counter()
            jax.block_until_ready(jitted(ws))
            best = min(best, time.perf_counter() - start)
        nbytes = sum(w.size * 2 for w in jax.tree.leaves(ws))
        out[name] = {"us": best * 1e6, "GBps": nbytes / best / 1e9}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="gemma3-12b")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--bandwidth-gbps", type=float, default=None, help="copy bandwidth; measured when omitted")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.size, args.batch)))
        return
    if args.bandwidth_gbps:
        bandwidth = args.bandwidth_gbps
    else:
        sys.path.insert(0, os.path.dirname(__file__))
        from bench_generate import copy_bandwidth
        bandwidth = copy_bandwidth() / 1e9
    report = {"size": args.size, "batch": args.batch, "layers": LAYERS, "copy_bandwidth_GBps": bandwidth, "runs": {}}
    for flags in FLAG_VARIANTS:
        env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + flags).strip())
        child = subprocess.run([sys.executable, __file__, "--child", "--size", args.size, "--batch", str(args.batch)],
                               env=env, capture_output=True, text=True)
        if child.returncode:
            report["runs"][flags or "default"] = {"error": child.stderr.strip().splitlines()[-1]}
            print(f"{flags or 'default'}: failed: {child.stderr.strip().splitlines()[-1]}", flush=True)
            continue
        result = json.loads(child.stdout.strip().splitlines()[-1])
        report["runs"][flags or "default"] = result
        for name, r in result.items():
            print(f"{flags or 'default':<40} {name:<24} {r['us']:9.1f} us {r['GBps']:7.0f} GB/s "
                  f"{100 * r['GBps'] / bandwidth:5.1f}% of copy", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
