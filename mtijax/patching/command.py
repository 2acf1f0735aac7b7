"""``mtijax patch``: generate a target prompt with a source (champion) prompt's KV cache and activations patched in.

Prints the baseline (target alone), the champion (source alone) and the patched
generation, each with its marker score, and the transfer efficiency. All three
use the same seed and sampling. Heavy imports happen in :func:`run`, so the
parser is cheap to build.
"""

from __future__ import annotations

import argparse
import json

from mtijax.arguments import MODEL_HELP, VERBOSE_HELP, finite, non_negative, positive, token_ids
from mtijax.errors import MtijaxError

KV_CHOICES = "all, none, or comma-separated layers"


def _layers(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layers, got {text!r}") from None


def _kv(text: str) -> str | tuple[int, ...]:
    if text in ("all", "none"):
        return text
    try:
        return _layers(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected {KV_CHOICES}, got {text!r}") from None


def _markers(text: str) -> tuple[str, ...]:
    markers = tuple(m.strip() for m in text.split(",") if m.strip())
    if not markers:
        raise argparse.ArgumentTypeError("no markers given")
    return markers


def add_parser(commands) -> None:
    """Register ``patch`` on the ``mtijax`` subcommands."""
    p = commands.add_parser("patch", help="patch a source prompt's KV cache and activations into a target's generation")
    p.add_argument("--model", default=None, help=MODEL_HELP + " (default: gemma3-270m)")
    p.add_argument("--source", help="source (champion) prompt text")
    p.add_argument("--target", help="target (baseline) prompt text")
    p.add_argument("--source-ids", type=token_ids, help="source prompt as token ids, instead of text")
    p.add_argument("--target-ids", type=token_ids, help="target prompt as token ids, instead of text")
    p.add_argument("--kv", type=_kv, default="all", help=f"KV-cache layers replaced: {KV_CHOICES} (default all)")
    p.add_argument("--kv-policy", choices=("last-min", "whole"), default="last-min",
                   help="last-min (the original's: the last min(n_target, n_source) positions) or whole")
    p.add_argument("--v-layers", type=_layers, default=(), help="layers whose attn_v is patched at every decode step")
    p.add_argument("--resid-layers", type=_layers, default=(),
                   help="layers whose residual stream (resid_pre) is patched at every decode step")
    p.add_argument("--mode", choices=("replace", "add", "interpolate"), default="replace",
                   help="how the source value enters the site")
    p.add_argument("--coef", type=finite, default=1.0, help="coefficient of add and interpolate")
    p.add_argument("--decode", choices=("last", "mean", "trajectory", "hook"), default="last",
                   help="source value at decode steps (hook: the original's hooks, which never fire)")
    p.add_argument("--prompt-positions", default=None,
                   help="also patch these prompt positions (all, last, last:16, 3:7), end-aligned")
    p.add_argument("--first-token", choices=("refeed", "recompute"), default="refeed",
                   help="refeed (the original's) or recompute the last prompt token after the cache is patched")
    p.add_argument("--max-new-tokens", type=positive(int), default=32, help="tokens generated for each run")
    p.add_argument("--temperature", type=non_negative(float), default=0.8,
                   help="sampling temperature of all three runs, a finite number >= 0; 0 is greedy")
    p.add_argument("--seed", type=int, default=0, help="seed of all three runs")
    p.add_argument("--markers", type=_markers, default=None,
                   help="comma-separated markers (default: the original's 21)")
    p.add_argument("--whole-words", action="store_true", help="count markers as whole words, not substrings")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)


def _check_choice(text: str | None, ids: list[int] | None, name: str) -> None:
    if (text is None) == (ids is None):
        raise MtijaxError(f"give --{name} or --{name}-ids (one of them)")


def _check_plan_early(config, args: argparse.Namespace, target_length: int) -> None:
    """The layers and prompt positions of the flags against the config and the target prompt (no weights)."""
    from mtijax.interventions import layer_mask
    from mtijax.patching.positions import parse_positions, span_bounds

    for layers in (args.v_layers, args.resid_layers, () if isinstance(args.kv, str) else args.kv):
        layer_mask(config.num_layers, layers)
    if args.prompt_positions is not None:
        lo, hi = span_bounds(parse_positions(args.prompt_positions), target_length)
        if lo < 0 or hi > target_length or lo >= hi:
            raise MtijaxError(f"--prompt-positions {args.prompt_positions}: tokens {lo}..{hi - 1} are outside the "
                              f"prompt (the target has {target_length} tokens, 0..{target_length - 1})")


def build_plan(args: argparse.Namespace):
    """The :class:`~mtijax.patching.generation.Plan` the flags describe."""
    from mtijax.patching.generation import KVPatch, Plan, SitePatch

    patches = tuple(SitePatch(site, layers, prompt=args.prompt_positions, decode=args.decode, mode=args.mode,
                              coef=args.coef)
                    for site, layers in (("resid_pre", args.resid_layers), ("attn_v", args.v_layers)) if layers)
    kv = None if args.kv == "none" else KVPatch(args.kv_policy.replace("-", "_"), None if args.kv == "all" else args.kv)
    return Plan(patches, kv, args.first_token)


def run(args: argparse.Namespace) -> None:
    """Generate baseline, champion and patched; print them (or one JSON object). Flags, prompts, layers and
    positions are checked before the weights are read."""
    from mtijax import progress
    from mtijax.api import open_checkpoint
    from mtijax.arguments import encode_prompt
    from mtijax.generate import Sampling
    from mtijax.patching.generation import Plan, generate_patched
    from mtijax.patching.measures import MARKERS, behavior_score, efficiency, next_token_kl
    from mtijax.preflight import check_prompts
    from mtijax.special_tokens import text_decoder

    _check_choice(args.source, args.source_ids, "source")
    _check_choice(args.target, args.target_ids, "target")
    sampling = Sampling(args.temperature)
    show = progress.wanted(args.json, args.verbose)
    checkpoint = open_checkpoint(args.model)
    needs_tokenizer = args.source_ids is None or args.target_ids is None
    tokenizer = checkpoint.tokenizer(show) if needs_tokenizer else None
    source = encode_prompt(tokenizer, checkpoint.path, args.source, args.source_ids, "--source-ids")
    target = encode_prompt(tokenizer, checkpoint.path, args.target, args.target_ids, "--target-ids")
    check_prompts(checkpoint.config, [source, target], checkpoint.context_source, args.max_new_tokens)
    _check_plan_early(checkpoint.config, args, len(target))
    plan = build_plan(args)
    markers = args.markers or MARKERS
    model = checkpoint.load(args.dtype, tokenizer=tokenizer, progress=show)
    decode = text_decoder(tokenizer, model.suppress_ids) if tokenizer is not None else (lambda ids: "")

    def one(prompt, source_ids, run_plan) -> tuple[dict, object]:
        gen = generate_patched(model.config, model.params, prompt, source_ids, run_plan, seeds=[args.seed],
                               max_new_tokens=args.max_new_tokens, sampling=sampling)
        text = decode(gen.ids(0))
        return {"text": text, "ids": gen.ids(0), "score": behavior_score(text, markers, whole_words=args.whole_words)
                }, gen

    baseline, _ = one(target, None, Plan())
    champion, champion_gen = one(source, None, Plan())
    patched, patched_gen = one(target, source, plan)
    result = {"model": model.source, "baseline": baseline, "champion": champion, "patched": patched,
              "efficiency": efficiency(patched["score"], baseline["score"], champion["score"]),
              "kl_from_champion": float(next_token_kl(patched_gen.first_logits, champion_gen.first_logits)),
              "plan": {"kv": args.kv if isinstance(args.kv, str) else list(args.kv), "kv_policy": args.kv_policy,
                       "v_layers": list(args.v_layers), "resid_layers": list(args.resid_layers), "mode": args.mode,
                       "coef": args.coef, "decode": args.decode, "prompt_positions": args.prompt_positions,
                       "first_token": args.first_token},
              "seed": args.seed, "temperature": args.temperature, "markers": list(markers)}
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
        return
    for name in ("baseline", "champion", "patched"):
        shown = result[name]["text"] or " ".join(map(str, result[name]["ids"]))
        print(f"{name} (score {result[name]['score']}): {shown!r}")
    eff = result["efficiency"]
    print(f"efficiency: {'undefined (champion and baseline score the same)' if eff is None else f'{eff:.2f}'}; "
          f"next-token KL from the champion: {result['kl_from_champion']:.4f} nats")
