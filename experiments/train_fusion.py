"""Seed 002's fusion layers on the embedded Gemma 3 270M: parameter counts, forward overhead, training, generation.

1. Parameter count of each preset at this model's width, beside the seed's (~100K / ~500K / ~1M) and
   at GPT-2's width (768, the original's target).
2. Forward-time overhead of each preset (random-init fusion params) against the base model, measured in
   the same run on the same tokens: jitted forward to logits, median of interleaved repeats after compiling
   (the seed claims +5 / +15 / +25%); beside each, the same layer positions with identity transforms, which
   isolates the cost of splitting the layer scan from the fusion layers' own work.
3. Training the standard preset (3 positions: prime, quaternion, Kuramoto, gate) with the frozen base on
   CPython's ``pydoc_data.topics`` (the Python Language Reference topics that ship with every CPython;
   every fifth topic held out), reporting held-out perplexity of the base, of the fused model before
   training and after, and the loss curve; the checkpoint goes to ``--checkpoint``. Then a control: the
   same positions, norm, blend and ``W_o`` with no resonance component (a plain linear adapter), trained
   the same way, to tell what the resonance components add to a trained adapter.
4. A stability-aware generation with the trained layers (auto-temperature), its trace plotted.

    python experiments/train_fusion.py [--steps 100] [--quick] [--no-control] [--out DIR] [--checkpoint DIR|'']

Writes ``results.json``, ``loss_curve.png``, ``loss_curve_control.png``, ``stability_trace.png`` under ``--out``
(default ``experiments/results/train_fusion``).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp

import mtijax
import mtijax.fusion as fusion_lib

SEED_CLAIMS = {"minimal": {"parameters": "~100K", "forward_time": "+5%"},
               "standard": {"parameters": "~500K", "forward_time": "+15%"},
               "full": {"parameters": "~1M", "forward_time": "+25%"}}
PROMPT = "In Python, a decorator is"
ROOT = Path(__file__).parent


def parameter_counts(config) -> dict:
    """Each preset's trained parameters at this model's width and at GPT-2's (12 layers, 768 wide)."""
    rows = {}
    for preset in fusion_lib.PRESETS:
        here = fusion_lib.for_model(config, preset)
        gpt2 = getattr(fusion_lib.FusionConfig, preset)(12)
        rows[preset] = {"positions": list(here.positions), "components": list(here.components),
                        "parameters": fusion_lib.param_count(here, config.hidden_size),
                        "parameters_at_768_wide": fusion_lib.param_count(gpt2, 768),
                        "seed_claim": SEED_CLAIMS[preset]["parameters"]}
    return rows


