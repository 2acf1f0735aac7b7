"""``mtijax snn route``: route prompts through spiking units driven by a model's hidden states."""

from __future__ import annotations

import argparse
import json

from mtijax.arguments import MODEL_HELP, VERBOSE_HELP, token_ids
from mtijax.errors import MtijaxError

def add_parser(commands) -> None:
    """Register ``snn route`` on the ``mtijax`` sub-command set."""
    snn = commands.add_parser("snn", help="spiking units driven by a model's hidden states (seed 003)")
    actions = snn.add_subparsers(dest="snn_command", required=True, parser_class=type(snn))
    route = actions.add_parser("route", help="route prompts through spiking units; collapse, bands, similarity")
    route.add_argument("prompts", nargs="*", metavar="PROMPT", help="prompt text (or use --token-ids)")
    route.add_argument("--model", default=None, help=MODEL_HELP + " (default: gemma3-270m)")
    route.add_argument("--token-ids", type=token_ids, action="append", default=None,
                       help="a prompt as comma-separated token ids (repeatable), for checkpoints without a tokenizer")
    route.add_argument("--ticks", type=int, default=10_000, help="ticks per prompt (the seed's count)")
    route.add_argument("--units", type=int, default=None,
                       help="keep the first N units (default: every output of the synapses)")
    route.add_argument("--driver", default="embeddings",
                       help="embeddings (mean-pooled, the seed's), resid:L, or SITE:L such as mlp_out:3")
    route.add_argument("--synapses", default="layers/attn/q_proj:0",
                       help="a model tensor PATH[:LAYER] (layer 0's q_proj by default), random[:SEED] or identity")
    route.add_argument("--unit-model", choices=("gif", "lif", "alif"), default="gif",
                       help="gif: the seed's unit with fatigue; lif; alif (adaptive threshold)")
    route.add_argument("--no-normalise", action="store_true", help="present the raw activations (no L2 norm)")
    route.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    route.add_argument("--out", default=None,
                       help="directory for routing.json, telemetry.csv/.parquet and raster/best-unit PNGs")
    route.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    route.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)


def _check_network(config, prompt: list[int], args: argparse.Namespace) -> None:
    """The driver and synapses specs against the model's shapes, without weights (``jax.eval_shape``)."""
    import jax

    from mtijax.preflight import abstract_params
    from mtijax.snn.drivers import make_driver, parse_driver
    from mtijax.snn.synapses import parse_synapses

    spec = parse_driver(args.driver, config.num_layers)
    shapes = abstract_params(config)
    frames = jax.eval_shape(lambda p: make_driver(config, p, prompt, spec, normalise=not args.no_normalise), shapes)
    jax.eval_shape(lambda p: parse_synapses(args.synapses, p, frames.shape[-1], args.units), shapes)


def run(args: argparse.Namespace) -> None:
    """Run ``snn route``: every flag, the prompts and the network's shapes are checked before the weights are read."""
    from mtijax import progress
    from mtijax.api import open_checkpoint
    from mtijax.preflight import check_output_dir, check_prompts
    from mtijax.snn.study import route_prompts, table, write_outputs

    if args.prompts and args.token_ids:
        raise MtijaxError("give PROMPTs or --token-ids, not both")
    if not args.prompts and not args.token_ids:
        raise MtijaxError("give at least one PROMPT or --token-ids")
    if args.ticks < 1:
        raise MtijaxError(f"--ticks must be at least 1, got {args.ticks}")
    if args.out:
        check_output_dir(args.out)
    show = progress.wanted(args.json, args.verbose)
    checkpoint = open_checkpoint(args.model)
    tokenizer = checkpoint.tokenizer(show) if not args.token_ids else None
    if args.token_ids:
        prompts, labels = args.token_ids, None
    elif tokenizer is None:
        raise MtijaxError(f"{checkpoint.path} has no tokenizer; pass --token-ids")
    else:
        prompts, labels = [tokenizer(p)["input_ids"] for p in args.prompts], list(args.prompts)
    check_prompts(checkpoint.config, prompts, checkpoint.context_source)
    _check_network(checkpoint.config, list(prompts[0]), args)
    model = checkpoint.load(args.dtype, tokenizer=tokenizer, progress=show)
    study = route_prompts(model, prompts, labels, ticks=args.ticks, driver=args.driver, synapses=args.synapses,
                          units=args.units, unit_model=args.unit_model, normalise=not args.no_normalise)
    written = write_outputs(study, args.out) if args.out else []
    if args.json:
        print(json.dumps(study.to_json()))
        return
    s = study.settings
    print(f"{s['units']} {s['unit_model']} units, synapses {s['synapses']}, driver {s['driver']}"
          f"{'' if s['normalised'] else ' (not normalised)'}, {s['ticks']} ticks\n")
    print(table(study))
    for path in written:
        print(f"wrote {path}")
