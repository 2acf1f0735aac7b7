"""The ``mtijax`` command: ``generate``, ``info``, and one subcommand per technique (``inject``, ``patch``,
``fuse``, ``snn``; ``generate --stream`` streams the layers from disk).

User errors (bad flags, missing or corrupt files, wrong shapes, unknown
architectures) print one line ``mtijax: error: ...`` on stderr and exit with
status 2, without a traceback. Every check that needs only the flags, the
config or the tokenizer runs before a weight is read (``mtijax.preflight``).
Progress (a bar over the tensors, status lines for the tokenizer and the first
compile) goes to stderr when it is a terminal, unless ``--json`` is given;
``--verbose`` shows it always. Nothing on disk is written except the tokenizer
cache (see ``mtijax.tokenizer``) and the outputs a command is asked for.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from typing import Sequence

from mtijax import progress
from mtijax.arguments import (MODEL_HELP, VERBOSE_HELP, HelpFormatter, add_sampling, check_prompt_choice,
                              encode_prompt, float_list, int_list, positive, token_ids)
from mtijax.errors import MtijaxError
from mtijax.fusion import command as fuse_command
from mtijax.streaming import command as streaming
from mtijax.snn import command as snn_command
from mtijax.patching import command as patch_command

EXIT_USER_ERROR = 2


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors and help that shows every default."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # one line, no usage dump
        raise MtijaxError(message)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for documentation and tests)."""
    parser = _Parser(prog="mtijax", description="Gemma 3 and OLMoE in pure JAX: generate text, inspect "
                     "checkpoints, and run the techniques (injection, activation patching, fusion layers, "
                     "spiking routers, layer streaming).")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    gen = commands.add_parser("generate", help="continue a prompt")
    gen.add_argument("prompt", nargs="?", help="prompt text (or use --token-ids)")
    gen.add_argument("--model", default=None, help=MODEL_HELP + " (default: gemma3-270m)")
    gen.add_argument("--token-ids", type=token_ids, help="comma-separated prompt token ids, instead of text")
    gen.add_argument("--max-new-tokens", type=positive(int), default=32,
                     help="most tokens to generate; the prompt plus these must fit the model's context")
    add_sampling(gen)
    gen.add_argument("--sample-special", action="store_true",
                     help="let sampling pick special tokens (image markers, <unusedN>, pad, BOS, ...), which are "
                          "suppressed by default")
    gen.add_argument("--show-special", action="store_true",
                     help="print special tokens in the text (hidden by default)")
    gen.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    gen.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    gen.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    streaming.add_arguments(gen)

    inj = commands.add_parser("inject", help="blend a resized teacher tensor into a student; sweep the strength")
    inj.add_argument("--student", default=None, help=MODEL_HELP + " (default: gemma3-270m)")
    inj.add_argument("--teacher", default=None, help=MODEL_HELP + " (default: gemma3-270m)")
    inj.add_argument("--tensor", action="append", default=None,
                     help="layer tensor pattern such as attn/q_proj or 'mlp/*' (repeatable; default attn/q_proj)")
    inj.add_argument("--layers", type=int_list, default=[0], help="student layers, e.g. 0 or 0,1,2")
    inj.add_argument("--teacher-layers", type=int_list, default=None,
                     help="teacher layer for each student layer (default: same index, or same relative depth)")
    inj.add_argument("--resize", choices=("bilinear", "nearest", "pad"), default="bilinear",
                     help="how the teacher tensor is resized to the student's shape")
    inj.add_argument("--align-corners", action="store_true", help="bilinear with align_corners=True")
    inj.add_argument("--alphas", type=float_list, default=[0.0, 0.05, 0.1, 0.2, 0.35, 0.5],
                     help="blend strengths to sweep, comma-separated")
    inj.add_argument("--allow-extrapolation", action="store_true", help="accept alphas outside [0, 1]")
    inj.add_argument("--prompt", action="append", default=None,
                     help="probe prompt (repeatable; default: three fixed probes)")
    inj.add_argument("--token-ids", type=token_ids, action="append", default=None,
                     help="probe prompt as token ids (repeatable), for checkpoints without a tokenizer")
    inj.add_argument("--max-new-tokens", type=positive(int), default=16, help="greedy continuation length")
    inj.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    inj.add_argument("--out", default=None, help="directory for study.json, study.csv and divergence.png")
    inj.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    inj.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)

    snn_command.add_parser(commands)
    fuse_command.add_parser(commands)
    patch_command.add_parser(commands)

    info = commands.add_parser("info", help="architecture, shapes, parameter count and bytes of a model")
    info.add_argument("--model", default=None, help=MODEL_HELP + ", or a preset name such as gemma3-12b "
                                                                 "(default: gemma3-270m)")
    info.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                      help="the dtype the byte count assumes")
    info.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    return parser


