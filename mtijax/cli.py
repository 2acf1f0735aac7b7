"""The ``mtijax`` command: ``generate`` and ``info``.

User errors (bad flags, missing or corrupt files, wrong shapes, unknown
architectures) print one line ``mtijax: error: ...`` on stderr and exit with
status 2, without a traceback. Nothing on disk is written except the
tokenizer cache (see ``mtijax.tokenizer``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Sequence

from mtijax.arguments import (MODEL_HELP, check_prompt_choice, encode_prompt, float_list, int_list, non_negative,
                              token_ids)
from mtijax.errors import MtijaxError
from mtijax.fusion import command as fuse_command
from mtijax.streaming import command as streaming
from mtijax.snn import command as snn_command
from mtijax.patching import command as patch_command

EXIT_USER_ERROR = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump
        raise MtijaxError(message)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for documentation and tests)."""
    parser = _Parser(prog="mtijax", description="Gemma 3 and OLMoE in pure JAX: generate text, inspect checkpoints.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    gen = commands.add_parser("generate", help="continue a prompt")
    gen.add_argument("prompt", nargs="?", help="prompt text (or use --token-ids)")
    gen.add_argument("--model", default=None, help=MODEL_HELP)
    gen.add_argument("--token-ids", type=token_ids, help="comma-separated prompt token ids, instead of text")
    gen.add_argument("--max-new-tokens", type=non_negative(int), default=32)
    gen.add_argument("--temperature", type=non_negative(float), default=0.0, help="0 (default) is greedy")
    gen.add_argument("--top-k", type=non_negative(int), default=0, help="0 switches top-k off")
    gen.add_argument("--top-p", type=non_negative(float), default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    gen.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    streaming.add_arguments(gen)

    inj = commands.add_parser("inject", help="blend a resized teacher tensor into a student; sweep the strength")
    inj.add_argument("--student", default=None, help=MODEL_HELP)
    inj.add_argument("--teacher", default=None, help=MODEL_HELP)
    inj.add_argument("--tensor", action="append", default=None,
                     help="layer tensor pattern such as attn/q_proj or 'mlp/*' (repeatable; default attn/q_proj)")
    inj.add_argument("--layers", type=int_list, default=[0], help="student layers, e.g. 0 or 0,1,2")
    inj.add_argument("--teacher-layers", type=int_list, default=None,
                     help="teacher layer for each student layer (default: same index, or same relative depth)")
    inj.add_argument("--resize", choices=("bilinear", "nearest", "pad"), default="bilinear")
    inj.add_argument("--align-corners", action="store_true", help="bilinear with align_corners=True")
    inj.add_argument("--alphas", type=float_list, default=[0.0, 0.05, 0.1, 0.2, 0.35, 0.5])
    inj.add_argument("--allow-extrapolation", action="store_true", help="accept alphas outside [0, 1]")
    inj.add_argument("--prompt", action="append", default=None, help="probe prompt (repeatable)")
    inj.add_argument("--token-ids", type=token_ids, action="append", default=None,
                     help="probe prompt as token ids (repeatable), for checkpoints without a tokenizer")
    inj.add_argument("--max-new-tokens", type=non_negative(int), default=16, help="greedy continuation length")
    inj.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    inj.add_argument("--out", default=None, help="directory for study.json, study.csv and divergence.png")
    inj.add_argument("--json", action="store_true", help="print one JSON object instead of the table")

    snn_command.add_parser(commands)
    fuse_command.add_parser(commands)
    patch_command.add_parser(commands)

    info = commands.add_parser("info", help="architecture, shapes, parameter count and bytes of a model")
    info.add_argument("--model", default=None, help=MODEL_HELP + ", or a preset name such as gemma3-12b")
    info.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    info.add_argument("--json", action="store_true")
    return parser


def _generate(args: argparse.Namespace) -> None:
    from mtijax.api import load
    from mtijax.generate import Sampling, generate_stream

    check_prompt_choice(args.prompt, args.token_ids)
    if args.max_new_tokens < 1:
        raise MtijaxError("--max-new-tokens must be at least 1")
    sampling = Sampling(args.temperature, args.top_k, args.top_p)
    if streaming.wants_streaming(args):
        return streaming.run(args, sampling)
    model = load(args.model, args.dtype, tokenizer=args.token_ids is None, progress=sys.stderr.isatty())
    prompt_ids = encode_prompt(model, args.prompt, args.token_ids)
    decode = (lambda ids: model.tokenizer.decode(ids, skip_special_tokens=True)) if model.tokenizer else None
    stops = set(model.config.eos_token_ids)
    ids: list[int] = []
    shown = ""
    start = time.perf_counter()
    for step_tokens in generate_stream(model.config, model.params, [prompt_ids], args.max_new_tokens,
                                       sampling=sampling, seed=args.seed):
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
    from mtijax.api import load
    from mtijax.inject import InjectionSpec
    from mtijax.injection_study import run_study, table, write_outputs

    if args.prompt and args.token_ids:
        raise MtijaxError("give --prompt or --token-ids, not both")
    progress = sys.stderr.isatty()
    student = load(args.student, args.dtype, tokenizer=not args.token_ids, progress=progress)
    teacher = student if args.teacher == args.student else load(args.teacher, args.dtype, tokenizer=False,
                                                                  progress=progress)
    if args.token_ids:
        prompts = args.token_ids
    elif student.tokenizer is None:
        raise MtijaxError(f"{student.source} has no tokenizer; pass --token-ids")
    else:
        prompts = [student.tokenizer(p)["input_ids"] for p in (args.prompt or DEFAULT_PROBES)]
    spec = InjectionSpec(tuple(args.tensor or ("attn/q_proj",)), tuple(args.layers),
                         None if args.teacher_layers is None else tuple(args.teacher_layers),
                         args.resize, args.align_corners)
    study = run_study(student, teacher, spec, args.alphas, prompts, max_new_tokens=args.max_new_tokens,
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
        args = build_parser().parse_args(argv)
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
