"""Seed 001's behaviour transfer, measured: KV-cache replacement and persistent patches, over seeded runs.

Runs every strategy of the seed (no patch; KV only; v-patch only; residual only;
KV + v-patch at the late layer; KV + residual at the middle layer + v-patch),
each as the original code ran it and as the seed describes it, over N seeded
sampled generations, then the minimal-layer search (vmapped sweeps over layer
masks). Default model: the embedded Gemma 3 270M (18 layers: the seed's layers
27 and 18 of 32 become 15 and 10). See ``mtijax.patching.study``.

    python experiments/behavior_transfer.py [--seeds 8] [--max-new-tokens 64] [--champion TEXT] [--baseline TEXT]
                                            [--decode last|mean|trajectory] [--no-search] [--out DIR]

Writes ``study.json``, ``strategies.csv``, ``layers.csv`` and ``efficiency_per_layer.png`` under
``experiments/results/behavior_transfer/`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from tqdm import tqdm

import mtijax
from mtijax.patching.study import DECODE_VARIANTS, STRATEGIES, Settings, run_study, table, write_outputs
from machine import describe


def format_efficiency(value: float | None) -> str:
    return "undefined" if value is None else f"{value:.2f}"


def main() -> None:
    defaults = Settings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="default: the embedded gemma3-270m")
    parser.add_argument("--seeds", type=int, default=defaults.seeds, help="sampled runs per condition")
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    parser.add_argument("--temperature", type=float, default=defaults.temperature)
    parser.add_argument("--champion", default=defaults.champion)
    parser.add_argument("--baseline", default=defaults.baseline)
    parser.add_argument("--decode", choices=("last", "mean", "trajectory"), default=defaults.decode,
                        help="source value at decode steps, as described")
    parser.add_argument("--sweep-seeds", type=int, default=defaults.sweep_seeds, help="runs per layer set in sweeps")
    parser.add_argument("--no-search", action="store_true", help="skip the minimal-layer search")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "behavior_transfer"))
    args = parser.parse_args()

    settings = Settings(champion=args.champion, baseline=args.baseline, seeds=args.seeds,
                        max_new_tokens=args.max_new_tokens, temperature=args.temperature, decode=args.decode,
                        sweep_seeds=min(args.sweep_seeds, args.seeds))
    model = mtijax.load(args.model)
    steps = 2 + 2 * (len(STRATEGIES) - 1) + len(DECODE_VARIANTS) - 1 + (0 if args.no_search else 4)
    bar = tqdm(total=steps, desc="conditions")

    def progress(name: str) -> None:
        bar.set_postfix_str(name)
        bar.update(1)

    start = time.perf_counter()
    study = run_study(model, settings, search=not args.no_search, progress=progress)
    bar.close()
    study["seconds"] = round(time.perf_counter() - start, 1)
    study.update(describe())
    paths = write_outputs(study, args.out)

    print(f"\n{model.source}: {study['num_layers']} layers; v-patch layer {study['v_layer']}, residual layer "
          f"{study['resid_layer']}, R_V layers {study['rv_layers']}; N = {settings.seeds} runs of "
          f"{settings.max_new_tokens} tokens at temperature {settings.temperature}\n")
    print(table(study))
    rv = study["prompt_r_v"]
    print(f"\nprompt R_V: baseline {rv['baseline']:.3f}, champion {rv['champion']:.3f}")
    search = study.get("layer_search")
    if search:
        print(f"\nminimal-layer search ({search['plan']}):")
        for sweep in ("kv_single", "v_single", "kv_pairs_best"):
            cells = ", ".join(f"{r['layers']}: {format_efficiency(r['efficiency'])}" for r in search[sweep])
            print(f"  {sweep} efficiency: {cells}")
        print(f"  smallest KV layer set reaching {settings.threshold:.0%}: {search['minimal_kv']} (score), "
              f"{search['minimal_kv_markers_only']} (markers only, no repetition bonus)")
    for row in study["rows"]:
        if row["mode"] == "as_described" and row["strategy"] in ("kv", "kv+v"):
            print(f"\n{row['strategy']} as described, run 0: {row['texts'][0][:300]!r}")
    print(f"\n{study['seconds']} s; wrote {', '.join(str(p) for p in paths)}")


if __name__ == "__main__":
    main()
