"""Layer streaming (seeds 004, 000) measured: bandwidth, overlap, batch amortization, memory, a peer, MoE experts.

One run, on random bfloat16 weights in the real shapes of Gemma 3 12B written as
sharded safetensors to local disk (``--layers`` of its 48 layers: the default 12
keeps the run under 4 minutes on an H100 with a 64 GB disk; every per-pass figure
is also extrapolated to 48 layers, linearly, and labelled so):

* ``bandwidth``: pinned host -> device copy rate (the bound for streaming from
  host memory), pageable numpy -> device, and the rate of filling pinned memory
  the first time against refilling it (the allocator reusing its pages);
* ``stream``: a cold pass (layers read from the files), then with every layer in
  the host cache: decode pass time and its effective GB/s (layer bytes / pass
  time, goal >= 85% of the pinned -> device rate), tokens/s at batch 1, 8, 64;
  pass time at prefetch 0, 1, 2 against compute alone (layers kept on the
  device) and transfer alone (the overlap: with prefetch >= 1 a pass should take
  ~max(compute, transfer), at 0 their sum); peak device memory;
* ``resident``: the same model with every layer on the device, through the same
  per-layer step and through ``mtijax.generate`` (batch 1): tokens/s and peak;
* ``peer``: ``transformers`` + ``accelerate`` CPU offload (embedding and head on
  the GPU, every layer on the CPU, moved per forward by accelerate's hooks), in a
  subprocess, batch 1 and 8;
* ``olmoe``: OLMoE-1B-7B shapes (``--olmoe-layers`` of 16): bytes moved per token
  with expert streaming against whole layers, tokens/s;
* ``claim``: the seed's "15-20 tokens/s for 27B from a 7 GB/s NVMe" beside the
  bound physics gives (every weight crosses the bus once per decode step).

The layer-selection study (perplexity cost against bytes saved on a held-out
text, the embedded Gemma 3 270M) is device-independent: ``--sections selection``.

GPU (results JSON at --out, figures beside it)::

    python experiments/bench_stream.py --out experiments/results/bench_stream_h100.json

CPU smoke test (tiny shapes, the peer without offload)::

    python experiments/bench_stream.py --quick --out /tmp/bench_stream_quick.json
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # let the peer subprocess have GPU memory

import argparse
import dataclasses
import gc
import json
import math
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

import mtijax
from mtijax.streaming import (KeywordSectors, LayerStore, StreamedModel, format_bytes, selection_study,
                              write_random_checkpoint)

FULL_GEMMA_LAYERS = 48
STREAM_HOST_CACHE_LAYERS = None  # the streamed runs keep every layer in host memory (None: no LRU cap)
SEED_CLAIM = {"text": "Gen4 NVMe (7000MB/s): ~15-20 tokens/sec (theoretical max for 27B)", "nvme_gbps": 7.0,
              "tok_s": [15.0, 20.0], "source": "seeds/004 section 5"}
HELD_OUT = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a tin of oil and a cloth for "
    "the lens. For thirty years the light had never failed, not in the great storm of the winter when the waves "
    "broke over the rocks, nor in the long fogs of early spring. Ships that passed the headland saw the beam turn "
    "once every ten seconds and knew where they were. When the harbour board wrote to say that an automatic lamp "
    "would be fitted next year, he read the letter twice, folded it carefully, and put it in the drawer with the "
    "logbooks. Then he went up the stairs as usual, because the evening had come and the light was his to keep. "
    "In the village below, the baker was already preparing the dough for the morning, and the schoolteacher was "
    "marking the last of the arithmetic books by the window, where she could see the beam sweep across the bay."
)


def configs(args) -> tuple[mtijax.Gemma3Config, mtijax.OlmoeConfig]:
    """The Gemma 3 12B and OLMoE-1B-7B shapes with the chosen layer counts (tiny shapes with --quick)."""
    gemma, olmoe = mtijax.preset("gemma3-12b"), mtijax.preset("olmoe-1b-7b")
    if args.quick:
        gemma = dataclasses.replace(gemma, hidden_size=256, intermediate_size=1024, num_heads=4, num_kv_heads=2,
                                    head_dim=64, vocab_size=4096)
        olmoe = dataclasses.replace(olmoe, hidden_size=256, intermediate_size=128, num_heads=4, num_kv_heads=4,
                                    num_experts=16, num_experts_per_tok=4, vocab_size=4096)
    gemma = dataclasses.replace(gemma, num_layers=args.layers, layer_types=gemma.layer_types[: args.layers])
    return gemma, dataclasses.replace(olmoe, num_layers=args.olmoe_layers)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def warm_timed(fn) -> float:
    """Wall time of ``fn()`` run a second time (the first run compiles)."""
    fn()
    return timed(fn)


def prompts_of(batch: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    return np.random.default_rng(seed).integers(3, vocab, (batch, length)).tolist()


def allocator_peak() -> int | None:
    stats = jax.devices()[0].memory_stats()
    return None if not stats else stats.get("peak_bytes_in_use")


# --- sections ------------------------------------------------------------------------------------------------------

def bandwidth(layer_bytes: int, layers: int) -> dict:
    """Copy rates between host and device, each timed to completion (``block_until_ready`` on the result)."""
    device = jax.devices()[0]
    pinned = jax.sharding.SingleDeviceSharding(device, memory_kind="pinned_host")
    on_device = jax.sharding.SingleDeviceSharding(device, memory_kind=device.default_memory().kind)
    host = np.random.default_rng(0).integers(0, 255, layer_bytes, np.uint8)
    count = min(layers, 4)
    first = timed(lambda: jax.block_until_ready([jax.device_put(host, pinned) for _ in range(count)]))
    gc.collect()
    staged = []
    refill = timed(lambda: staged.extend(jax.block_until_ready([jax.device_put(host, pinned) for _ in range(count)])))
    jax.block_until_ready(jax.device_put(staged[0], on_device))
    best = min(timed(lambda: jax.block_until_ready(jax.device_put(staged[0], on_device))) for _ in range(5))
    queued = min(timed(lambda: jax.block_until_ready([jax.device_put(a, on_device) for a in staged]))
                 for _ in range(3))
    pageable = min(timed(lambda: jax.block_until_ready(jax.device_put(host, on_device))) for _ in range(3))
    staged.clear()
    gc.collect()
    return {"layer_bytes": layer_bytes, "pinned_first_fill_gbps": count * layer_bytes / first / 1e9,
            "pinned_refill_gbps": count * layer_bytes / refill / 1e9,
            "pinned_to_device_gbps": layer_bytes / best / 1e9,
            "pinned_to_device_queued_gbps": count * layer_bytes / queued / 1e9,
            "pageable_to_device_gbps": layer_bytes / pageable / 1e9,
            "transfer_only_pass_s": layers * queued / count}


def measure_generation(model: StreamedModel, batch: int, prompt_len: int, new_tokens: int, vocab: int) -> dict:
    """Prefill and decode of a streamed model: wall times, pass times (layers only) and tokens/s."""
    prompts = prompts_of(batch, prompt_len, vocab)
    model.generate(prompts, new_tokens, stop_ids=())  # compiles every shape the timed runs use
    model.generate(prompts, 1, stop_ids=())
    model.reset_stats()
    prefill_wall = timed(lambda: model.generate(prompts, 1, stop_ids=()))
    prefill_pass = model.stats().seconds
    model.reset_stats()
    total_wall = timed(lambda: model.generate(prompts, new_tokens, stop_ids=()))
    stats = model.stats()
    decode_pass = (stats.seconds - prefill_pass) / (new_tokens - 1)
    decode_step = (total_wall - prefill_wall) / (new_tokens - 1)
    streamed = model.config.num_layers * model.layer_nbytes
    return {"batch": batch, "prefill_s": prefill_wall, "decode_step_s": decode_step, "decode_pass_s": decode_pass,
            "decode_tok_s": batch / decode_step, "prefill_tok_s": batch * prompt_len / prefill_wall,
            "effective_gbps": streamed / decode_pass / 1e9 if model.host.kind != "device" else None,
            "host_cache_hit_rate": stats.host_cache.hit_rate}


def stream(directory: Path, args, bw: dict, results: dict) -> None:
    layers = LayerStore(directory, "bfloat16").num_layers
    out = results.setdefault("stream", {})
    model = StreamedModel(directory, "bfloat16", host_cache_layers=STREAM_HOST_CACHE_LAYERS, prefetch=2)
    out["host_cache_layers"] = STREAM_HOST_CACHE_LAYERS
    out["host_memory"] = f"{model.host.kind} ({model.host.reason})"
    prompt = prompts_of(1, args.prompt_len, model.config.vocab_size)
    model.reset_stats()
    model.forward(np.array(prompt)[:, :1])
    stats = model.stats()
    out["cold_pass"] = {"seconds": stats.seconds, "bytes_read": stats.bytes_read,
                        "read_gbps": stats.bytes_read / stats.seconds / 1e9,
                        "note": "first pass (compile excluded): every layer read from the files (page cache) into "
                                "host memory by the prefetch threads, then copied to the device"}
    out["batches"] = []
    for batch in args.batches:
        row = measure_generation(model, batch, args.prompt_len, args.new_tokens, model.config.vocab_size)
        row["fraction_of_pinned_bandwidth"] = row["effective_gbps"] / bw["pinned_to_device_gbps"]
        out["batches"].append(row)
        print(f"  streamed batch {batch}: {row['decode_tok_s']:.2f} tok/s, pass {row['decode_pass_s'] * 1e3:.1f} ms, "
              f"{row['effective_gbps']:.1f} GB/s ({100 * row['fraction_of_pinned_bandwidth']:.0f}% of pinned)")
        write(results, args)
    out["prefetch"] = []
    for depth in (0, 1, 2):
        model.set_prefetch(depth)
        row = measure_generation(model, 1, args.prompt_len, args.new_tokens, model.config.vocab_size)
        out["prefetch"].append({"prefetch": depth, "decode_pass_s": row["decode_pass_s"],
                                "effective_gbps": row["effective_gbps"]})
    out["transfer_only_pass_s"] = bw["transfer_only_pass_s"]
    out["stats"] = model.stats().to_json()
    out["accounted_peak_bytes"] = model.stats().accounted_peak_bytes
    out["allocator_peak_bytes"] = allocator_peak()
    out["layers"] = layers
    out["layer_bytes"] = model.layer_nbytes
    model.close()
    del model
    gc.collect()
    write(results, args)


def resident(directory: Path, args, results: dict) -> None:
    """Every layer on the device: the streamer's own step over a device-held cache, then ``mtijax.generate``."""
    out = results.setdefault("resident", {})
    model = StreamedModel(directory, "bfloat16", host_cache_layers=None, prefetch=0, host_memory="device")
    model.forward(np.array(prompts_of(1, 1, model.config.vocab_size)))  # fills the device-held cache
    out["same_step_batches"] = [measure_generation(model, b, args.prompt_len, args.new_tokens,
                                                   model.config.vocab_size) for b in args.batches]
    results["stream"]["compute_only_pass_s"] = out["same_step_batches"][0]["decode_pass_s"]
    out["allocator_peak_bytes_after_same_step"] = allocator_peak()
    write(results, args)
    if time.perf_counter() - args.start > args.budget_s:
        out["mtijax_generate_batch1"] = f"skipped: past the --budget-s of {args.budget_s} s"
        model.close()
        return
    store = model.store
    config = model.config
    params = {"layers": {}}
    stacked = [store.read_layer(layer) for layer in range(config.num_layers)]
    for leaf in store.leaves:
        value = jax.device_put(np.stack([_leaf(layer, leaf.path) for layer in stacked]))
        node = params["layers"]
        for key in leaf.path[:-1]:
            node = node.setdefault(key, {})
        node[leaf.path[-1]] = value.swapaxes(-1, -2) if leaf.transpose else value
    del stacked
    params.update(jax.device_put(store.read_resident()))
    model.close()
    del model
    gc.collect()
    prompts = prompts_of(1, args.prompt_len, config.vocab_size)
    prefill = warm_timed(lambda: mtijax.generate(config, params, prompts, 1, stop_ids=()).tokens)
    total = warm_timed(lambda: mtijax.generate(config, params, prompts, args.new_tokens, stop_ids=()).tokens)
    out["mtijax_generate_batch1"] = {"decode_tok_s": (args.new_tokens - 1) / (total - prefill), "prefill_s": prefill}
    out["params_bytes"] = sum(x.nbytes for x in jax.tree.leaves(params))
    out["allocator_peak_bytes"] = allocator_peak()
    params.clear()
    gc.collect()
    write(results, args)


