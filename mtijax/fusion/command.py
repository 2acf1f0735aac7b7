"""``mtijax fuse``: train fusion layers on a frozen model, generate with them, export them.

    mtijax fuse train --out DIR [--model M] [--preset minimal|standard|full] [--positions 6,12,17]
                      [--components prime,kuramoto,...] [--mode residual] [--norm fusion] [--text FILE]
                      [--steps N] [--batch-size B] [--seq-len S] [--learning-rate LR] [--warmup N] [--seed S]
                      [--held-out-windows N] [--save-every N] [--resume] [--json]
    mtijax fuse generate --checkpoint DIR [--model M] [--auto-temperature] [--stop-on-instability]
                      [--temperature T] [--top-k K] [--top-p P] [--max-new-tokens N] [--seed S]
                      [--token-ids 5,17,9] [--trace-png FILE] [--json] [PROMPT]
    mtijax fuse export --checkpoint DIR --out FILE.safetensors

``generate`` prints one line per generated token with the stability readings (prime entropy ``S``,
Lyapunov estimate ``lambda``, gate coherence ``C``, Kuramoto order ``r``, the temperature, stable or
not), then the text. The base model defaults to the one the checkpoint was trained on.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from mtijax.arguments import (MODEL_HELP, VERBOSE_HELP, add_sampling, check_prompt_choice, encode_prompt, non_negative,
                              positive, token_ids)
from mtijax.errors import MtijaxError


def _csv(kind):
    def parse(text: str) -> list:
        try:
            return [kind(t.strip()) for t in text.split(",") if t.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}") from None
    return parse


def add_parser(commands: Any) -> None:
    """Add ``fuse`` and its subcommands to the ``mtijax`` subparsers."""
    fuse = commands.add_parser("fuse", help="resonance fusion layers on a frozen model: train, generate, export")
    sub = fuse.add_subparsers(dest="fuse_command", required=True, parser_class=type(fuse))

    tr = sub.add_parser("train", help="train fusion layers (the base model stays frozen)")
    tr.add_argument("--out", required=True, help="checkpoint directory (orbax state, fusion.json, loss_curve.png)")
    tr.add_argument("--model", default=None, help=MODEL_HELP + " (default: gemma3-270m)")
    tr.add_argument("--preset", choices=("minimal", "standard", "full"), default="standard",
                    help="fused layers and components")
    tr.add_argument("--positions", type=_csv(int), default=None, help="fused layers (default: the preset's)")
    tr.add_argument("--components", type=_csv(str), default=None, help="components (default: the preset's)")
    tr.add_argument("--mode", choices=("parallel", "sequential", "residual"), default=None,
                    help="how the fusion output joins the layer's (default: the preset's)")
    tr.add_argument("--norm", choices=("output", "fusion", "none"), default=None,
                    help="where the fusion layer normalises (default: the preset's)")
    tr.add_argument("--text", default=None, help="UTF-8 training text (default: Python's reference topics)")
    tr.add_argument("--steps", type=positive(int), default=100, help="optimiser steps")
    tr.add_argument("--batch-size", type=positive(int), default=2, help="windows per step")
    tr.add_argument("--seq-len", type=positive(int), default=128, help="tokens per window")
    tr.add_argument("--learning-rate", type=positive(float), default=1e-3, help="peak learning rate")
    tr.add_argument("--warmup", type=non_negative(int), default=None,
                    help="linear warmup steps, fewer than --steps (default: a tenth of --steps, at most 10)")
    tr.add_argument("--seed", type=int, default=0, help="seed of the fusion params' initialisation")
    tr.add_argument("--held-out-windows", type=positive(int), default=16, help="held-out windows for perplexity")
    tr.add_argument("--save-every", type=non_negative(int), default=0,
                    help="also checkpoint every N steps (0: at the end only)")
    tr.add_argument("--eval-every", type=non_negative(int), default=0,
                    help="held-out perplexity every N steps (0: before and after only)")
    tr.add_argument("--resume", action="store_true", help="continue the checkpoint in --out")
    tr.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    tr.add_argument("--json", action="store_true", help="print the evaluation as one JSON object")
    tr.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)

    gen = sub.add_parser("generate", help="generate with trained fusion layers, printing stability per step")
    gen.add_argument("prompt", nargs="?", help="prompt text (or use --token-ids)")
    gen.add_argument("--checkpoint", required=True, help="a directory written by 'mtijax fuse train'")
    gen.add_argument("--model", default=None, help=MODEL_HELP + " (default: the checkpoint's)")
    gen.add_argument("--token-ids", type=token_ids, default=None, help="comma-separated prompt token ids")
    gen.add_argument("--max-new-tokens", type=positive(int), default=32,
                     help="most tokens to generate; the prompt plus these must fit the model's context")
    add_sampling(gen, temperature_help="sampling temperature, a finite number >= 0; 0 is greedy; with "
                                       "--auto-temperature the starting temperature (greedy starts at 0.8)")
    gen.add_argument("--auto-temperature", action="store_true", help="temperature from the stability readings")
    gen.add_argument("--stop-on-instability", action="store_true", help="stop when the Lyapunov estimate > 0.1")
    gen.add_argument("--trace-png", default=None, help="plot the stability trace to this PNG")
    gen.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    gen.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    gen.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)

    ex = sub.add_parser("export", help="write a checkpoint's fusion params as one safetensors file")
    ex.add_argument("--checkpoint", required=True, help="a directory written by 'mtijax fuse train'")
    ex.add_argument("--out", required=True, help="the .safetensors file to write")


def run(args: argparse.Namespace) -> None:
    """Run ``mtijax fuse <command>``."""
    {"train": _train, "generate": _generate, "export": _export}[args.fuse_command](args)


def _train(args: argparse.Namespace) -> None:
    """Check the flags, the fusion config against the model's config and the corpus, then read the weights
    and train."""
    from mtijax import progress
    from mtijax.api import open_checkpoint
    from mtijax.fusion import checkpoint as fusion_checkpoint
    from mtijax.fusion.config import for_model
    from mtijax.fusion.pipeline import fit, load_corpus
    from mtijax.fusion.training import TrainConfig
    from mtijax.preflight import check_output_dir

    if args.warmup is not None and args.warmup >= args.steps:
        raise MtijaxError(f"--warmup {args.warmup} must be below --steps {args.steps}: lower --warmup, or leave it "
                          "out for a tenth of the run")
    check_output_dir(args.out)
    if args.resume:
        fusion_checkpoint.read_meta(args.out)
    if args.text is not None and not os.path.isfile(args.text):
        raise MtijaxError(f"--text {args.text}: no such file")
    train = TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                        learning_rate=args.learning_rate, warmup_steps=args.warmup, seed=args.seed)
    show = progress.wanted(args.json, args.verbose)
    base = open_checkpoint(args.model)
    changes = {k: v for k, v in (("positions", args.positions), ("components", args.components),
                                 ("mode", args.mode), ("norm", args.norm)) if v is not None}
    fusion = for_model(base.config, args.preset, **changes)
    tokenizer = base.tokenizer(show)
    if tokenizer is None:
        raise MtijaxError(f"{base.path} has no tokenizer, which training on text needs")
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
    corpus = load_corpus(encode, args.seq_len, base.config.bos_token_id, text_file=args.text,
                         held_out_windows=args.held_out_windows)
    model = base.load(args.dtype, tokenizer=tokenizer, progress=show)
    log = (lambda line: print(line, file=sys.stderr)) if args.json else print
    report = fit(model.config, model.params, fusion, train, corpus, args.out, resume=args.resume,
                 model_name=args.model or "gemma3-270m", save_every=args.save_every, eval_every=args.eval_every,
                 progress=show, log=log)
    if args.json:
        print(json.dumps({**report.evaluation, "final_loss": report.history[-1]["loss"], "checkpoint": args.out}))
    else:
        print(f"checkpoint written to {args.out}")


def _generate(args: argparse.Namespace) -> None:
    """Check the flags, the checkpoint against the base model's config and the prompt, then read the weights and
    generate."""
    from mtijax import progress
    from mtijax.api import open_checkpoint
    from mtijax.fusion import checkpoint
    from mtijax.fusion.decode import Decoding, generate_fused, stream_fused
    from mtijax.generate import Sampling
    from mtijax.preflight import check_output_file, check_prompts
    from mtijax.special_tokens import text_decoder

    check_prompt_choice(args.prompt, args.token_ids)
    if args.trace_png:
        check_output_file(args.trace_png, "--trace-png")
    decoding = Decoding(Sampling(args.temperature, args.top_k, args.top_p), args.auto_temperature,
                        args.stop_on_instability)
    show = progress.wanted(args.json, args.verbose)
    meta = checkpoint.read_meta(args.checkpoint)
    base = open_checkpoint(args.model or meta["base"].get("model"))
    restored = checkpoint.restore(args.checkpoint, base.config)
    tokenizer = base.tokenizer(show) if args.token_ids is None else None
    prompt_ids = encode_prompt(tokenizer, base.path, args.prompt, args.token_ids)
    check_prompts(base.config, [prompt_ids], base.context_source, args.max_new_tokens)
    model = base.load(args.dtype, tokenizer=tokenizer, progress=show)
    decode = text_decoder(tokenizer, model.suppress_ids) if tokenizer is not None else None
    if args.json or args.trace_png:
        result = generate_fused(model.config, model.params, restored.fusion, restored.variables, [prompt_ids],
                                args.max_new_tokens, decoding=decoding, seed=args.seed,
                                suppress_ids=model.suppress_ids)
        ids = result.ids(0)
        if args.trace_png:
            result.trace.plot(args.trace_png, title=f"fusion stability: {args.prompt or prompt_ids}")
        if args.json:
            print(json.dumps({"prompt_ids": list(prompt_ids), "ids": ids, "text": decode(ids) if decode else "",
                              "unstable": bool(result.unstable[0]), "trace": result.trace.row(0)}))
            return
        _print_steps(result.trace.row(0), ids, decode)
        return
    ids: list[int] = []
    print(f"{'step':>4}  {'token':<16} {'S':>6} {'lambda':>8} {'C':>6} {'r':>6} {'T':>6}  stable")
    for index, report in enumerate(stream_fused(model.config, model.params, restored.fusion, restored.variables,
                                                [prompt_ids], args.max_new_tokens, decoding=decoding,
                                                seed=args.seed, suppress_ids=model.suppress_ids)):
        reading = {k: float(v[0]) for k, v in report.reading.items()}
        token = int(report.tokens[0])
        text = repr(decode([token]) if decode else str(token)) if report.emitted[0] else "(stopped)"
        if report.emitted[0]:
            ids.append(token)
        print(f"{index:>4}  {text:<16} {reading['entropy']:6.3f} {reading['lyapunov']:+8.4f} "
              f"{reading['coherence']:6.3f} {reading['kuramoto_order']:6.3f} {reading['temperature']:6.3f}  "
              f"{'yes' if reading['stable'] else 'no'}", flush=True)
        if report.unstable[0]:
            print("stopped: the Lyapunov estimate exceeded the threshold")
    stops = set(model.config.eos_token_ids)
    ids = ids[:-1] if ids and ids[-1] in stops else ids
    print(decode(ids) if decode else " ".join(map(str, ids)))


def _print_steps(trace: dict[str, list], ids: list[int], decode) -> None:
    print(f"{'step':>4} {'S':>6} {'lambda':>8} {'C':>6} {'r':>6} {'T':>6}  stable")
    for i in range(len(trace["entropy"])):
        print(f"{i:>4} {trace['entropy'][i]:6.3f} {trace['lyapunov'][i]:+8.4f} {trace['coherence'][i]:6.3f} "
              f"{trace['kuramoto_order'][i]:6.3f} {trace['temperature'][i]:6.3f}  "
              f"{'yes' if trace['stable'][i] else 'no'}")
    print(decode(ids) if decode else " ".join(map(str, ids)))


def _export(args: argparse.Namespace) -> None:
    from mtijax.fusion import checkpoint
    from mtijax.preflight import check_output_file

    check_output_file(args.out)
    restored = checkpoint.restore(args.checkpoint)
    path = checkpoint.export_safetensors(args.out, restored.variables, restored.fusion,
                                         int(restored.meta["base"]["hidden_size"]))
    print(f"wrote {path}")
