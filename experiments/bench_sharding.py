"""Scale-out on ``jax.sharding``: tensor-, expert- and data-parallel throughput against one device.

Every model has random weights in the real shapes of a preset (``mtijax.init_params``, drawn straight onto
the mesh by the rules of ``mtijax.sharding``: the same values ``mtijax.shard`` of a one-device init gives),
bfloat16 on a GPU, float32 on a CPU. Sections:

- ``tensor_parallel``: Gemma 3 12B and 27B shapes on a ``(data=1, model=tp)`` mesh, tp = 1, 2, 4, 8 as the
  devices allow: ``decode_b1`` and ``decode_b8`` (the engine, ``mtijax.generate``'s loop: a 16-token prompt,
  then ``--decode-steps`` greedy steps timed after ``--warmup-steps``; tok/s = batch x steps / seconds) and
  ``prefill_2048`` (one jitted 2048-token forward pass that also returns its keys and values, logits at the
  last position; tok/s = 2048 / seconds, median of ``--reps``). tp = 1 is plain one-device generation (its
  fused q/k/v layout included); tp > 1 runs the sharded engine (``mtijax.sharding.generation``);
- ``expert_parallel``: OLMoE-1B-7B shapes on an ``(expert=ep,)`` mesh, the same three cases;
- ``data_parallel``: sweeps over a ``(data=n,)`` mesh (params replicated) at the same per-device work as one
  device: an injection alpha sweep (``mtijax.sharding.sweeps.injection_logits``, ``--per-device`` alphas per
  device), a patch-mask layer sweep (``patch_sweep``, single-layer masks) and a fusion train step (the
  ``standard`` preset, ``--per-device`` rows of 128 tokens per device); Gemma 3 1B shapes, prompts of 4 x 64
  tokens; throughput in prompt tokens per second summed over the variants (train: tokens per second).

Each row has ``tok_s``, ``ratio_to_1`` (against the same case on one device) and ``ratio_to_ideal``
(``ratio_to_1 / devices``). Decode rows also have ``hbm_fraction``: the time to read every parameter and the
KV cache's filled slots once per step at the summed bandwidth of the devices (``copy_GBps`` per device,
measured here as a jitted read-and-write of a 1 GiB array: 2 bytes moved per byte) over the measured step time.

A case that fails (out of memory, say) is recorded with its error and the run goes on. The NCCL environment
is inherited as it is. The JSON (``--out``) names the machine (``experiments/machine.py``) and is rewritten
after every case.

GPU (one H200: tp = 1 only; several GPUs: every tp they allow)::

    python experiments/bench_sharding.py --out experiments/results/bench_sharding_h200.json

CPU smoke test (tiny shapes, every path; ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` gives tp up
to 8)::

    python experiments/bench_sharding.py --tiny --out /tmp/bench_sharding_tiny.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import mtijax  # noqa: E402
from machine import describe  # noqa: E402
from mtijax.config import Gemma3Config, OlmoeConfig, preset  # noqa: E402
from mtijax.engine.ladder import Ladder  # noqa: E402
from mtijax.engine.sampling import Plain, Sampling  # noqa: E402
from mtijax.generate import start_run  # noqa: E402
from mtijax.models.decoder import forward_hidden, unembed  # noqa: E402
from mtijax.sharding import param_shardings, replicate  # noqa: E402

TINY_GEMMA = Gemma3Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=8,
                          num_kv_heads=8, head_dim=16, query_pre_attn_scalar=16, sliding_window=32,
                          layer_types=("sliding_attention",) * 3 + ("full_attention",))
TINY_OLMOE = OlmoeConfig(vocab_size=512, hidden_size=64, intermediate_size=32, num_layers=2, num_heads=8,
                         num_kv_heads=8, num_experts=8, num_experts_per_tok=2)


def block(tree: Any) -> Any:
    return jax.block_until_ready(tree)


def make_mesh(shape: tuple[int, ...], names: tuple[str, ...]) -> jax.sharding.Mesh:
    count = int(np.prod(shape))
    return jax.make_mesh(shape, names, devices=jax.devices()[:count])


def random_params(config, mesh, dtype) -> dict:
    """``mtijax.init_params`` computed straight into the rules' shardings on ``mesh``."""
    shardings = param_shardings(config, mesh)
    return block(jax.jit(lambda key: mtijax.init_params(config, key, dtype), out_shardings=shardings)(
        jax.random.key(0)))


