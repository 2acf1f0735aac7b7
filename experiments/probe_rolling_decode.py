"""The rolling KV cache against the full layout at long contexts: steady decode time per step, and prefill time.

Gemma 3 shapes (random bfloat16), batch 1, greedy, no stop token; a prompt of ``context - 320`` tokens. For each
layout (``Ladder(rolling=...)``): the prefill (the run up to its first token, best of 2 after a warm-up), then
256 decode steps timed after the first 32 of a longer run (the step alone, which a whole-run difference
``total - prefill`` cannot resolve when the prefill is long and varies).

    python experiments/probe_rolling_decode.py gemma3-270m /tmp/probe_rolling_decode_270m.json
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import mtijax
from mtijax.engine.ladder import default_ladder
from mtijax.engine.sampling import Plain, Sampling
from mtijax.generate import start_run

from bench_generate import steady_step_s

STEPS, SKIP = 256, 32


def measure(config: mtijax.ModelConfig, params: dict, context: int, rolling: bool) -> dict[str, float]:
    prompt = np.random.default_rng(0).integers(3, config.vocab_size, (1, context - 320)).tolist()
    ladder = dataclasses.replace(default_ladder(), rolling=rolling)

    def first_token() -> tuple[float, object]:
        start = time.perf_counter()
        _, steps = start_run(config, params, prompt, 1, policy=Plain(Sampling()), stop_ids=(), ladder=ladder)
        state, _ = next(steps)
        jax.block_until_ready(state.token)
        return time.perf_counter() - start, state

    cold, state = first_token()
    prefill = min(first_token()[0] for _ in range(2))
    step_ms = 1e3 * steady_step_s(config, params, prompt, STEPS, SKIP, ladder)
    rolled = state.cache.ring is not None
    return {"context": context, "rolling": rolling, "ring_in_use": rolled, "first_call_s": cold,
            "prefill_s": prefill, "decode_ms_per_step": step_ms,
            "cache_bytes": int(sum(a.nbytes for a in jax.tree.leaves(state.cache)))}


def main() -> None:
    name, out = sys.argv[1], sys.argv[2]
    contexts = [int(c) for c in (sys.argv[3] if len(sys.argv) > 3 else "8192,32768").split(",")]
    config = mtijax.preset(name)
    params = mtijax.init_params(config, jax.random.key(0), jnp.bfloat16)
    result = {"model": name, "device": jax.devices()[0].device_kind, "jax": jax.__version__, "runs": []}
    for context in contexts:
        for rolling in (True, False):
            result["runs"].append(measure(config, params, context, rolling))
            print(json.dumps(result["runs"][-1]), flush=True)
            with open(out, "w") as f:
                json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