def _generate(args: argparse.Namespace) -> None:
    from mtijax.api import open_checkpoint
    from mtijax.generate import Sampling, generate_stream
    from mtijax.preflight import check_prompts
    from mtijax.special_tokens import text_decoder

    check_prompt_choice(args.prompt, args.token_ids)
    sampling = Sampling(args.temperature, args.top_k, args.top_p)
    show = progress.wanted(args.json, args.verbose)
    if streaming.wants_streaming(args):
        return streaming.run(args, sampling, show)
    checkpoint = open_checkpoint(args.model)
    tokenizer = checkpoint.tokenizer(show) if args.token_ids is None else None
    prompt_ids = encode_prompt(tokenizer, checkpoint.path, args.prompt, args.token_ids)
    check_prompts(checkpoint.config, [prompt_ids], checkpoint.context_source, args.max_new_tokens)
    model = checkpoint.load(args.dtype, tokenizer=tokenizer, progress=show)
    decode = text_decoder(tokenizer, model.suppress_ids, args.show_special) if tokenizer is not None else None
    stops = set(model.config.eos_token_ids)
    ids: list[int] = []
    shown = ""
    start = time.perf_counter()
    steps = generate_stream(model.config, model.params, [prompt_ids], args.max_new_tokens, sampling=sampling,
                            seed=args.seed, suppress_ids=None if args.sample_special else model.suppress_ids)
    with progress.status("compiling and running the prompt", enabled=show):
        first = next(steps)
    for step_tokens in itertools.chain([first], steps):
        token = int(step_tokens[0])
        if token in stops:
            break
        ids.append(token)
        if decode and not args.json:
            text = decode(ids)
            if text.startswith(shown) and not text.endswith("\ufffd"):
                print(text[len(shown):], end="", flush=True)
                shown = text
    elapsed = time.perf_counter() - start
    text = decode(ids) if decode else ""
    if args.json:
        print(json.dumps({"model": model.source, "prompt_ids": list(prompt_ids), "ids": ids, "text": text,
                          "seconds": round(elapsed, 3)}))
    elif decode:
        print(text[len(shown):] if text.startswith(shown) else "")
    else:
        print(" ".join(str(i) for i in ids))


DEFAULT_PROBES = ("The capital of France is", "def fibonacci(n):", "Once upon a time")


def _inject(args: argparse.Namespace) -> None:
    from mtijax.api import open_checkpoint
    from mtijax.inject import InjectionSpec, plan
    from mtijax.injection_study import check_alphas, run_study, table, write_outputs
    from mtijax.preflight import abstract_params, check_output_dir, check_prompts

    if args.prompt and args.token_ids:
        raise MtijaxError("give --prompt or --token-ids, not both")
    if args.out:
        check_output_dir(args.out)
    check_alphas(args.alphas, args.allow_extrapolation)
    spec = InjectionSpec(tuple(args.tensor or ("attn/q_proj",)), tuple(args.layers),
                         None if args.teacher_layers is None else tuple(args.teacher_layers),
                         args.resize, args.align_corners)
    show = progress.wanted(args.json, args.verbose)
    student = open_checkpoint(args.student)
    teacher = student if args.teacher == args.student else open_checkpoint(args.teacher)
    if student.config.architecture != teacher.config.architecture:
        raise MtijaxError(f"cannot inject between architectures: the teacher is {teacher.config.architecture}, "
                          f"the student {student.config.architecture}")
    plan(abstract_params(student.config), abstract_params(teacher.config), spec)
    tokenizer = student.tokenizer(show) if not args.token_ids else None
    if args.token_ids:
        prompts = args.token_ids
    elif tokenizer is None:
        raise MtijaxError(f"{student.path} has no tokenizer; pass --token-ids")
    else:
        prompts = [tokenizer(p)["input_ids"] for p in (args.prompt or DEFAULT_PROBES)]
    check_prompts(student.config, prompts, student.context_source, args.max_new_tokens)
    student_model = student.load(args.dtype, tokenizer=tokenizer, progress=show)
    teacher_model = student_model if teacher is student else teacher.load(args.dtype, progress=show)
    study = run_study(student_model, teacher_model, spec, args.alphas, prompts, max_new_tokens=args.max_new_tokens,
                      allow_extrapolation=args.allow_extrapolation)
    if args.out:
        write_outputs(study, args.out)
    if args.json:
        print(json.dumps(study.to_json()))
        return
    print(table(study))
    print(study.verdict)
    i = study.integrity
    print(f"integrity: checksums of {i['files']} files {'unchanged' if i['checksums_unchanged'] else 'CHANGED'}; "
          f"probe {i['probe_before']:.4f} before, {i['probe_after']:.4f} after, difference {i['probe_diff']:g}")


def _info(args: argparse.Namespace) -> None:
    from pathlib import Path

    from mtijax.api import load_config
    from mtijax.config import describe

    config, path = load_config(args.model)
    summary = describe(config)
    summary["dtype"] = args.dtype
    summary["bytes"] = config.num_params * (4 if args.dtype == "float32" else 2)
    if path is not None:
        files = [path] if path.is_file() else sorted(Path(path).glob("*.safetensors"))
        summary["source"] = str(path)
        summary["bytes_on_disk"] = sum(f.stat().st_size for f in files)
    if args.json:
        print(json.dumps(summary))
        return
    for key, value in summary.items():
        print(f"{key:>18}: {value}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # its advice (e.g. "PyTorch was not found") is noise here
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as e:  # --help
            return e.code if isinstance(e.code, int) else 0
        {"generate": _generate, "inject": _inject, "info": _info, "snn": snn_command.run, "fuse": fuse_command.run,
         "patch": patch_command.run}[args.command](args)
    except MtijaxError as e:
        print(f"mtijax: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