def _leaf(tree: dict, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def olmoe(directory: Path, args, results: dict) -> None:
    out = results.setdefault("olmoe", {})
    for name, options in (("whole_layers", {}), ("experts", {"stream_experts": True})):
        model = StreamedModel(directory, "bfloat16", host_cache_layers=None, prefetch=2, **options)
        model.forward(np.array(prompts_of(4, 64, model.config.vocab_size)))  # reads (nearly) every expert once
        rows = []
        for batch in args.olmoe_batches:
            prompts = prompts_of(batch, args.prompt_len, model.config.vocab_size, seed=batch)
            model.generate(prompts, args.new_tokens, stop_ids=())
            model.generate(prompts, 1, stop_ids=())
            model.reset_stats()
            prefill_wall = timed(lambda: model.generate(prompts, 1, stop_ids=()))
            prefill = model.stats()
            model.reset_stats()
            total_wall = timed(lambda: model.generate(prompts, args.new_tokens, stop_ids=()))
            stats = model.stats()
            decode_bytes = stats.total_bytes_to_device - prefill.total_bytes_to_device
            tokens = batch * (args.new_tokens - 1)
            rows.append({"batch": batch, "decode_tok_s": tokens / (total_wall - prefill_wall),
                         "bytes_per_token": decode_bytes / tokens,
                         "whole_layer_bytes_per_token": model.config.num_layers * model.store.layer_nbytes / batch,
                         "experts_moved": stats.experts_moved, "expert_device_hits": stats.expert_device_hits,
                         "effective_gbps": stats.effective_gbps})
            print(f"  olmoe {name} batch {batch}: {rows[-1]['decode_tok_s']:.2f} tok/s, "
                  f"{format_bytes(rows[-1]['bytes_per_token'])}/token")
        out[name] = rows
        model.close()
        gc.collect()
        write(results, args)


def peer(directory: Path, args, results: dict) -> None:
    """transformers + accelerate CPU offload, in a subprocess (its own CUDA allocator and memory)."""
    peer_out = Path(tempfile.mkdtemp()) / "peer.json"
    command = [sys.executable, __file__, "--peer", str(directory), "--peer-out", str(peer_out),
               "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.peer_new_tokens),
               "--batches", ",".join(str(b) for b in args.peer_batches)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.peer_timeout)
    except subprocess.TimeoutExpired:
        results["peer"] = {"error": f"timed out after {args.peer_timeout} s"}
        write(results, args)
        return
    if peer_out.is_file():
        results["peer"] = json.loads(peer_out.read_text())
    else:
        results["peer"] = {"error": (done.stderr or done.stdout)[-2000:]}
    write(results, args)


def run_peer(directory: Path, batches: list[int], prompt_len: int, new_tokens: int, out: Path) -> None:
    """The peer, run in its own process: layers on the CPU, moved to the GPU per forward by accelerate."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cuda = torch.cuda.is_available()
    config = AutoConfig.from_pretrained(directory)
    if cuda:
        from accelerate import init_empty_weights

        with init_empty_weights():
            skeleton = AutoModelForCausalLM.from_config(config)
        device_map = {f"model.{name}": 0 for name, _ in skeleton.model.named_children() if name != "layers"}
        device_map.update({f"model.layers.{i}": "cpu" for i in range(config.num_hidden_layers)})
        device_map["lm_head"] = 0
        del skeleton
    load = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16,
                                                 device_map=device_map if cuda else None).eval()
    load = time.perf_counter() - load
    device = "cuda" if cuda else "cpu"
    rows = []
    for batch in batches:
        ids = torch.tensor(prompts_of(batch, prompt_len, config.vocab_size), device=device)

        def generate(n):
            with torch.no_grad():
                model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
            if cuda:
                torch.cuda.synchronize()

        generate(2)
        prefill = timed(lambda: generate(1))
        total = timed(lambda: generate(new_tokens))
        rows.append({"batch": batch, "decode_tok_s": batch * (new_tokens - 1) / (total - prefill),
                     "prefill_s": prefill})
    out.write_text(json.dumps({
        "what": ("transformers + accelerate CPU offload (embedding and head on cuda:0, every layer on the CPU)"
                 if cuda else "transformers on the CPU, no offload (no GPU here)"),
        "load_s": load, "batches": rows, "new_tokens": new_tokens,
        "peak_gpu_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        "torch": torch.__version__}))


def claim(results: dict) -> None:
    """The seed's figure beside the bound: a decode step at batch 1 moves every weight once."""
    big = mtijax.preset("gemma3-27b")
    model_bytes = 2 * big.num_params
    nvme = SEED_CLAIM["nvme_gbps"] * 1e9
    out = {"seed": SEED_CLAIM, "gemma3_27b_bf16_bytes": model_bytes,
           "bound_tok_s_batch1_nvme": nvme / model_bytes,
           "bandwidth_needed_gbps_for_claim": [t * model_bytes / 1e9 for t in SEED_CLAIM["tok_s"]],
           "claim_over_bound": [t / (nvme / model_bytes) for t in SEED_CLAIM["tok_s"]],
           "batch_for_15_tok_s_from_nvme": math.ceil(15 / (nvme / model_bytes))}
    bw = results.get("bandwidth", {})
    if "pinned_to_device_gbps" in bw:
        out["bound_tok_s_batch1_from_host_ram"] = bw["pinned_to_device_gbps"] * 1e9 / model_bytes
    stream_rows = results.get("stream", {}).get("batches", [])
    if stream_rows:
        out["measured_effective_gbps"] = stream_rows[0]["effective_gbps"]
        out["extrapolated_27b_tok_s_batch1"] = stream_rows[0]["effective_gbps"] * 1e9 / model_bytes
    results["claim"] = out


def extrapolate(results: dict) -> None:
    """Per-pass figures of the reduced model scaled to Gemma 3 12B's 48 layers (linear in layers)."""
    s = results.get("stream", {})
    if not s.get("batches"):
        return
    scale = FULL_GEMMA_LAYERS / s["layers"]
    results["extrapolated_48_layers"] = {
        "note": f"measured with {s['layers']} of 48 layers; per-pass times x {scale:g}",
        "decode_tok_s": {row["batch"]: row["batch"] / (row["decode_step_s"] * scale) for row in s["batches"]},
        "bytes_per_pass": s["layer_bytes"] * FULL_GEMMA_LAYERS}


def selection(args, results: dict) -> None:
    """Perplexity cost against bytes saved, on the embedded Gemma 3 270M (real weights) and a held-out text."""
    from mtijax.tokenizer import load_gguf_tokenizer

    with StreamedModel("gemma3-270m", "float32", host_cache_layers=None, prefetch=2) as model:
        ids = load_gguf_tokenizer(model.store.source)(HELD_OUT)["input_ids"]
        n = model.config.num_layers
        rule = KeywordSectors()
        prompts = {"keyword: no keyword": "Hello there", "keyword: Pillar ('what')": "What is the capital of Peru?",
                   "keyword: Bridge ('explain')": "Explain how a lighthouse works",
                   "keyword: Ghost ('story')": "Tell me a story about the sea",
                   "keyword: Pillar + Ghost": "What would you imagine at sea?"}
        selections = {name: rule.select(prompt, n) for name, prompt in prompts.items()}
        selections.update({f"skip layer {l}": [i for i in range(n) if i != l] for l in range(n)})
        selections.update({"first half": list(range(n // 2)), "every other layer": list(range(0, n, 2)),
                           f"skip last {n // 4}": list(range(n - n // 4))})
        rows = selection_study(model, ids, selections)
        # the same budgets as the keyword rule's, spent on the layers whose single skip cost least
        single = sorted(range(n), key=lambda l: next(r.nll_increase for r in rows if r.name == f"skip layer {l}"))
        budgets = sorted({len(layers) for name, layers in selections.items() if name.startswith("keyword")})
        cheapest = {f"cheapest skips: {k} layers": sorted(set(range(n)) - set(single[: n - k])) for k in budgets}
        rows += selection_study(model, ids, cheapest)[1:]
    results["selection"] = {"model": "gemma3-270m (embedded GGUF, Q4_K_M dequantised to float32)",
                            "held_out_tokens": len(ids),
                            "rows": [dataclasses.asdict(r) for r in rows]}
    for r in rows:
        print(f"  {r.name:32s} layers {len(r.layers):2d}  ppl {r.perplexity:10.2f}  +nll {r.nll_increase:7.3f}  "
              f"saved {100 * r.bytes_saved:4.0f}%")
    write(results, args)


# --- output --------------------------------------------------------------------------------------------------------

def write(results: dict, args) -> None:
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1, default=str))


def plots(results: dict, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stem = Path(args.out).with_suffix("")
    s = results.get("stream", {})
    if s.get("batches"):
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        batches = [r["batch"] for r in s["batches"]]
        ax.plot(batches, [r["decode_tok_s"] for r in s["batches"]], "o-", label="mtijax streamed (host cache)")
        same = results.get("resident", {}).get("same_step_batches")
        if same:
            ax.plot(batches, [r["decode_tok_s"] for r in same], "s--", label="all layers on the device")
        peer_rows = results.get("peer", {}).get("batches")
        if peer_rows:
            ax.plot([r["batch"] for r in peer_rows], [r["decode_tok_s"] for r in peer_rows], "^:",
                    label=results["peer"]["what"].split(" (")[0])
        shapes = "tiny shapes (--quick)" if results["quick"] else "Gemma 3 12B shapes"
        ax.set(xscale="log", yscale="log", xlabel="batch", ylabel="decode tokens/s",
               title=f"{shapes}, {s['layers']} layers, {results['device']}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(f"{stem}_throughput.png", dpi=120)
        plt.close(fig)
    if s.get("prefetch") and "compute_only_pass_s" in s:
        fig, ax = plt.subplots(figsize=(5.5, 3.5))
        labels = [f"prefetch {r['prefetch']}" for r in s["prefetch"]] + ["compute only", "transfer only"]
        values = [r["decode_pass_s"] for r in s["prefetch"]] + [s["compute_only_pass_s"], s["transfer_only_pass_s"]]
        ax.bar(labels, [1e3 * v for v in values], color=["C0"] * len(s["prefetch"]) + ["C2", "C1"])
        ax.set(ylabel="decode pass (ms)", title="transfer/compute overlap, batch 1")
        fig.tight_layout()
        fig.savefig(f"{stem}_overlap.png", dpi=120)
        plt.close(fig)
    sel = results.get("selection", {}).get("rows")
    if sel:
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        kinds = {"keyword": ("o", "C3", "the original's keyword rule"),
                 "cheapest": ("D", "C2", "same budget, cheapest single skips"),
                 "skip layer": ("x", "C0", "one layer skipped"), "": ("s", "C7", "other selections")}
        seen = set()
        for r in sel:
            kind = next(k for k in kinds if r["name"].startswith(k))
            marker, color, label = kinds[kind]
            ax.plot(100 * r["bytes_saved"], r["nll_increase"], marker, color=color,
                    label=None if kind in seen else label)
            seen.add(kind)
        ax.legend(fontsize=7)
        ax.set(xlabel="layer bytes not streamed (%)", ylabel="increase in NLL (nats/token)", yscale="symlog",
               title="layer selection on held-out text (Gemma 3 270M)")
        fig.tight_layout()
        fig.savefig(f"{stem}_selection.png", dpi=120)
        plt.close(fig)


def int_list(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="experiments/results/bench_stream.json")
    parser.add_argument("--quick", action="store_true", help="tiny shapes for a CPU smoke test")
    parser.add_argument("--layers", type=int, default=None, help="Gemma 3 12B layers written (default 12; quick 4)")
    parser.add_argument("--olmoe-layers", type=int, default=None, help="OLMoE layers written (default 4; quick 2)")
    parser.add_argument("--batches", type=int_list, default=[1, 8, 64])
    parser.add_argument("--olmoe-batches", type=int_list, default=[1, 8])
    parser.add_argument("--peer-batches", type=int_list, default=[1, 8])
    parser.add_argument("--prompt-len", type=int, default=None, help="default 64 (quick 16)")
    parser.add_argument("--new-tokens", type=int, default=None, help="default 8 (quick 4)")
    parser.add_argument("--peer-new-tokens", type=int, default=4)
    parser.add_argument("--peer-timeout", type=float, default=120)
    parser.add_argument("--sections", default="bandwidth,stream,olmoe,peer,resident",
                        help="comma-separated, run in this order: selection,bandwidth,stream,olmoe,peer,resident")
    parser.add_argument("--budget-s", type=float, default=150,
                        help="sections after this many seconds are skipped (and listed as skipped)")
    parser.add_argument("--workdir", default=None, help="where the checkpoints are written (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the written checkpoints")
    parser.add_argument("--peer", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--peer-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.layers = args.layers or (4 if args.quick else 12)
    args.olmoe_layers = args.olmoe_layers or (2 if args.quick else 4)
    args.prompt_len = args.prompt_len or (16 if args.quick else 64)
    args.new_tokens = args.new_tokens or (4 if args.quick else 8)
    if args.peer:
        run_peer(Path(args.peer), args.peer_batches, args.prompt_len, args.peer_new_tokens, Path(args.peer_out))
        return
    sections = set(args.sections.split(","))
    start = args.start = time.perf_counter()
    device = jax.devices()[0]
    results = {"device": device.device_kind, "platform": device.platform, "jax": jax.__version__,
               "python": platform.python_version(), "quick": args.quick, "sections": sorted(sections)}
    if "selection" in sections:
        selection(args, results)
    gemma, moe = configs(args)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="mtijax-bench-stream-"))

    def time_left(section: str) -> bool:
        if section not in sections:
            return False
        if time.perf_counter() - start < args.budget_s:
            return True
        results.setdefault("skipped", []).append(f"{section}: past the --budget-s of {args.budget_s} s")
        return False

    try:
        if sections & {"bandwidth", "stream", "resident", "peer"}:
            results["gemma"] = {"config": dataclasses.asdict(gemma), "layers_of_48": args.layers}
            write_s = timed(lambda: write_random_checkpoint(gemma, workdir / "gemma", progress=True))
            size = sum(f.stat().st_size for f in (workdir / "gemma").glob("*.safetensors"))
            results["gemma"]["write"] = {"bytes": size, "seconds": write_s, "gbps": size / write_s / 1e9}
            print(f"wrote {format_bytes(size)} in {write_s:.1f} s")
            layer_bytes = LayerStore(workdir / "gemma", "bfloat16").layer_nbytes
            results["bandwidth"] = bandwidth(layer_bytes, args.layers)
            print(f"bandwidth: {json.dumps({k: round(v, 3) for k, v in results['bandwidth'].items()})}")
            write(results, args)
            if time_left("stream"):
                stream(workdir / "gemma", args, results["bandwidth"], results)
        if time_left("olmoe"):
            write_random_checkpoint(moe, workdir / "olmoe", progress=True)
            results["olmoe_config"] = dataclasses.asdict(moe)
            olmoe(workdir / "olmoe", args, results)
            shutil.rmtree(workdir / "olmoe", ignore_errors=True)
        if time_left("peer"):
            args.peer_timeout = min(args.peer_timeout, max(30, args.budget_s + 55 - (time.perf_counter() - start)))
            peer(workdir / "gemma", args, results)
        if time_left("resident"):
            resident(workdir / "gemma", args, results)
        claim(results)
        extrapolate(results)
    finally:
        results["wall_s"] = time.perf_counter() - start
        write(results, args)
        plots(results, args)
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"done in {results['wall_s']:.0f} s; results in {args.out}")


if __name__ == "__main__":
    main()