def param_bytes(params: dict) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))


def copy_bandwidth(device: jax.Device, gib: float) -> float:
    """Bytes per second a jitted read-and-write of ``gib`` GiB moves on ``device``: 10 back to back, timed
    together, best of 3 (one call timed alone counted its dispatch: 2.85 TB/s on an H200 whose device copy
    measured 4.20)."""
    x = jax.device_put(jnp.zeros((int(gib * 2**30) // 4,), jnp.float32), device)
    bump = jax.jit(lambda a: a + 1, donate_argnums=0)
    x = block(bump(x))
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(10):
            x = bump(x)
        block(x)
        best = min(best, (time.perf_counter() - start) / 10)
    return 2 * x.nbytes / best


def median_time(fn: Callable[[], Any], reps: int) -> float:
    block(fn())
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        block(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def decode_time(config, params, batch: int, warmup: int, steps: int) -> tuple[float, int]:
    """Seconds per decode step (mean over ``steps`` after ``warmup``) at ``batch`` rows, and the cache length."""
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, config.vocab_size, 16).tolist() for _ in range(batch)]
    request, steps_iter = start_run(config, params, prompts, warmup + steps, policy=Plain(Sampling()), stop_ids=(),
                                    ladder=Ladder(chunk=16, max_context=256))
    state = None
    for _ in range(warmup):
        state, _ = next(steps_iter)
    block(state.token)
    start = time.perf_counter()
    for _ in range(steps):
        state, _ = next(steps_iter)
    block(state.token)
    return (time.perf_counter() - start) / steps, request.cache_length


def prefill_time(config, params, tokens: int, reps: int) -> float:
    """Median seconds of one ``tokens``-long forward pass returning its keys and values and the last logits."""
    fn = jax.jit(lambda p, t: (lambda out: (unembed(config, p, out.hidden[:, -1]), out.cache))(
        forward_hidden(config, p, t, keep_kv=True)))
    ids = jnp.asarray(np.random.default_rng(1).integers(3, config.vocab_size, (1, tokens)), jnp.int32)
    return median_time(lambda: fn(params, ids), reps)


def kv_bytes(config, batch: int, slots: int, itemsize: int) -> int:
    return 2 * config.num_layers * batch * slots * config.num_kv_heads * config.head_dim * itemsize


def scaled(rows: list[dict], key: tuple[str, ...], devices_field: str) -> None:
    """Fill ``ratio_to_1`` and ``ratio_to_ideal`` of each row against the row of the same ``key`` on one device."""
    base = {tuple(r[k] for k in key): r["tok_s"] for r in rows if r.get(devices_field) == 1 and "tok_s" in r}
    for row in rows:
        one = base.get(tuple(row[k] for k in key))
        if "tok_s" in row and one:
            row["ratio_to_1"] = row["tok_s"] / one
            row["ratio_to_ideal"] = row["ratio_to_1"] / row[devices_field]


class Report:
    def __init__(self, path: str | None, header: dict):
        self.path, self.data = path, {**header, "tensor_parallel": [], "expert_parallel": [], "data_parallel": []}

    def add(self, section: str, row: dict) -> None:
        self.data[section].append(row)
        print(json.dumps({"section": section, **row}), flush=True)
        self.save()

    def save(self) -> None:
        if self.path:
            Path(self.path).write_text(json.dumps(self.data, indent=2))


def attempt(report: Report, section: str, row: dict, fn: Callable[[], dict]) -> None:
    """Run one case; its figures, or its error, go into ``row``."""
    try:
        row.update(fn())
    except Exception as error:  # an OOM or a failed compile is a result, not the end of the run
        row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
    report.add(section, row)


def model_parallel(report: Report, section: str, name: str, config, axis: str, sizes: list[int], dtype,
                   args, bandwidth: float | None) -> None:
    """Decode at batch 1 and 8 and a prefill, for ``config`` on a ``(axis=n,)`` mesh for each n of ``sizes``."""
    field = "tp" if axis == "model" else "ep"
    for n in sizes:
        try:
            params = random_params(config, make_mesh((n,), (axis,)), dtype)
        except Exception as error:
            report.add(section, {"model": name, field: n, "case": "init",
                                 "error": f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"})
            continue
        model_cases(report, section, {"model": name, field: n}, config, params, n, dtype, args, bandwidth)
        params = None  # freed before the next mesh's params are drawn
        scaled(report.data[section], ("model", "case"), field)
        report.save()


def model_cases(report: Report, section: str, key: dict, config, params: dict, n: int, dtype, args,
                bandwidth: float | None) -> None:
    """The decode (batch 1 and 8) and prefill cases of one model on ``n`` devices."""
    weights = param_bytes(params)
    itemsize = jnp.dtype(dtype).itemsize
    for batch in (1, 8):
        def decode(batch=batch):
            step, _ = decode_time(config, params, batch, args.warmup_steps, args.decode_steps)
            row = {"tok_s": batch / step, "step_ms": 1e3 * step, "param_bytes": weights}
            if bandwidth:
                filled = 16 + args.warmup_steps + args.decode_steps // 2
                bound = (weights + kv_bytes(config, batch, filled, itemsize)) / (n * bandwidth)
                row["hbm_fraction"] = bound / step
            return row
        attempt(report, section, {**key, "case": f"decode_b{batch}"}, decode)
    attempt(report, section, {**key, "case": f"prefill_{args.prefill_tokens}"},
            lambda: {"tok_s": args.prefill_tokens / prefill_time(config, params, args.prefill_tokens, args.reps)})


def data_parallel(report: Report, config, sizes: list[int], dtype, args) -> None:
    """Injection and patch sweeps and a fusion train step at ``--per-device`` variants (rows) per device."""
    rng = np.random.default_rng(2)
    tokens = jnp.asarray(rng.integers(3, config.vocab_size, (4, args.sweep_tokens)), jnp.int32)
    for n in sizes:
        mesh = make_mesh((n,), ("data",))
        try:
            student = random_params(config, mesh, dtype)
        except Exception as error:
            report.add("data_parallel", {"case": "init", "dp": n, "error": f"{type(error).__name__}: {error}"[:300]})
            continue
        sweep_cases(report, config, student, tokens, mesh, n, rng, args)
        student = None  # freed before the next mesh's params are drawn
        scaled(report.data["data_parallel"], ("case",), "dp")
        report.save()


def sweep_cases(report: Report, config, student: dict, tokens: jax.Array, mesh, n: int, rng, args) -> None:
    """The injection sweep, patch sweep and fusion train step on ``n`` data-parallel devices."""
    from mtijax.fusion import TrainConfig, for_model, init_fusion, init_train_state, train_step
    from mtijax.injection import InjectionSpec
    from mtijax.patching import patch_spec
    from mtijax.sharding import shard_batch
    from mtijax.sharding.sweeps import injection_logits, patch_sweep

    per = args.per_device
    teacher = jax.tree.map(lambda x: x * 1.1, student)
    prompt_tokens = tokens.size
    spec = InjectionSpec(tensors=("attn/q_proj", "mlp/*"), layers=tuple(range(config.num_layers)))

    def injection():
        alphas = jnp.linspace(0.0, 1.0, per * n)
        return {"variants": per * n, "tok_s": per * n * prompt_tokens / median_time(
            lambda: injection_logits(config, spec, student, teacher, alphas, tokens, mesh=mesh), args.reps)}

    def patches():
        source = mtijax.capture(config, student, tokens[::-1], sites=("resid_post",))
        eye = np.eye(config.num_layers, dtype=np.float32)
        masks = jnp.asarray(eye[np.arange(per * n) % config.num_layers])
        specs = [patch_spec(config, "resid_post", [0], source, positions=("last", 8)).replace(layers=masks)]
        return {"variants": per * n, "tok_s": per * n * prompt_tokens / median_time(
            lambda: patch_sweep(config, student, tokens, specs, mesh=mesh), args.reps)}

    def fusion():
        fusion_config = for_model(config, "standard")
        train = TrainConfig(steps=10, batch_size=per * n, seq_len=128, warmup_steps=1)
        state = replicate(init_train_state(init_fusion(fusion_config, config, jax.random.key(0)), train), mesh)
        batch = shard_batch(jnp.asarray(rng.integers(3, config.vocab_size, (per * n, 128)), jnp.int32), mesh)
        return {"rows": per * n, "tok_s": per * n * 128 / median_time(
            lambda: train_step(config, fusion_config, train, state, student, batch)[1]["loss"], args.reps)}

    for case, fn in (("injection_sweep", injection), ("patch_sweep", patches), ("fusion_train_step", fusion)):
        attempt(report, "data_parallel", {"case": case, "dp": n, "per_device": per}, fn)


def powers_up_to(count: int, wanted: list[int]) -> list[int]:
    return [n for n in wanted if n <= count]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, few steps: a smoke test of every path")
    parser.add_argument("--sections", default="tensor_parallel,expert_parallel,data_parallel")
    parser.add_argument("--models", default="gemma3-12b,gemma3-27b", help="tensor-parallel presets")
    parser.add_argument("--sizes", default="1,2,4,8", help="device counts to try (those the machine has)")
    parser.add_argument("--decode-steps", type=int, default=64)
    parser.add_argument("--warmup-steps", type=int, default=8)
    parser.add_argument("--prefill-tokens", type=int, default=2048)
    parser.add_argument("--sweep-tokens", type=int, default=64)
    parser.add_argument("--per-device", type=int, default=4, help="sweep variants / train rows per device")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", default=None, help="JSON path, rewritten after every case")
    args = parser.parse_args()
    if args.tiny:
        args.decode_steps, args.warmup_steps, args.prefill_tokens, args.sweep_tokens, args.reps = 4, 2, 64, 16, 2
    gpu = jax.default_backend() == "gpu"
    dtype = jnp.bfloat16 if gpu else jnp.float32
    count = jax.device_count()
    sizes = powers_up_to(count, [int(s) for s in args.sizes.split(",")])
    bandwidth = copy_bandwidth(jax.devices()[0], 1.0 if gpu else 0.125)
    header = {"script": "experiments/bench_sharding.py", "argv": sys.argv[1:],
              "machine": {**describe(), "device_count": count}, "dtype": jnp.dtype(dtype).name,
              "copy_GBps": bandwidth / 1e9, "sizes": sizes}
    report = Report(args.out, header)
    report.save()
    print(f"{header['machine']['device']} x {count}, jax {jax.__version__}; copy {bandwidth / 1e9:.0f} GB/s per device",
          flush=True)
    sections = set(args.sections.split(","))
    if "tensor_parallel" in sections:
        models = {"tiny-gemma3": TINY_GEMMA} if args.tiny else {m: preset(m) for m in args.models.split(",")}
        for name, config in models.items():
            model_parallel(report, "tensor_parallel", name, config, "model", sizes, dtype, args, bandwidth)
    if "expert_parallel" in sections:
        name, config = ("tiny-olmoe", TINY_OLMOE) if args.tiny else ("olmoe-1b-7b", preset("olmoe-1b-7b"))
        model_parallel(report, "expert_parallel", name, config, "expert", sizes, dtype, args, bandwidth)
    if "data_parallel" in sections:
        config = TINY_GEMMA if args.tiny else preset("gemma3-1b")
        data_parallel(report, config, sorted({1, count}) if count in sizes else [1], dtype, args)
    report.save()


if __name__ == "__main__":
    main()
