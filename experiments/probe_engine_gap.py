"""Where the engine's decode time goes on a GPU: ``mtijax.generate`` against its own step loop.

Gemma 3 shapes (random bfloat16), one 128-token prompt, greedy, no stop token. Per decode step, each the best
of 3 after a warm-up, as (129-token run - 1-token run) / 128:

- ``generate_ms_per_step``: ``mtijax.generate`` (the engine's steps, then its records gathered on the host);
- ``steps_ms_per_step``: the same steps iterated from ``mtijax.generate.start_run`` with nothing read back;
- ``loop_ms_per_step``: 256 steps of a long run, timed in the middle (the step alone).

The gap between the first two is what the host side of ``generate`` costs.

    python experiments/probe_engine_gap.py gemma3-270m /tmp/probe_engine_gap_270m.json
"""

from __future__ import annotations

import json
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp

import mtijax
from mtijax.engine.sampling import Plain, Sampling
from mtijax.generate import start_run

from bench_generate import steady_step_s

PROMPT = [list(range(1, 129))]


def best_of(run: Callable[[], object], repeats: int = 3) -> float:
    """Seconds of the fastest of ``repeats`` calls after one warm-up call."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def steps_only(config: mtijax.ModelConfig, params: dict, new_tokens: int) -> None:
    """The engine's decode steps for ``new_tokens`` tokens, nothing read back but the last token."""
    _, steps = start_run(config, params, PROMPT, new_tokens, policy=Plain(Sampling()), stop_ids=())
    state = None
    for state, _ in steps:
        pass
    jax.block_until_ready(state.token)


def main() -> None:
    name, out = sys.argv[1], sys.argv[2]
    config = mtijax.preset(name)
    params = mtijax.init_params(config, jax.random.key(0), jnp.bfloat16)
    result: dict[str, object] = {"model": name, "device": jax.devices()[0].device_kind}
    for n in (1, 129):
        result[f"generate_{n}"] = best_of(lambda: mtijax.generate(config, params, PROMPT, n, stop_ids=()))
        result[f"steps_{n}"] = best_of(lambda: steps_only(config, params, n))
    for kind in ("generate", "steps"):
        result[f"{kind}_ms_per_step"] = 1e3 * (result[f"{kind}_129"] - result[f"{kind}_1"]) / 128
    result["loop_ms_per_step"] = 1e3 * steady_step_s(config, params, PROMPT, 256, 10)
    print(json.dumps(result))
    with open(out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
