"""Cost of activation patching, each figure against its peer measured in the same run.

1. **Persistent patch during generation.** ``generate_patched`` with the KV cache
   replaced (``last_min``) and, at every decode step, the source's value patched
   into ``attn_v`` at the late layer and ``resid_pre`` at the middle layer
   (``decode="last"``), against the same call with the KV replacement only.
   Decode time = time of an N-token generation - time of a 1-token one (best of
   ``--repeats``, the variants interleaved); the goal is a ratio <= 1.1. Plain ``mtijax.generate`` is timed
   too, for reference.
2. **Layer sweep.** The logits of ``attn_v`` patched at one layer, for every
   layer: one ``jax.vmap`` over the ``[L, L]`` layer masks (``mtijax.patching.sweep``)
   against a Python loop of ``L`` calls to one compiled patched forward. Compile
   times are reported separately; the timed runs are warm.

Random weights in the real shapes (no downloads). On the CPU here::

    python experiments/bench_patching.py --quick

On a GPU::

    XLA_PYTHON_CLIENT_PREALLOCATE=false python experiments/bench_patching.py \
        --out experiments/results/bench_patching_h100.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import mtijax
from mtijax.patching import KVPatch, Plan, SitePatch, capture, generate_patched, patch_spec, patched_forward, sweep
from mtijax.patching.forward import single_layers
from mtijax.patching.study import SEED_RESID_LAYER, SEED_V_LAYER, scale_layer


def wall_time(fn) -> float:
    """Wall time of one ``fn()`` (``fn`` blocks until its results exist)."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_generation(config, params, batch: int, prompt_len: int, new_tokens: int, repeats: int) -> dict:
    rng = np.random.default_rng(0)
    target = rng.integers(3, config.vocab_size, prompt_len).tolist()
    source = rng.integers(3, config.vocab_size, prompt_len + 5).tolist()
    v_layer = scale_layer(SEED_V_LAYER, config.num_layers)
    resid_layer = scale_layer(SEED_RESID_LAYER, config.num_layers)
    kv = KVPatch("last_min")
    plans = {"kv_only": Plan(kv=kv, first_token="refeed"),
             "persistent": Plan((SitePatch("resid_pre", (resid_layer,)), SitePatch("attn_v", (v_layer,))), kv,
                                "refeed")}
    seeds = list(range(batch))

    def patched(plan, n):
        return lambda: generate_patched(config, params, target, source, plan, seeds=seeds, max_new_tokens=n,
                                        stop_ids=())

    def plain(n):
        return lambda: np.asarray(mtijax.generate(config, params, [target] * batch, n, stop_ids=()).tokens)

    result = {"batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens, "v_layer": v_layer,
              "resid_layer": resid_layer}
    runs = {"plain_generate": plain, **{k: (lambda n, p=p: patched(p, n)) for k, p in plans.items()}}
    best = {(name, n): float("inf") for name in runs for n in (1, new_tokens)}
    for name, make in runs.items():  # warm-up: compile everything first
        make(1)()
        make(new_tokens)()
    for _ in range(repeats):  # interleaved, so a slow spell of a shared machine hits every variant alike
        for name, make in runs.items():
            for n in (1, new_tokens):
                best[name, n] = min(best[name, n], wall_time(make(n)))
    for name in runs:
        result[f"{name}_decode_ms_per_step"] = 1e3 * (best[name, new_tokens] - best[name, 1]) / (new_tokens - 1)
        result[f"{name}_first_token_s"] = best[name, 1]
    result["persistent_over_kv_only"] = result["persistent_decode_ms_per_step"] / result["kv_only_decode_ms_per_step"]
    result["persistent_over_plain_generate"] = (result["persistent_decode_ms_per_step"]
                                                / result["plain_generate_decode_ms_per_step"])
    return result


