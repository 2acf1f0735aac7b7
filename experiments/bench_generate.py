"""Prefill and decode throughput of mtijax against two transformers peers on the same device, with physical bounds.

Every model has random weights in the real shapes of a preset (``mtijax.init_params`` for mtijax, the
transformers class built from the same shapes for the peers), bfloat16 on a GPU. Generation is greedy and never
stops early. The rows, in the order they run (the most important first, so a ``--budget-s`` cut keeps them):

* ``decode``, batch 1 and 8 (``--batches``), prompt ``--prompt-len``, ``--new-tokens`` new;
* ``prefill`` of ``--prefill-len`` tokens (default 2k) at batch 1;
* ``long`` (Gemma only): batch 1, ``--long-contexts`` tokens of context at the end (default 8k and 32k: the prompt
  and ``--long-new-tokens`` new). Before each, the free device memory is checked against the bytes the row adds (mtijax's KV cache, rolling on
  sliding layers, and the peers' caches, taken as full length; prefill transients are not estimated); a row that does not
  fit is skipped with the figures in its reason, and an out-of-memory error is recorded as the row's result. A long
  row also runs mtijax with every layer's cache at full length (``mtijax_full_layout``: ``Ladder(rolling=False)``)
  and records both layouts' cache bytes (``kv_cache_bytes``).

Figures, for mtijax and each peer:

* ``prefill_tok_s``: batch x prompt tokens / time of a 1-token generation;
* ``decode_tok_s``: batch x (N - 1) / (time of an N-token generation - that prefill time);
* ``warmup_s``: the first call's time minus the best later one, both lengths summed (mtijax's compiles, its
  tuned builds included: each mtijax call ends with ``mtijax.engine.settle_compiles``; the static peer's
  ``torch.compile``); every figure above is the best of ``--repeats`` calls after that first one;
* mtijax also: ``stream_decode_tok_s``, the same through ``mtijax.generate_stream`` (the host reads every token),
  and ``steady_decode_tok_s``: batch / the engine's seconds per step over the second half of a run, prefill excluded.

Peers (transformers' own recipes for version 5):

* ``transformers_eager``: ``model.generate`` with its default dynamic cache, nothing compiled;
* ``transformers_static``: ``model.generate(..., cache_implementation="static")``, which makes generate compile
  the decode forward with ``torch.compile`` (its default ``CompileConfig``: mode ``reduce-overhead``, i.e. CUDA
  graphs). Its prefill runs eager, so for the prefill row a third peer is measured:
* ``transformers_compiled``: ``torch.compile(model)`` called on the whole prompt (``use_cache=False``,
  ``logits_to_keep=1``: it writes no KV cache, which favours it slightly).

``TORCHINDUCTOR_CACHE_DIR`` is a fresh temporary directory unless set, so the static peer's warm-up is a cold
compile. mtijax's persistent compilation cache is what the environment makes it (``MTIJAX_CACHE``,
``MTIJAX_COMPILATION_CACHE``, recorded in the JSON); ``experiments/bench_compile.py`` measures compile costs.

Bounds, measured in the same run:

* decode: a step must read every weight it uses (the embedding too, for the logits; for OLMoE only the experts
  the batch is expected to route to) and the KV entries it attends to: ``min(context, sliding_window)`` slots on
  sliding layers, the whole context on global layers, averaged over the steps of the generation. ``bound tok/s =
  batch x steps / (bytes / copy bandwidth)``, the copy bandwidth a device-to-device copy (read + write);
* prefill: its matrix FLOPs (2 per weight per token, the active experts for OLMoE, causal attention within the
  window on sliding layers, the logits of the last token) at the rate of a large bf16 matmul measured in the run.

``fraction_of_bound`` = mtijax's figure / the bound; ``speedup_vs`` = mtijax's figure / each peer's, and
``speedup_vs_strongest`` against the fastest peer of the row. ``targets``: the H200 targets that apply to the
row (``DECODE_TARGETS``, ``PREFILL_TARGET``), each with its measured figure and whether it is met.

GPU, one model per invocation (each under 10 minutes: no measurement starts after 420 s, and the longest one,
a static-cache compile of 12B, takes a few minutes at most; the JSON is rewritten after every measurement, so a
cut run keeps what it had)::

    python experiments/bench_generate.py --sizes gemma3-270m --budget-s 420 --out /tmp/bench_generate_270m.json
    python experiments/bench_generate.py --sizes gemma3-1b --budget-s 420 --out /tmp/bench_generate_1b.json
    python experiments/bench_generate.py --sizes gemma3-12b --budget-s 420 --out /tmp/bench_generate_12b.json
    python experiments/bench_generate.py --sizes olmoe-1b-7b --budget-s 420 --out /tmp/bench_generate_olmoe.json

CPU smoke test (tiny shapes; every path but the CUDA-only ones)::

    python experiments/bench_generate.py --tiny --out /tmp/bench_generate_tiny.json
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # JAX shares the GPU with torch
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's mtijax, not an installed one

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import platform
import shutil
import subprocess
import time
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

import mtijax
from mtijax.engine import decode_block_size

TINY: dict[str, mtijax.ModelConfig] = {
    "tiny-gemma3": mtijax.Gemma3Config(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=3, num_heads=2, num_kv_heads=1,
        head_dim=32, query_pre_attn_scalar=32, sliding_window=16,
        layer_types=("sliding_attention", "sliding_attention", "full_attention"), max_position_embeddings=4096),
    "tiny-olmoe": mtijax.OlmoeConfig(
        vocab_size=512, hidden_size=64, intermediate_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
        num_experts=8, num_experts_per_tok=2, max_position_embeddings=4096, eos_token_ids=(2,), pad_token_id=0),
}
"""Shapes for the CPU smoke tests (``--tiny``): a sliding window shorter than the prompts, an OLMoE with routing."""

PEERS = ("eager", "static", "compiled")

DECODE_TARGETS = {"gemma3-270m": (0.30, 2.0), "gemma3-1b": (0.50, 2.0), "gemma3-12b": (0.85, 1.3),
                  "olmoe-1b-7b": (0.40, 2.0)}
"""The H200 decode targets per preset: ``(fraction of the bound, speedup over the strongest peer)``; the fraction
applies at batch 1 and 8, the speedup at batch 1."""
PREFILL_TARGET = 2.0
"""The H200 prefill target: this many times the strongest peer's prompt tok/s."""


