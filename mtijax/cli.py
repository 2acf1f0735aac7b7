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
                              encode_prompt, positive, token_ids)
from mtijax.errors import MtijaxError
from mtijax.fusion import command as fuse_command
from mtijax.injection import command as inject_command
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

    inject_command.add_parser(commands)
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
        {"generate": _generate, "inject": inject_command.run, "info": _info, "snn": snn_command.run,
         "fuse": fuse_command.run, "patch": patch_command.run}[args.command](args)
    except MtijaxError as e:
        print(f"mtijax: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
