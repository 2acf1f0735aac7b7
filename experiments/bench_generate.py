"""Prefill and decode throughput of mtijax against Hugging Face transformers on the same GPU.

For each model (random weights in the real Gemma 3 or OLMoE shapes, bfloat16) and
batch size, both implementations process the same prompt length and generate
the same number of new tokens, greedy, without early stopping:

* prefill tok/s: batch x prompt tokens / time of a 1-token generation;
* decode tok/s: batch x (N - 1) / (time of an N-token generation - prefill time);
* for mtijax, ``mtijax.generate`` (steps dispatched without waiting) and
  ``mtijax.generate_stream`` (the host reads every token as it comes);
* the bandwidth bound: a decode step must read every weight it uses (the
  embedding too, for the logits; for OLMoE only the experts the batch is
  routed to) and the live KV cache once, so
  ``bound tok/s = batch / (bytes per step / copy bandwidth)``, with the copy
  bandwidth measured in the same run (device-to-device copy, bytes read +
  written). ``fraction`` = measured / bound.

Run on the GPU machine::

    XLA_PYTHON_CLIENT_PREALLOCATE=false python experiments/bench_generate.py --out experiments/results/x.json
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

import mtijax


def copy_bandwidth(gib: float = 2.0) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write), best of 10, via torch."""
    import torch

    n = int(gib * 2**30) // 2
    src = torch.empty(n, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(12):
        torch.cuda.synchronize()
        start = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n * 2 / best


def timed(fn, repeats: int) -> float:
    """Best wall time of ``fn()`` over ``repeats`` runs after one warm-up (fn must block until done)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def bytes_per_decode_step(config: mtijax.ModelConfig, batch: int, context: int) -> float:
    """bfloat16 bytes a decode step must read: the weights it uses + the KV cache of every layer up to ``context``.

    For OLMoE only the experts the batch routes to are read: with ``k`` of
    ``E`` experts per token chosen independently, ``E * (1 - (1 - k/E) ** batch)``
    distinct experts per layer are expected.
    """
    cache = 2 * config.num_layers * batch * context * config.num_kv_heads * config.head_dim
    weights = config.num_params
    if isinstance(config, mtijax.OlmoeConfig):
        e, k = config.num_experts, config.num_experts_per_tok
        expert = 3 * config.hidden_size * config.intermediate_size
        used = e * (1 - (1 - k / e) ** batch)
        weights -= config.num_layers * (e - used) * expert
    return 2 * (weights + cache)


def bench_mtijax(config, batch: int, prompt_len: int, new_tokens: int, repeats: int) -> dict:
    params = mtijax.init_params(config, jax.random.key(0), jnp.bfloat16)
    prompts = np.random.default_rng(0).integers(3, config.vocab_size, (batch, prompt_len)).tolist()

    def run(n):
        return lambda: mtijax.generate(config, params, prompts, n, stop_ids=()).tokens

    prefill = timed(run(1), repeats)
    total = timed(run(new_tokens), repeats)

    def stream():
        for _ in mtijax.generate_stream(config, params, prompts, new_tokens, stop_ids=()):
            pass

    stream_total = timed(stream, 1)
    del params
    gc.collect()
    return {
        "prefill_tok_s": batch * prompt_len / prefill,
        "decode_tok_s": batch * (new_tokens - 1) / (total - prefill),
        "stream_decode_tok_s": batch * (new_tokens - 1) / (stream_total - prefill),
    }


def bench_transformers(config, batch: int, prompt_len: int, new_tokens: int, repeats: int) -> dict:
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, OlmoeConfig, OlmoeForCausalLM

    if isinstance(config, mtijax.OlmoeConfig):
        model_class = OlmoeForCausalLM
        hf_config = OlmoeConfig(
            vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
            num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
            num_key_value_heads=config.num_kv_heads, num_experts=config.num_experts,
            num_experts_per_tok=config.num_experts_per_tok, norm_topk_prob=config.norm_topk_prob,
            max_position_embeddings=config.max_position_embeddings)
    else:
        model_class = Gemma3ForCausalLM
        hf_config = Gemma3TextConfig(
            vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
            num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
            num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim,
            query_pre_attn_scalar=config.query_pre_attn_scalar, sliding_window=config.sliding_window,
            layer_types=list(config.layer_types), max_position_embeddings=config.max_position_embeddings)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = model_class(hf_config).eval()
    torch.set_default_dtype(torch.float32)
    ids = torch.randint(3, config.vocab_size, (batch, prompt_len), device="cuda")

    def run(n):
        def go():
            with torch.no_grad():
                model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
            torch.cuda.synchronize()
        return go

    prefill = timed(run(1), repeats)
    total = timed(run(new_tokens), repeats)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return {"prefill_tok_s": batch * prompt_len / prefill, "decode_tok_s": batch * (new_tokens - 1) / (total - prefill)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="gemma3-270m,gemma3-1b,gemma3-12b,olmoe-1b-7b")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import torch
    import transformers

    bandwidth = copy_bandwidth()
    device = jax.devices()[0]
    report = {
        "device": getattr(device, "device_kind", str(device)),
        "jax": jax.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "copy_bandwidth_GBps": bandwidth / 1e9,
        "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "dtype": "bfloat16", "runs": [],
    }
    print(f"{report['device']}: copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    header = f"{'model':<12}{'batch':>6}{'prefill':>10}{'decode':>9}{'stream':>9}{'hf pre':>9}{'hf dec':>9}" \
             f"{'x hf':>7}{'bound':>8}{'% bound':>9}"
    print(header)
    batches = [int(b) for b in args.batches.split(",")]
    for size in args.sizes.split(","):
        config = mtijax.preset(size)
        started = time.perf_counter()
        # transformers first, every batch: torch hands its memory back, JAX's allocator keeps what it took
        hf_runs = {batch: {} if args.skip_transformers else bench_transformers(
            config, batch, args.prompt_len, args.new_tokens, max(1, args.repeats - 2)) for batch in batches}
        print(f"  ({size}: transformers took {time.perf_counter() - started:.0f} s)", flush=True)
        for batch in batches:
            started = time.perf_counter()
            hf = hf_runs[batch]
            ours = bench_mtijax(config, batch, args.prompt_len, args.new_tokens, args.repeats)
            print(f"  ({size} batch {batch}: mtijax took {time.perf_counter() - started:.0f} s with its compiles)",
                  flush=True)
            context = args.prompt_len + args.new_tokens // 2
            bound = batch * bandwidth / bytes_per_decode_step(config, batch, context)
            run = {"model": size, "batch": batch, "mtijax": ours, "transformers": hf,
                   "bound_decode_tok_s": bound, "fraction_of_bound": ours["decode_tok_s"] / bound,
                   "decode_speedup_vs_transformers": ours["decode_tok_s"] / hf["decode_tok_s"] if hf else None}
            report["runs"].append(run)
            print(f"{size:<12}{batch:>6}{ours['prefill_tok_s']:>10.0f}{ours['decode_tok_s']:>9.1f}"
                  f"{ours['stream_decode_tok_s']:>9.1f}{hf.get('prefill_tok_s', float('nan')):>9.0f}"
                  f"{hf.get('decode_tok_s', float('nan')):>9.1f}"
                  f"{(run['decode_speedup_vs_transformers'] or float('nan')):>7.1f}{bound:>8.0f}"
                  f"{100 * run['fraction_of_bound']:>8.0f}%", flush=True)
            if args.out:  # after every run, so a cut-off benchmark keeps what it measured
                with open(args.out, "w") as f:
                    json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