def model_config(name: str) -> mtijax.ModelConfig:
    """A preset's config, or one of :data:`TINY`."""
    return TINY[name] if name in TINY else mtijax.preset(name)


def machine() -> dict:
    """What ran the benchmark: device, CPU, core count, library versions, date and git commit."""
    import jaxlib

    device = jax.devices()[0]
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip() or None
    return {"platform": device.platform, "device": getattr(device, "device_kind", str(device)), "cpu": cpu,
            "cpu_cores": len(os.sched_getaffinity(0)), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "python": platform.python_version(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"), "commit": commit}


class Budget:
    """A wall-clock allowance: :meth:`spent` turns true once ``seconds`` have passed since construction."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.perf_counter() + seconds

    def spent(self) -> bool:
        return time.perf_counter() >= self.deadline


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """``(seconds of the first call, best of `repeats` further calls)``; ``fn`` must block until done."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return first, best


def throughput(batch: int, prompt_len: int, new_tokens: int, prefill: tuple[float, float],
               total: tuple[float, float] | None) -> dict:
    """Figures from the ``(first, best)`` seconds of a 1-token and an N-token generation (see the module doc)."""
    out = {"prefill_s": prefill[1], "prefill_tok_s": batch * prompt_len / prefill[1],
           "warmup_s": prefill[0] - prefill[1]}
    if total is not None:
        decode = total[1] - prefill[1]
        out["decode_tok_s"] = batch * (new_tokens - 1) / decode if decode > 0 else None
        out["warmup_s"] += total[0] - total[1]
    return out


# ---- bounds -----------------------------------------------------------------------------------------------------

def windows(config: mtijax.ModelConfig) -> list[int | None]:
    """Per layer, the slots a query can attend to at most: the sliding window, or None (the whole context)."""
    if isinstance(config, mtijax.Gemma3Config):
        return [config.sliding_window if t == "sliding_attention" else None for t in config.layer_types]
    return [None] * config.num_layers


def weights_read(config: mtijax.ModelConfig, batch: int) -> float:
    """Weights one decode step reads: all, but for OLMoE only the ``E (1 - (1 - k/E)^B)`` experts per layer that
    ``batch`` tokens, each choosing ``k`` of ``E`` independently, are expected to use."""
    weights = config.num_params
    if isinstance(config, mtijax.OlmoeConfig):
        e, k = config.num_experts, config.num_experts_per_tok
        used = e * (1 - (1 - k / e) ** batch)
        weights -= config.num_layers * (e - used) * 3 * config.hidden_size * config.intermediate_size
    return weights


def decode_bytes(config: mtijax.ModelConfig, batch: int, context: int, itemsize: int) -> float:
    """Bytes a decode step must read when the cache holds ``context`` tokens: the weights it uses and, per layer,
    K and V of ``min(context, window)`` slots (the whole context on global layers)."""
    slots = sum(context if w is None else min(context, w) for w in windows(config))
    kv = 2 * batch * slots * config.num_kv_heads * config.head_dim
    return itemsize * (weights_read(config, batch) + kv)


def decode_bound(config: mtijax.ModelConfig, batch: int, prompt_len: int, new_tokens: int, itemsize: int,
                 bandwidth: float) -> dict:
    """Bandwidth bound of decoding ``new_tokens - 1`` steps after a ``prompt_len`` prefill (step i attends to
    ``prompt_len + i`` tokens): tokens/s and the mean bytes per step."""
    steps = range(1, max(new_tokens, 2))
    per_step = [decode_bytes(config, batch, prompt_len + i, itemsize) for i in steps]
    return {"decode_tok_s": batch * len(per_step) / (sum(per_step) / bandwidth),
            "bytes_per_step": float(np.mean(per_step))}


def prefill_flops(config: mtijax.ModelConfig, batch: int, prompt_len: int) -> float:
    """Matrix FLOPs of a prefill: projections and MLP (active experts and the router for OLMoE) for every token,
    causal attention scores and mixing (within the window on sliding layers), and the last token's logits."""
    d, h = config.hidden_size, config.head_dim
    attn = d * h * (2 * config.num_heads + 2 * config.num_kv_heads)
    if isinstance(config, mtijax.OlmoeConfig):
        mlp = d * config.num_experts + 3 * config.num_experts_per_tok * d * config.intermediate_size
    else:
        mlp = 3 * d * config.intermediate_size
    positions = np.arange(1, prompt_len + 1)
    pairs = sum(int(positions.sum() if w is None else np.minimum(positions, w).sum()) for w in windows(config))
    return batch * (2 * prompt_len * config.num_layers * (attn + mlp) + 4 * config.num_heads * h * pairs
                    + 2 * config.vocab_size * d)


def copy_bandwidth(device: str, gib: float) -> float:
    """Copy bandwidth in bytes/s (read + write) of ``gib`` GiB, best of 10, via torch on ``device``."""
    import torch

    n = int(gib * 2**30) // 2
    src = torch.empty(n, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(12):
        sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - start)
    del src, dst
    release(device)
    return 2 * n * 2 / best


def matmul_rate(device: str, n: int) -> float:
    """FLOP/s of an ``n x n`` by ``n x n`` matmul (bfloat16 on a GPU, float32 on a CPU), best of 10, via torch."""
    import torch

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    best = float("inf")
    for _ in range(12):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    del a, b
    release(device)
    return 2 * n**3 / best


# ---- memory -----------------------------------------------------------------------------------------------------

def free_bytes(device: str) -> int:
    """Free memory of the device torch uses (CUDA: the driver's count, so JAX's pool counts as used)."""
    import torch

    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    return int(meminfo["MemAvailable"].split()[0]) * 1024


def kv_cache_bytes(config: mtijax.ModelConfig, batch: int, prompt_len: int, new_tokens: int,
                   dtype: str) -> dict[str, int]:
    """Bytes of mtijax's KV cache for the request (the cache rung the engine lays it out on, in the layout it
    takes: a ring of ``window`` slots on sliding layers when the rung is longer), and of the same rung in the full
    layout (every layer keeps every slot)."""
    from mtijax.engine.ladder import default_ladder
    from mtijax.engine.request import lay_out
    from mtijax.models.cache import init_cache
    from mtijax.models.decoder import family

    rung = lay_out(config, [[3] * prompt_len] * batch, new_tokens, default_ladder(), ()).cache_length
    windows = family(config).layer_spec(config)["window"]

    def size(with_windows: bool) -> int:
        shapes = jax.eval_shape(lambda: init_cache(config.num_layers, batch, rung, config.num_kv_heads,
                                                   config.head_dim, jnp.dtype(dtype),
                                                   windows if with_windows else None))
        return int(sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(shapes)))

    return {"rung": rung, "mtijax": size(True), "full_layout": size(False)}


def peer_cache_bytes(config: mtijax.ModelConfig, batch: int, context: int, dtype: str) -> int:
    """The peers' KV caches for ``context`` tokens, counted at full length on every layer (an over-estimate on
    their sliding layers)."""
    return 2 * config.num_layers * batch * context * config.num_kv_heads * config.head_dim * jnp.dtype(dtype).itemsize


# ---- transformers -----------------------------------------------------------------------------------------------

def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def release(device: str) -> None:
    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def hf_model(config: mtijax.ModelConfig, dtype: str, device: str):
    """The transformers model of ``config``'s shapes with random weights, in ``dtype`` on ``device``, eval mode."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, OlmoeConfig, OlmoeForCausalLM

    if isinstance(config, mtijax.OlmoeConfig):
        model_class = OlmoeForCausalLM
        hf_config = OlmoeConfig(
            vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
            num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
            num_key_value_heads=config.num_kv_heads, num_experts=config.num_experts,
            num_experts_per_tok=config.num_experts_per_tok, norm_topk_prob=config.norm_topk_prob,
            max_position_embeddings=config.max_position_embeddings, pad_token_id=config.pad_token_id,
            eos_token_id=config.eos_token_ids[0])
    else:
        model_class = Gemma3ForCausalLM
        hf_config = Gemma3TextConfig(
            vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
            num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
            num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim,
            query_pre_attn_scalar=config.query_pre_attn_scalar, sliding_window=config.sliding_window,
            layer_types=list(config.layer_types), max_position_embeddings=config.max_position_embeddings,
            pad_token_id=config.pad_token_id)
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        with torch.device(device):
            model = model_class(hf_config).eval()
    finally:
        torch.set_default_dtype(torch.float32)
    return model


def bench_peer(model, config: mtijax.ModelConfig, peer: str, batch: int, prompt_len: int, new_tokens: int,
               repeats: int, device: str) -> dict:
    """Throughput of the transformers peer ``peer`` ("eager", "static" or, prefill only, "compiled")."""
    import torch
    from transformers import CompileConfig

    ids = torch.randint(3, config.vocab_size, (batch, prompt_len), device=device,
                        generator=torch.Generator(device).manual_seed(0))
    before = dynamo_counts()
    if peer == "compiled":
        compiled = torch.compile(model)

        def forward():
            with torch.no_grad():
                compiled(input_ids=ids, use_cache=False, logits_to_keep=1)
            sync(device)

        return {**throughput(batch, prompt_len, 1, timed(forward, repeats), None),
                "torch_compile": dynamo_counts(before)}
    options = {"cache_implementation": "static"} if peer == "static" else {}
    if peer == "static" and device != "cuda":
        options["compile_config"] = CompileConfig()
        options["compile_config"]._compile_all_devices = True  # generate compiles on CUDA only, unless told

    def run(n: int) -> Callable[[], None]:
        def go() -> None:
            with torch.no_grad():
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                               do_sample=False, pad_token_id=config.pad_token_id, **options)
            sync(device)
        return go

    prefill = timed(run(1), repeats)
    total = timed(run(new_tokens), repeats) if new_tokens > 1 else None
    out = throughput(batch, prompt_len, new_tokens, prefill, total)
    if peer == "static":
        out["torch_compile"] = dynamo_counts(before)
    return out


def dynamo_counts(since: dict | None = None) -> dict:
    """torch.compile's counters (graphs compiled, graph breaks, frames, CUDA-graph skips), minus ``since``: a peer
    that recompiles at every step, or falls back to eager, shows here."""
    from torch._dynamo.utils import counters

    now = {"graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(counters["graph_break"].values()),
           "frames": counters["frames"]["total"], "cudagraph_skips": counters["inductor"]["cudagraph_skips"]}
    return {key: value - (since or {}).get(key, 0) for key, value in now.items()}


# ---- mtijax -----------------------------------------------------------------------------------------------------

def bench_mtijax(config: mtijax.ModelConfig, params, batch: int, prompt_len: int, new_tokens: int,
                 repeats: int, rolling: bool = True) -> dict:
    """Throughput of ``mtijax.generate`` and, when decoding, ``mtijax.generate_stream``; ``rolling=False``: every
    layer's cache at full length (``Ladder(rolling=False)``)."""
    from mtijax.engine import settle_compiles
    from mtijax.engine.ladder import default_ladder

    prompts = np.random.default_rng(0).integers(3, config.vocab_size, (batch, prompt_len)).tolist()
    ladder = dataclasses.replace(default_ladder(), rolling=rolling)

    def run(n: int) -> Callable[[], object]:
        def call() -> object:
            tokens = mtijax.generate(config, params, prompts, n, stop_ids=(), ladder=ladder).tokens
            settle_compiles()  # the first call waits for the tuned builds too (they are its warm-up)
            return tokens

        return call

    prefill = timed(run(1), repeats)
    total = timed(run(new_tokens), repeats) if new_tokens > 1 else None
    out = throughput(batch, prompt_len, new_tokens, prefill, total)
    if total is not None:
        def stream() -> None:
            for _ in mtijax.generate_stream(config, params, prompts, new_tokens, stop_ids=(), ladder=ladder):
                pass

        _, streamed = timed(stream, 1)
        decode = streamed - prefill[1]
        out["stream_decode_tok_s"] = batch * (new_tokens - 1) / decode if decode > 0 else None
        half = new_tokens // 2
        out["steady_decode_tok_s"] = batch / steady_step_s(config, params, prompts, new_tokens - half, half, ladder)
    return out


@contextlib.contextmanager
def decode_block(size: str | None) -> Iterator[None]:
    """``MTIJAX_DECODE_BLOCK=size`` inside the block (nothing changed for ``None``)."""
    if size is None:
        yield
        return
    before = os.environ.get("MTIJAX_DECODE_BLOCK")
    os.environ["MTIJAX_DECODE_BLOCK"] = size
    try:
        yield
    finally:
        if before is None:
            del os.environ["MTIJAX_DECODE_BLOCK"]
        else:
            os.environ["MTIJAX_DECODE_BLOCK"] = before


def steady_step_s(config: mtijax.ModelConfig, params, prompts: list[list[int]], steps: int, skip: int,
                  ladder=None) -> float:
    """Seconds per decode step of the engine alone: ``steps`` steps timed after the first ``skip`` of a run (no
    prefill in the figure, so a long context's prefill variation cannot swamp it)."""
    from mtijax.engine.sampling import Plain, Sampling
    from mtijax.generate import start_run

    _, run = start_run(config, params, prompts, skip + steps, policy=Plain(Sampling()), stop_ids=(), ladder=ladder)
    for _ in range(skip):
        state, _ = next(run)
    jax.block_until_ready(state.token)
    start = time.perf_counter()
    for _ in range(steps):
        state, _ = next(run)
    jax.block_until_ready(state.token)
    return (time.perf_counter() - start) / steps


# ---- the run ----------------------------------------------------------------------------------------------------

def rows_for(config: mtijax.ModelConfig, args: argparse.Namespace) -> list[dict]:
    """The rows of one model, most important first (see the module doc)."""
    batches = [int(b) for b in args.batches.split(",") if b]
    rows = [{"kind": "decode", "batch": b, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens}
            for b in batches[:1]]
    if args.prefill_len:
        rows.append({"kind": "prefill", "batch": 1, "prompt_len": args.prefill_len, "new_tokens": 1})
    rows += [{"kind": "decode", "batch": b, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens}
             for b in batches[1:]]
    if isinstance(config, mtijax.Gemma3Config):
        rows += [{"kind": "long", "batch": 1, "prompt_len": c - args.long_new_tokens, "new_tokens": args.long_new_tokens}
                 for c in (int(c) for c in args.long_contexts.split(",") if c)]
    return rows


def judge(row: dict) -> None:
    """Add the fraction of the bound and the speedups over each peer and the strongest one to ``row``."""
    figure = "prefill_tok_s" if row["kind"] == "prefill" else "decode_tok_s"
    ours = row["mtijax"].get(figure)
    row["figure"] = figure
    row["fraction_of_bound"] = ours / row["bound"][figure] if ours else None
    peers = {name: row[name][figure] for name in row if name.startswith("transformers_") and row[name].get(figure)}
    row["speedup_vs"] = {name: ours / value for name, value in peers.items()} if ours else {}
    if ours and peers:
        strongest = max(peers, key=peers.get)
        row["strongest_peer"], row["speedup_vs_strongest"] = strongest, ours / peers[strongest]
    row["targets"] = targets(row)


def targets(row: dict) -> dict:
    """The targets that apply to a judged ``row`` (:data:`DECODE_TARGETS`, :data:`PREFILL_TARGET`; none for long
    rows or other presets): ``{"fraction_of_bound" | "speedup_vs_strongest": {"target", "measured", "met"}}``,
    ``measured`` None (and ``met`` False) where the row has no such figure."""
    wanted = {}
    if row["kind"] == "decode" and row["model"] in DECODE_TARGETS:
        fraction, speedup = DECODE_TARGETS[row["model"]]
        wanted["fraction_of_bound"] = fraction
        if row["batch"] == 1:
            wanted["speedup_vs_strongest"] = speedup
    elif row["kind"] == "prefill":
        wanted["speedup_vs_strongest"] = PREFILL_TARGET
    out = {}
    for name, target in wanted.items():
        measured = row.get(name)
        out[name] = {"target": target, "measured": measured, "met": measured is not None and measured >= target}
    return out


def attempt(fn: Callable[[], dict], device: str) -> dict:
    """``fn()``, or ``{"error": ...}`` when it raises (out of memory included), memory released either way."""
    try:
        return fn()
    except Exception as e:  # a peer's or the engine's failure is a result of the row, not the end of the run
        first = (str(e).strip().splitlines() or [""])[0][:300]
        return {"error": f"{type(e).__name__}: {first}"}
    finally:
        release(device)


def fmt(value: float | None, width: int, digits: int = 0) -> str:
    return f"{value:>{width}.{digits}f}" if isinstance(value, (int, float)) else f"{'-':>{width}}"


HEADER = (f"{'model':<13}{'row':<9}{'batch':>5}{'ctx':>7}{'mtijax':>9}{'stream':>8}{'eager':>8}{'static':>8}"
          f"{'(w-up s)':>9}{'compiled':>9}{'bound':>9}{'%bound':>7}{'x eager':>8}{'x static':>9}{'x best':>7}")


def print_row(row: dict) -> None:
    figure = row["figure"]
    get = lambda name, key=figure: row.get(name, {}).get(key)
    percent = 100 * row["fraction_of_bound"] if row["fraction_of_bound"] else None
    print(f"{row['model']:<13}{row['kind']:<9}{row['batch']:>5}{row['prompt_len']:>7}"
          f"{fmt(get('mtijax'), 9, 1)}{fmt(get('mtijax', 'stream_' + figure), 8, 1)}"
          f"{fmt(get('transformers_eager'), 8, 1)}{fmt(get('transformers_static'), 8, 1)}"
          f"{fmt(get('transformers_static', 'warmup_s'), 9, 1)}{fmt(get('transformers_compiled'), 9, 1)}"
          f"{fmt(row['bound'][figure], 9)}{fmt(percent, 6)}%"
          f"{fmt(row['speedup_vs'].get('transformers_eager'), 8, 2)}"
          f"{fmt(row['speedup_vs'].get('transformers_static'), 9, 2)}"
          f"{fmt(row.get('speedup_vs_strongest'), 7, 2)}", flush=True)
    for name in ("mtijax", "transformers_eager", "transformers_static", "transformers_compiled"):
        if name in row and set(row[name]) & {"error", "skipped"}:
            print(f"    {name}: {row[name].get('error') or row[name].get('skipped')}", flush=True)
    steady = lambda name: fmt(get(name, "steady_decode_tok_s"), 0, 1).strip()
    for name in sorted(n for n in row if n.startswith("mtijax_block")):
        print(f"    {name}: {fmt(get(name), 0, 1).strip()} tok/s (steady {steady(name)}; default block "
              f"{get('mtijax', 'decode_block')}: steady {steady('mtijax')})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=None,
                        help="comma-separated presets, or tiny-gemma3, tiny-olmoe (default: gemma3-270m,gemma3-1b,"
                             "gemma3-12b,olmoe-1b-7b; with --tiny both tiny ones)")
    parser.add_argument("--batches", default="1,8", help="decode batch sizes; the first runs first ('' for none)")
    parser.add_argument("--prompt-len", type=int, default=128, help="prompt tokens of the decode rows")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens generated in the decode rows")
    parser.add_argument("--prefill-len", type=int, default=2048, help="prompt of the prefill row (0: no such row)")
    parser.add_argument("--long-contexts", default="8192,32768",
                        help="contexts of the long rows, Gemma only ('' for none)")
    parser.add_argument("--long-new-tokens", type=int, default=256,
                        help="tokens generated in the long rows (enough that decode time exceeds the prefill's "
                             "run-to-run variation)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls after the first, best kept")
    parser.add_argument("--long-repeats", type=int, default=2, help="--repeats of the prefill and long rows")
    parser.add_argument("--peers", default=",".join(PEERS),
                        help="transformers peers: eager, static (static cache + compiled decode), compiled "
                             "(compiled forward, prefill row only); '' for none")
    parser.add_argument("--dtype", default=None, help="bfloat16 (default on a GPU) or float32 (default on a CPU)")
    parser.add_argument("--budget-s", type=float, default=480.0,
                        help="start no measurement after this many seconds; the rest is recorded as skipped")
    parser.add_argument("--tiny", action="store_true",
                        help="CPU smoke test: tiny-gemma3,tiny-olmoe, prompts of 32, 8 new tokens, prefill of 128, "
                             "long contexts 64 and 256, 1 repeat (flags given explicitly still win)")
    parser.add_argument("--decode-block-variants", default="",
                        help="comma-separated decode block sizes to measure mtijax's decode rows with besides its "
                             "default, as mtijax_block<N> (MTIJAX_DECODE_BLOCK=N)")
    parser.add_argument("--out", default=None, help="JSON path, rewritten after every measurement")
    if parser.parse_args().tiny:  # tiny defaults; flags given explicitly still win
        parser.set_defaults(sizes=",".join(TINY), prompt_len=32, new_tokens=8, prefill_len=128, long_contexts="64,256",
                            long_new_tokens=4, repeats=1)
    args = parser.parse_args()
    args.sizes = args.sizes or "gemma3-270m,gemma3-1b,gemma3-12b,olmoe-1b-7b"

    import torch
    import transformers

    budget = Budget(args.budget_s)
    started = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    itemsize = jnp.dtype(dtype).itemsize
    peers = [p for p in args.peers.split(",") if p]
    unknown = sorted(set(peers) - set(PEERS))
    if unknown:
        raise SystemExit(f"bench_generate: unknown peer {', '.join(map(repr, unknown))}; the peers are {', '.join(PEERS)}")
    block_variants = [int(n) for n in args.decode_block_variants.split(",") if n]
    inductor_dir = None
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        inductor_dir = tempfile.mkdtemp(prefix="bench_generate_inductor_")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = inductor_dir
    bandwidth = copy_bandwidth(device, 2.0 if device == "cuda" else 0.25)
    flops = matmul_rate(device, 8192 if device == "cuda" else 1024)
    report = {
        "script": "experiments/bench_generate.py", "argv": sys.argv[1:],
        "machine": {**machine(), "torch": torch.__version__, "transformers": transformers.__version__,
                    "torch_device": device},
        "settings": {"dtype": dtype, "sizes": args.sizes.split(","), "batches": args.batches,
                     "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "prefill_len": args.prefill_len,
                     "long_contexts": args.long_contexts, "long_new_tokens": args.long_new_tokens,
                     "repeats": args.repeats, "long_repeats": args.long_repeats, "peers": peers,
                     "budget_s": args.budget_s, "torchinductor_cache": "fresh" if inductor_dir else "given",
                     "decode_block_variants": block_variants,
                     "env": {k: os.environ.get(k) for k in ("MTIJAX_CACHE", "MTIJAX_COMPILATION_CACHE",
                                                            "MTIJAX_DECODE_BLOCK",
                                                            "MTIJAX_TIERED_COMPILE", "MTIJAX_PALLAS", "MTIJAX_ATTENTION",
                                                            "XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_FLAGS")}},
        "copy_bandwidth_GBps": bandwidth / 1e9, "matmul_TFLOPS": flops / 1e12,
        "rows": [], "skipped": [], "elapsed_s": 0.0, "finished": False,
    }

    def save() -> None:
        report["elapsed_s"] = time.perf_counter() - started
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=2))

    print(f"{report['machine']['device']}: copy {bandwidth / 1e9:.0f} GB/s, matmul {flops / 1e12:.3g} TFLOP/s "
          f"({dtype}); decode figures in tok/s, prefill rows in prompt tok/s", flush=True)
    print(HEADER, flush=True)
    try:
        for size in args.sizes.split(","):
            config = model_config(size)
            state: dict = {}
            for spec in rows_for(config, args):
                row = {"model": size, **spec}
                report["rows"].append(row)  # filled in place, so every save() holds what this row has so far
                batch, prompt_len, new_tokens = spec["batch"], spec["prompt_len"], spec["new_tokens"]
                repeats = args.repeats if spec["kind"] == "decode" else args.long_repeats
                if spec["kind"] == "prefill":
                    row["bound"] = {"prefill_tok_s": batch * prompt_len / (prefill_flops(config, batch, prompt_len)
                                                                           / flops),
                                    "flops": prefill_flops(config, batch, prompt_len)}
                else:
                    row["bound"] = decode_bound(config, batch, prompt_len, new_tokens, itemsize, bandwidth)
                reason = None
                if budget.spent():
                    reason = "budget spent"
                elif prompt_len + new_tokens > config.max_position_embeddings:
                    reason = f"context {prompt_len + new_tokens} exceeds the model's {config.max_position_embeddings}"
                elif spec["kind"] == "long":
                    row["kv_cache_bytes"] = kv_cache_bytes(config, batch, prompt_len, new_tokens, dtype)
                    added = row["kv_cache_bytes"]["mtijax"] + peer_cache_bytes(config, batch, prompt_len + new_tokens,
                                                                                dtype)
                    free = free_bytes(device)
                    if added > 0.9 * free:
                        reason = f"needs ~{added / 1e9:.1f} GB beyond the weights, {free / 1e9:.1f} GB free"
                names = [f"transformers_{p}" for p in peers if p != "compiled" or spec["kind"] == "prefill"]
                ours = ["mtijax"] + (["mtijax_full_layout"] if spec["kind"] == "long" else [])
                if spec["kind"] == "decode":
                    ours += [f"mtijax_block{n}" for n in block_variants]
                for name in names + ours:
                    if reason or budget.spent():
                        row[name] = {"skipped": reason or "budget spent"}
                        report["skipped"].append({"model": size, **spec, "who": name, "reason": row[name]["skipped"]})
                        continue
                    if name in ours:
                        if "params" not in state:
                            state["params"] = mtijax.init_params(config, jax.random.key(0), jnp.dtype(dtype))
                        block = name[len("mtijax_block"):] if name.startswith("mtijax_block") else None
                        with decode_block(block):
                            row[name] = attempt(lambda: bench_mtijax(config, state["params"], batch, prompt_len,
                                                                     new_tokens, repeats, name != "mtijax_full_layout"),
                                                device)
                        row[name]["decode_block"] = decode_block_size() if block is None else int(block)
                    else:
                        if "torch" not in state:
                            state["torch"] = hf_model(config, dtype, device)
                        row[name] = attempt(lambda: bench_peer(state["torch"], config, name.split("_")[1], batch,
                                                               prompt_len, new_tokens, repeats, device), device)
                    save()
                judge(row)
                save()
                print_row(row)
            state.clear()
            jax.clear_caches()
            release(device)
        report["finished"] = True
        save()
    finally:
        if inductor_dir:
            shutil.rmtree(inductor_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
