"""``mtijax inject``: blend a resized teacher tensor into a student and sweep the strength (seed 000's study).

Prints the per-alpha table, the linearity verdict and the integrity check (or
one JSON object); ``--out`` also writes ``study.json``, ``study.csv`` and
``divergence.png``. The flags, the spec against both configs and the prompts
are checked before a weight is read. Heavy imports happen in :func:`run`, so
the parser is cheap to build.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from mtijax.arguments import MODEL_HELP, VERBOSE_HELP, float_list, int_list, positive, token_ids
from mtijax.errors import MtijaxError

DEFAULT_PROBES = ("The capital of France is", "def fibonacci(n):", "Once upon a time")


def add_parser(commands: Any) -> None:
    """Register ``inject`` on the ``mtijax`` subcommands."""
    p = commands.add_parser("inject", help="blend a resized teacher tensor into a student; sweep the strength")
    p.add_argument("--student", default=None, help=MODEL_HELP + " (default: gemma3-270m)")
    p.add_argument("--teacher", default=None, help=MODEL_HELP + " (default: gemma3-270m)")
    p.add_argument("--tensor", action="append", default=None,
                   help="layer tensor pattern such as attn/q_proj or 'mlp/*' (repeatable; default attn/q_proj)")
    p.add_argument("--layers", type=int_list, default=[0], help="student layers, e.g. 0 or 0,1,2")
    p.add_argument("--teacher-layers", type=int_list, default=None,
                   help="teacher layer for each student layer (default: same index, or same relative depth)")
    p.add_argument("--resize", choices=("bilinear", "nearest", "pad"), default="bilinear",
                   help="how the teacher tensor is resized to the student's shape")
    p.add_argument("--align-corners", action="store_true", help="bilinear with align_corners=True")
    p.add_argument("--alphas", type=float_list, default=[0.0, 0.05, 0.1, 0.2, 0.35, 0.5],
                   help="blend strengths to sweep, comma-separated")
    p.add_argument("--allow-extrapolation", action="store_true", help="accept alphas outside [0, 1]")
    p.add_argument("--prompt", action="append", default=None,
                   help="probe prompt (repeatable; default: three fixed probes)")
    p.add_argument("--token-ids", type=token_ids, action="append", default=None,
                   help="probe prompt as token ids (repeatable), for checkpoints without a tokenizer")
    p.add_argument("--max-new-tokens", type=positive(int), default=16, help="greedy continuation length")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    p.add_argument("--out", default=None, help="directory for study.json, study.csv and divergence.png")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)


def run(args: argparse.Namespace) -> None:
    """Run the study the flags describe and print it (see the module docstring)."""
    from mtijax import progress
    from mtijax.api import open_checkpoint
    from mtijax.injection.blend import InjectionSpec, plan
    from mtijax.injection.study import check_alphas, run_study, table, write_outputs
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
