"""Whether OLMoE's in-place expert kernels compute, on this device, what the gathered dispatch computes.

Two checks, on random bfloat16 weights in a preset's shapes (default ``olmoe-1b-7b``):

* one layer's expert mixture (``experts_gathered`` against ``experts_gathered_in_place``) on ``--tokens`` random
  tokens: the largest absolute difference and the largest output, in float32;
* greedy generation through ``mtijax.generate`` (``--new-tokens`` after a ``--prompt-len`` prompt, two rows) with
  the kernels (the GPU default) and with ``MTIJAX_PALLAS=0`` (the gathered dispatch), the programs compiled
  afresh for each: whether the tokens are equal, and where the rows first differ.

Off GPUs the layer check runs the kernels interpreted, and both generations take the gathered dispatch (the
kernels are chosen on GPUs only), so there the script is only a smoke run (``--tiny``: tiny shapes)::

    XLA_PYTHON_CLIENT_PREALLOCATE=false python experiments/probe_moe_kernels.py --out /tmp/probe_moe_kernels.json
    python experiments/probe_moe_kernels.py --tiny

``--dtype float32`` runs both in float32 with every XLA matmul at full precision (``jax_default_matmul_precision``
``highest``; the default lets GPUs use TF32), so that the two dispatches differ only by their summation order and
greedy tokens should agree where bfloat16's one-ulp differences can tip a near tie of random weights.
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

import mtijax
from mtijax.models.olmoe import kernels, model as olmoe

TINY = mtijax.OlmoeConfig(vocab_size=512, hidden_size=64, intermediate_size=32, num_layers=2, num_heads=4,
                          num_kv_heads=2, num_experts=8, num_experts_per_tok=2)


def layer_difference(config: mtijax.OlmoeConfig, params: dict, tokens: int) -> dict:
    """Largest |gathered - in place| of layer 0's expert mixture on ``tokens`` random tokens, with the scale."""
    moe = jax.tree.map(lambda a: a[0], params["layers"]["moe"])
    x = jax.random.normal(jax.random.key(1), (tokens, config.hidden_size), jnp.bfloat16)
    experts, weights = olmoe.route(config, (x @ moe["router"]).astype(jnp.float32))
    weights = weights.astype(x.dtype)
    gathered = jax.jit(olmoe.experts_gathered)(moe, x, experts, weights).astype(jnp.float32)
    in_place = jax.jit(kernels.experts_gathered_in_place)(moe, x, experts, weights).astype(jnp.float32)
    return {"tokens": tokens, "max_abs_difference": float(jnp.max(jnp.abs(gathered - in_place))),
            "max_abs_output": float(jnp.max(jnp.abs(gathered)))}


def greedy(config: mtijax.OlmoeConfig, params: dict, prompts: list[list[int]], new_tokens: int,
           kernels_on: bool) -> np.ndarray:
    """Greedy tokens with the kernels on or off (``MTIJAX_PALLAS``), every program compiled afresh."""
    os.environ["MTIJAX_PALLAS"] = "1" if kernels_on else "0"
    jax.clear_caches()
    return mtijax.generate(config, params, prompts, new_tokens, stop_ids=()).tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="olmoe-1b-7b")
    parser.add_argument("--tokens", type=int, default=4, help="tokens of the layer check (pairs < experts)")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke run)")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                        help="weights' dtype (default bfloat16 on GPUs, float32 elsewhere)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    config = TINY if args.tiny else mtijax.preset(args.preset)
    dtype = jnp.dtype(args.dtype or ("bfloat16" if jax.default_backend() == "gpu" else "float32"))
    if dtype == jnp.float32:
        jax.config.update("jax_default_matmul_precision", "highest")
    params = mtijax.init_params(config, jax.random.key(0), dtype)
    result = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "preset": "tiny" if args.tiny
              else args.preset, "dtype": str(dtype),
              "matmul_precision": jax.config.jax_default_matmul_precision,
              "layer": layer_difference(config, params, args.tokens)}
    print("layer:", result["layer"], flush=True)
    prompts = np.random.default_rng(0).integers(3, config.vocab_size, (2, args.prompt_len)).tolist()
    on, off = (greedy(config, params, prompts, args.new_tokens, flag) for flag in (True, False))
    differ = [int(np.argmax(a != b)) if (a != b).any() else None for a, b in zip(on, off)]
    result["generation"] = {"prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                            "equal": bool((on == off).all()), "first_difference_per_row": differ,
                            "in_place": on.tolist(), "gathered": off.tolist()}
    print("greedy tokens equal:", result["generation"]["equal"], "first difference per row:", differ, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