def bench_sweep(config, params, prompt_len: int, repeats: int) -> dict:
    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.integers(3, config.vocab_size, (1, prompt_len)))
    source = capture(config, params, jnp.asarray(rng.integers(3, config.vocab_size, (1, prompt_len))),
                     sites=("attn_v",))
    spec = patch_spec(config, "attn_v", [0], source)
    masks = jnp.asarray(single_layers(config.num_layers))
    specs = [spec.replace(layers=masks[l]) for l in range(config.num_layers)]

    def vmapped():
        return np.asarray(sweep(config, params, tokens, [spec.replace(layers=masks)]))

    def loop():
        return np.stack([np.asarray(patched_forward(config, params, tokens, [s]).logits[:, -1]) for s in specs])

    start = time.perf_counter()
    swept = vmapped()
    compile_vmap = time.perf_counter() - start
    start = time.perf_counter()
    looped = loop()
    compile_loop = time.perf_counter() - start
    agree = float(np.abs(swept - looped).max())
    t_vmap = t_loop = float("inf")
    for _ in range(repeats):  # interleaved
        t_vmap = min(t_vmap, wall_time(vmapped))
        t_loop = min(t_loop, wall_time(loop))
    return {"layers": config.num_layers, "prompt_len": prompt_len, "vmap_s": t_vmap, "loop_s": t_loop,
            "loop_over_vmap": t_loop / t_vmap, "first_call_vmap_s": compile_vmap, "first_call_loop_s": compile_loop,
            "max_abs_difference": agree}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="gemma3-270m,gemma3-1b", help="comma-separated presets")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="default: bfloat16 on a GPU, float32 on the CPU")
    parser.add_argument("--quick", action="store_true",
                        help="CPU setting: 270M, batch 1, 32-token prompt, 24 new tokens, 4 repeats")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no new measurement after this many seconds (those skipped are listed); "
                             "default 150, none with --quick")
    parser.add_argument("--out", default=None,
                        help="results JSON (default: experiments/results/bench_patching_<platform>.json)")
    args = parser.parse_args()
    budget = args.budget_s if args.budget_s is not None else float("inf") if args.quick else 150.0
    if args.quick:
        args.sizes, args.batches, args.prompt_len, args.new_tokens, args.repeats = "gemma3-270m", "1", 32, 24, 4
    device = jax.devices()[0]
    dtype = args.dtype or ("float32" if device.platform == "cpu" else "bfloat16")
    out = Path(args.out or Path(__file__).parent / "results" / f"bench_patching_{device.platform}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"device": str(device.device_kind), "platform": device.platform, "jax": jax.__version__,
              "host": platform.node(), "dtype": dtype, "quick": args.quick, "runs": [], "skipped": []}
    began = time.perf_counter()

    def record(run: dict | None, what: str) -> None:
        """Keep a measurement (or note it was skipped) and rewrite the JSON, so a cut-off run keeps its results."""
        if run is None:
            result["skipped"].append(what)
            print(f"skipped {what}: past the {budget:.0f} s budget", flush=True)
        else:
            result["runs"].append(run)
        result["seconds"] = round(time.perf_counter() - began, 1)
        out.write_text(json.dumps(result, indent=2))

    for size in args.sizes.split(","):
        config = mtijax.preset(size)
        params = mtijax.init_params(config, jax.random.key(0), jnp.dtype(dtype))
        batches = [int(b) for b in args.batches.split(",")]
        for what in [f"generation batch {batches[0]}", "sweep"] + [f"generation batch {b}" for b in batches[1:]]:
            if time.perf_counter() - began > budget:
                record(None, f"{size} {what}")
                continue
            if what == "sweep":
                sw = bench_sweep(config, params, args.prompt_len, args.repeats)
                record({"model": size, "kind": "sweep", **sw}, what)
                print(f"{size}: {sw['layers']}-layer sweep {sw['vmap_s'] * 1e3:.1f} ms vmapped, "
                      f"{sw['loop_s'] * 1e3:.1f} ms looped ({sw['loop_over_vmap']:.2f}x); first calls "
                      f"{sw['first_call_vmap_s']:.1f} s and {sw['first_call_loop_s']:.1f} s; max |difference| "
                      f"{sw['max_abs_difference']:.2e}", flush=True)
                continue
            batch = int(what.rsplit(" ", 1)[1])
            gen = bench_generation(config, params, batch, args.prompt_len, args.new_tokens, args.repeats)
            record({"model": size, "kind": "generation", **gen}, what)
            print(f"{size} batch {batch}: decode {gen['kv_only_decode_ms_per_step']:.2f} ms/step KV only, "
                  f"{gen['persistent_decode_ms_per_step']:.2f} with the persistent patch "
                  f"(ratio {gen['persistent_over_kv_only']:.3f}; goal <= 1.1); plain generate "
                  f"{gen['plain_generate_decode_ms_per_step']:.2f}", flush=True)
        del params
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