def forward_overhead(model, tokens, repeats: int) -> dict:
    """Median seconds of a jitted forward to logits: the base model, each preset, and each preset's positions with
    identity transforms (what splitting the layer scan at the fused layers costs by itself), interleaved."""
    config = model.config
    base = jax.jit(lambda params, t: mtijax.forward(config, params, t).logits)
    variants = {"base": (lambda: base(model.params, tokens))}
    for preset in fusion_lib.PRESETS:
        fusion = fusion_lib.for_model(config, preset)
        variables = fusion_lib.init_fusion(fusion, config, jax.random.key(1))
        fused = jax.jit(lambda params, v, t, fusion=fusion:
                        fusion_lib.fused_forward(config, params, fusion, v, t).logits)
        split = jax.jit(lambda params, t, positions=fusion.positions: mtijax.forward(
            config, params, t, transforms={p: (lambda h, _: h) for p in positions}).logits)
        variants[preset] = (lambda fused=fused, variables=variables: fused(model.params, variables, tokens))
        variants[f"{preset} positions, identity"] = (lambda split=split: split(model.params, tokens))
    for run in variants.values():  # compile
        run().block_until_ready()
    times = {name: [] for name in variants}
    for _ in range(repeats):
        for name, run in variants.items():
            tick = time.perf_counter()
            run().block_until_ready()
            times[name].append(time.perf_counter() - tick)
    base_median = statistics.median(times["base"])
    return {name: {"median_seconds": statistics.median(t), "all_seconds": t,
                   "overhead_vs_base": statistics.median(t) / base_median - 1.0,
                   "seed_claim": SEED_CLAIMS.get(name, {}).get("forward_time")} for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--held-out-windows", type=int, default=16)
    parser.add_argument("--eval-every", type=int, default=20, help="held-out perplexity every N training steps")
    parser.add_argument("--overhead-batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="timed forward passes per variant")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--no-control", action="store_true", help="skip training the linear-adapter control")
    parser.add_argument("--quick", action="store_true", help="a few steps and windows: checks the script runs")
    parser.add_argument("--out", default=str(ROOT / "results" / "train_fusion"))
    parser.add_argument("--checkpoint", default=str(ROOT.parent / "checkpoints" / "gemma3-270m-standard"),
                        help="where the trained checkpoint goes ('' for a temporary directory)")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.held_out_windows, args.repeats, args.max_new_tokens, args.warmup, args.eval_every = \
            3, 2, 2, 4, 1, 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    tick = time.perf_counter()
    model = mtijax.load("gemma3-270m")
    load_seconds = time.perf_counter() - tick
    config = model.config
    encode = lambda text: model.tokenizer(text, add_special_tokens=False)["input_ids"]
    corpus = fusion_lib.load_corpus(encode, args.seq_len, config.bos_token_id, held_out_windows=args.held_out_windows)

    counts = parameter_counts(config)
    for preset, row in counts.items():
        print(f"{preset:>8}: {row['parameters']:>9,} params at layers {row['positions']} "
              f"({row['parameters_at_768_wide']:,} at 768 wide; seed: {row['seed_claim']})")

    tokens = jnp.asarray(corpus.held_out[:args.overhead_batch])
    overhead = forward_overhead(model, tokens, args.repeats)
    for name, row in overhead.items():
        print(f"forward {name:>28}: {row['median_seconds'] * 1e3:8.1f} ms  overhead {row['overhead_vs_base']:+.1%}"
              f"{'  (seed: ' + row['seed_claim'] + ')' if row['seed_claim'] else ''}")

    fusion = fusion_lib.for_model(config, "standard")
    train = fusion_lib.TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                                   learning_rate=args.learning_rate, warmup_steps=args.warmup)
    checkpoint_dir = Path(args.checkpoint) if args.checkpoint else Path(tempfile.mkdtemp()) / "ckpt"
    report = fusion_lib.fit(config, model.params, fusion, train, corpus, checkpoint_dir, model_name="gemma3-270m",
                            eval_every=args.eval_every, include_optimizer=False)
    shutil.copy(checkpoint_dir / "loss_curve.png", out / "loss_curve.png")
    control_report = None
    if not args.no_control:  # the same positions, norm, blend and W_o, without any resonance component
        control = fusion.replace(components=())
        control_dir = Path(tempfile.mkdtemp()) / "control"
        control_report = fusion_lib.fit(config, model.params, control, train, corpus, control_dir,
                                        eval_every=args.eval_every, include_optimizer=False)
        shutil.copy(control_dir / "loss_curve.png", out / "loss_curve_control.png")

    variables = fusion_lib.variables_of(report.state)
    decoding = fusion_lib.Decoding(mtijax.Sampling(0.8, top_p=0.95), auto_temperature=True)
    generation = fusion_lib.generate_fused(config, model.params, fusion, variables,
                                           [model.tokenizer(PROMPT)["input_ids"]], args.max_new_tokens,
                                           decoding=decoding, seed=0)
    generation.trace.plot(str(out / "stability_trace.png"), title=f"trained standard preset: {PROMPT!r}")
    text = model.tokenizer.decode(generation.ids(0), skip_special_tokens=True)
    print(f"{PROMPT!r} -> {text!r}")

    results = {
        "model": model.source, "device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
        "jax": jax.__version__, "machine": platform.machine(), "quick": args.quick,
        "load_seconds": load_seconds, "parameter_counts": counts,
        "forward_overhead": {"tokens": list(tokens.shape), "repeats": args.repeats, "variants": overhead},
        "training": {"fusion": fusion.to_json(), "train": train.to_json(), "evaluation": report.evaluation,
                     "final": report.history[-1], "history": report.history,
                     "checkpoint": str(checkpoint_dir) if args.checkpoint else None},
        "control": None if control_report is None else {
            "what": "the standard preset's positions, norm, blend and W_o with no resonance component: a plain "
                    "linear adapter (1 - s) h + s W_o LayerNorm(h), trained identically",
            "parameters": control_report.evaluation["parameters"], "evaluation": control_report.evaluation,
            "history": control_report.history},
        "generation": {"prompt": PROMPT, "text": text, "ids": generation.ids(0), "trace": generation.trace.row(0),
                       "sampling": "auto-temperature from 0.8, top-p 0.95, seed 0"},
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    e = report.evaluation
    print(f"held-out perplexity ({e['held_out_tokens']} tokens): base {e['perplexity_base']:.3f}, fused before "
          f"{e['perplexity_fused_before']:.3f}, after {args.steps} steps {e['perplexity_fused_after']:.3f}")
    if control_report is not None:
        c = control_report.evaluation
        print(f"control (linear adapter, {c['parameters']:,} params): before {c['perplexity_fused_before']:.3f}, "
              f"after {c['perplexity_fused_after']:.3f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
