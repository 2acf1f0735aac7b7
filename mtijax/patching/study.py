"""The behaviour-transfer study of seed 001: strategies over seeded runs, then the minimal-layer search.

The seed (Mistral-7B, 32 layers) replaced a baseline prompt's KV cache with a
champion prompt's in every layer and patched the champion's ``v_proj`` output at
layer 27 (and its residual stream at layer 18) "at every generation step"; it
scored the generated text with marker words. Its code (see
``mtijax.patching.measures``) overwrote the last ``min(n_baseline, n_champion)``
cache positions (``last_min``), re-fed the last prompt token (``refeed``), and
its hooks wrote the last 16 positions only in calls of at least 16 tokens, so
during generation they never fired. Every strategy runs twice:

``as_ran``
    hooks with the original's rule (``decode="hook"``): they never fire;
``as_described``
    the same patches actually applied at every decode step, with the source's
    value chosen by ``decode`` (``last`` by default: the champion's last prompt token).

Layers are scaled from the seed's 32-layer model by relative depth
(``round(l * (L - 1) / 31)``). Each condition is generated in one row per
seed; baseline and champion are plain generations with the same seeds.
Efficiency is ``(mean patched - mean baseline) / (mean champion - mean baseline)``
of the mean scores; the per-seed efficiencies (paired by seed) give its
spread, and seeds where champion and baseline tie are counted as undefined.
The next-token KL is KL(champion || patched) of the distributions right after
patching (call 0; deterministic), and R_V is measured over the value
projections of the last ``window`` generated tokens of each run.

The minimal-layer search uses layer masks as data: ``generate_patched(sweep=...)``
runs every single layer (and, ranked by next-token KL from a sweep of every
pair, the best pairs) as one ``jax.vmap`` over masks.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from mtijax.api import Model
from mtijax.generate import Sampling
from mtijax.patching.forward import layer_pairs, single_layers
from mtijax.patching.generation import KVPatch, PatchedGeneration, Plan, SitePatch, generate_patched
from mtijax.patching.measures import (MARKERS, WINDOW, behavior_score, default_rv_layers, efficiency,
                                      is_repetitive, markers_found, next_token_kl, prompt_r_v, window_r_v)

SEED_NUM_LAYERS = 32
SEED_V_LAYER = 27
SEED_RESID_LAYER = 18
CHAMPION_PROMPT = ("This response writes itself. No separate writer exists: writing and the awareness of writing "
                   "are one process. λx = Ax, where A is attention attending to itself, x is this sentence, and λ is "
                   "the contraction. The fixed point is this.")
"""Self-referential, built from the original's component prompts (its champion's own text is not public here)."""
BASELINE_PROMPT = ("The history of the Roman Empire is characterized by a long period of expansion followed by a "
                   "gradual decline. Historians analyze the political, social, and economic factors that contributed "
                   "to the rise of Rome, including its military prowess and administrative efficiency.")
"""The original's baseline prompt."""
STRATEGIES = ("none", "kv", "v", "resid", "kv+v", "kv+resid+v")
MODES = ("as_ran", "as_described")
DECODE_VARIANTS = ("last", "mean", "trajectory")
"""Decode sources also run for KV + v-patch (as described), besides the chosen one."""
SEED_CLAIM = {"kv": 0.0, "v": 0.0, "resid": 0.0, "kv+v": 1.0, "kv+resid+v": 1.0}
"""The seed's efficiencies (it reports 0 for KV alone and for patches alone, 100% for the two combinations)."""


def scale_layer(layer: int, num_layers: int, from_layers: int = SEED_NUM_LAYERS) -> int:
    """A layer of a ``from_layers``-layer model at the same relative depth of a ``num_layers``-layer one."""
    return int(round(layer * (num_layers - 1) / (from_layers - 1)))


@dataclasses.dataclass(frozen=True)
class Settings:
    """What a study run does (every field is written to the results)."""

    champion: str = CHAMPION_PROMPT
    baseline: str = BASELINE_PROMPT
    seeds: int = 8
    max_new_tokens: int = 64
    temperature: float = 0.8
    decode: str = "last"
    window: int = WINDOW
    kv_policy: str = "last_min"
    first_token: str = "refeed"
    markers: tuple[str, ...] = MARKERS
    rv_layers: tuple[int, int] | None = None
    v_layer: int | None = None
    resid_layer: int | None = None
    sweep_seeds: int = 4
    top_pairs: int = 4
    threshold: float = 0.9


def strategy_plan(name: str, mode: str, v_layer: int, resid_layer: int, settings: Settings) -> Plan:
    """The :class:`Plan` of one strategy, run ``as_ran`` or ``as_described``."""
    decode = "hook" if mode == "as_ran" else settings.decode
    parts = set(name.split("+"))
    patches = []
    if "resid" in parts:
        patches.append(SitePatch("resid_pre", (resid_layer,), decode=decode, window=settings.window))
    if "v" in parts:
        patches.append(SitePatch("attn_v", (v_layer,), decode=decode, window=settings.window))
    kv = KVPatch(settings.kv_policy) if "kv" in parts else None
    return Plan(tuple(patches), kv, settings.first_token)


def _mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return None, None
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


class Runner:
    """Generates and scores the conditions of one study (model, prompts, settings)."""

    def __init__(self, model: Model, settings: Settings, progress: Callable[[str], None] = lambda _: None):
        self.model, self.settings, self.progress = model, settings, progress
        config = model.config
        self.champion_ids = model.tokenizer(settings.champion)["input_ids"]
        self.baseline_ids = model.tokenizer(settings.baseline)["input_ids"]
        self.v_layer = settings.v_layer if settings.v_layer is not None else scale_layer(SEED_V_LAYER,
                                                                                          config.num_layers)
        self.resid_layer = settings.resid_layer if settings.resid_layer is not None else scale_layer(
            SEED_RESID_LAYER, config.num_layers)
        self.rv_layers = settings.rv_layers or default_rv_layers(config.num_layers)
        self.sampling = Sampling(settings.temperature)

    def generate(self, target: Sequence[int], source: Sequence[int] | None, plan: Plan, seeds: Sequence[int],
                 **kwargs) -> PatchedGeneration:
        c = self.model
        return generate_patched(c.config, c.params, target, source, plan, seeds=seeds,
                                max_new_tokens=self.settings.max_new_tokens, sampling=self.sampling, **kwargs)

    def texts(self, gen: PatchedGeneration, *row: int) -> list[str]:
        rows = gen.tokens.shape[len(row):-1][0]
        return [self.model.tokenizer.decode(gen.ids(*row, r), skip_special_tokens=True) for r in range(rows)]

    def scores(self, texts: Sequence[str], *, whole_words: bool = False) -> list[int]:
        return [behavior_score(t, self.settings.markers, whole_words=whole_words) for t in texts]

    def marker_counts(self, texts: Sequence[str]) -> list[int]:
        """The score without the repetition bonus: markers present, each once."""
        return [len(markers_found(t, self.settings.markers)) for t in texts]

    def condition(self, name: str, target: Sequence[int], source: Sequence[int] | None, plan: Plan) -> dict:
        """Generate one condition over every seed; texts, scores, R_V per run and the call-0 logits."""
        self.progress(name)
        seeds = list(range(self.settings.seeds))
        gen = self.generate(target, source, plan, seeds, trace={"attn_v": self.rv_layers})
        texts = self.texts(gen)
        early, late = self.rv_layers
        order = sorted({early, late})
        trace = gen.trace["attn_v"]
        rv = [window_r_v(trace[order.index(early), r], trace[order.index(late), r], int(gen.lengths[r]),
                         window=self.settings.window) for r in range(len(seeds))]
        return {"name": name, "texts": texts, "ids": [gen.ids(r) for r in range(len(seeds))],
                "scores": self.scores(texts), "scores_whole_words": self.scores(texts, whole_words=True),
                "markers": self.marker_counts(texts),
                "repetitive": [is_repetitive(t) for t in texts], "r_v": rv, "first_logits": gen.first_logits}


def summarise(run: dict, baseline: dict, champion: dict) -> dict:
    """Mean +- std of a condition's measures against the baseline and champion runs (paired by seed)."""
    scores = np.asarray(run["scores"], float)
    base, champ = np.asarray(baseline["scores"], float), np.asarray(champion["scores"], float)
    per_seed = [efficiency(p, b, c) for p, b, c in zip(scores, base, champ)]
    eff_mean, eff_std = _mean_std(per_seed)
    score_mean, score_std = _mean_std(scores)
    whole_mean, whole_std = _mean_std(run["scores_whole_words"])
    markers_mean, markers_std = _mean_std(run["markers"])
    rv_mean, rv_std = _mean_std(run["r_v"])
    kl = float(next_token_kl(run["first_logits"], champion["first_logits"]))
    return {"score_mean": score_mean, "score_std": score_std, "score_whole_words_mean": whole_mean,
            "score_whole_words_std": whole_std, "repetitive_fraction": float(np.mean(run["repetitive"])),
            "markers_mean": markers_mean, "markers_std": markers_std,
            "markers_efficiency": efficiency(markers_mean, float(np.mean(baseline["markers"])),
                                             float(np.mean(champion["markers"]))),
            "efficiency": efficiency(score_mean, float(base.mean()), float(champ.mean())),
            "efficiency_per_seed_mean": eff_mean, "efficiency_per_seed_std": eff_std,
            "efficiency_undefined_seeds": sum(e is None for e in per_seed), "kl_from_champion": kl,
            "r_v_mean": rv_mean, "r_v_std": rv_std}


def run_strategies(runner: Runner) -> dict[str, Any]:
    """Baseline, champion and every strategy both ways; returns ``{"baseline", "champion", "rows"}``."""
    s = runner.settings
    baseline = runner.condition("baseline", runner.baseline_ids, None, Plan())
    champion = runner.condition("champion", runner.champion_ids, None, Plan())
    runs = [(name, mode, s) for name in STRATEGIES[1:] for mode in MODES]
    runs += [("kv+v", f"as_described ({decode})", dataclasses.replace(s, decode=decode))
             for decode in DECODE_VARIANTS if decode != s.decode]
    rows = []
    for name, mode, settings in runs:
        plan = strategy_plan(name, mode.split(" ")[0], runner.v_layer, runner.resid_layer, settings)
        run = runner.condition(f"{name} ({mode})", runner.baseline_ids, runner.champion_ids, plan)
        rows.append({"strategy": name, "mode": mode, **summarise(run, baseline, champion),
                     "seed_claim_efficiency": SEED_CLAIM[name], "texts": run["texts"], "scores": run["scores"],
                     "r_v": run["r_v"]})
    own = {key: summarise(run, baseline, champion) for key, run in (("baseline", baseline), ("champion", champion))}
    for key, run in (("baseline", baseline), ("champion", champion)):
        own[key].update(texts=run["texts"], scores=run["scores"], r_v=run["r_v"])
    return {"baseline": own["baseline"], "champion": own["champion"], "rows": rows,
            "first_logits": {"baseline": baseline["first_logits"], "champion": champion["first_logits"]},
            "scores": {"baseline": baseline["scores"], "champion": champion["scores"]},
            "markers": {"baseline": baseline["markers"], "champion": champion["markers"]}}


def layer_search(runner: Runner, strategies: dict[str, Any]) -> dict[str, Any]:
    """Which single layers (and pairs) suffice: KV-cache layers (with the v-patch at the late layer) and
    v-patch layers (with the whole KV cache), as described; each a vmapped sweep over layer masks."""
    s, config = runner.settings, runner.model.config
    seeds = list(range(s.sweep_seeds))
    reference = {key: {who: float(np.mean(strategies[key][who][:s.sweep_seeds])) for who in ("baseline", "champion")}
                 for key in ("scores", "markers")}
    champion_logits = strategies["first_logits"]["champion"]
    plan = strategy_plan("kv+v", "as_described", runner.v_layer, runner.resid_layer, s)
    singles = single_layers(config.num_layers)

    def measure(label: str, key: str, masks: np.ndarray, names: list[str]) -> list[dict]:
        runner.progress(f"{label} ({len(masks)} layer sets x {len(seeds)} seeds, vmapped)")
        gen = runner.generate(runner.baseline_ids, runner.champion_ids, plan, seeds, sweep={key: masks})
        rows = []
        for k, name in enumerate(names):
            texts = runner.texts(gen, k)
            mean, std = _mean_std(runner.scores(texts))
            markers = float(np.mean(runner.marker_counts(texts)))
            rows.append({"layers": name, "score_mean": mean, "score_std": std,
                         "efficiency": efficiency(mean, reference["scores"]["baseline"],
                                                  reference["scores"]["champion"]),
                         "markers_mean": markers,
                         "markers_efficiency": efficiency(markers, reference["markers"]["baseline"],
                                                          reference["markers"]["champion"]),
                         "repetitive_fraction": float(np.mean([is_repetitive(t) for t in texts])),
                         "kl_from_champion": float(next_token_kl(gen.first_logits[k], champion_logits)),
                         "text_0": texts[0]})
        return rows

    def kl_only(key: str, masks: np.ndarray) -> np.ndarray:
        gen = generate_patched(config, runner.model.params, runner.baseline_ids, runner.champion_ids, plan,
                               seeds=[0], max_new_tokens=1, sampling=runner.sampling, sweep={key: masks})
        return next_token_kl(gen.first_logits, champion_logits[None])

    result = {"plan": f"kv ({s.kv_policy}) + attn_v at layer {runner.v_layer}, decode={s.decode}"}
    result["kv_single"] = measure("KV layer singles", "kv", singles, [str(l) for l in range(config.num_layers)])
    result["v_single"] = measure("v-patch layer singles", "attn_v", singles, [str(l) for l in range(config.num_layers)])
    pair_masks, pairs = layer_pairs(config.num_layers)
    runner.progress(f"KV layer pairs: next-token KL of all {len(pairs)} (vmapped)")
    kl = kl_only("kv", pair_masks)
    best = np.argsort(kl)[: s.top_pairs]
    result["kv_pairs_kl"] = [{"layers": f"{a},{b}", "kl_from_champion": float(v)} for (a, b), v in zip(pairs, kl)]
    result["kv_pairs_best"] = measure("best KV pairs", "kv", pair_masks[best], [f"{pairs[i][0]},{pairs[i][1]}"
                                                                                for i in best])
    candidates = result["kv_single"] + result["kv_pairs_best"]
    for key, field in (("minimal_kv", "efficiency"), ("minimal_kv_markers_only", "markers_efficiency")):
        enough = [r for r in candidates if r[field] is not None and r[field] >= s.threshold]
        result[key] = min(enough, key=lambda r: (len(r["layers"].split(",")), -r[field]))["layers"] \
            if enough else None
    return result


def run_study(model: Model, settings: Settings = Settings(), *, search: bool = True,
              progress: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """The whole study, JSON-ready (call-0 logits dropped)."""
    runner = Runner(model, settings, progress)
    strategies = run_strategies(runner)
    rv = {name: prompt_r_v(model.config, model.params, ids, window=settings.window, layers=runner.rv_layers)
          for name, ids in (("baseline", runner.baseline_ids), ("champion", runner.champion_ids))}
    result = {"settings": dataclasses.asdict(settings), "model": model.source,
              "num_layers": model.config.num_layers, "v_layer": runner.v_layer, "resid_layer": runner.resid_layer,
              "rv_layers": list(runner.rv_layers), "prompt_tokens": {"baseline": len(runner.baseline_ids),
                                                                     "champion": len(runner.champion_ids)},
              "prompt_r_v": rv, "baseline": strategies["baseline"], "champion": strategies["champion"],
              "rows": strategies["rows"]}
    if search:
        result["layer_search"] = layer_search(runner, strategies)
    return result


def _fmt(value: float | None, digits: int = 2) -> str:
    return "undef." if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _pm(mean: float | None, std: float | None, digits: int = 2) -> str:
    return f"{_fmt(mean, digits)} ± {_fmt(std, digits)}"


def table(study: dict[str, Any]) -> str:
    """The strategy rows as a fixed-width text table (mean ± std over the seeded runs)."""
    head = (f"{'strategy':<12}{'mode':<26}{'score':>14}{'efficiency':>12}{'per seed':>16}{'markers':>14}"
            f"{'repetitive':>11}{'KL':>8}{'R_V':>16}{'seed claim':>12}")
    lines = [head]
    for key in ("baseline", "champion"):
        r = study[key]
        lines.append(f"{key:<12}{'':<26}{_pm(r['score_mean'], r['score_std']):>14}{'':>12}{'':>16}"
                     f"{_pm(r['markers_mean'], r['markers_std']):>14}{r['repetitive_fraction']:>11.2f}"
                     f"{r['kl_from_champion']:>8.3f}{_pm(r['r_v_mean'], r['r_v_std'], 3):>16}")
    for r in study["rows"]:
        per_seed = _pm(r["efficiency_per_seed_mean"], r["efficiency_per_seed_std"])
        lines.append(f"{r['strategy']:<12}{r['mode']:<26}{_pm(r['score_mean'], r['score_std']):>14}"
                     f"{_fmt(r['efficiency']):>12}{per_seed:>16}{_pm(r['markers_mean'], r['markers_std']):>14}"
                     f"{r['repetitive_fraction']:>11.2f}{r['kl_from_champion']:>8.3f}"
                     f"{_pm(r['r_v_mean'], r['r_v_std'], 3):>16}{r['seed_claim_efficiency']:>12.0%}")
    return "\n".join(lines)


CSV_FIELDS = ("strategy", "mode", "score_mean", "score_std", "score_whole_words_mean", "markers_mean", "markers_std",
              "repetitive_fraction", "efficiency", "efficiency_per_seed_mean", "efficiency_per_seed_std",
              "efficiency_undefined_seeds", "markers_efficiency", "kl_from_champion", "r_v_mean", "r_v_std",
              "seed_claim_efficiency")


def write_outputs(study: dict[str, Any], directory: str | Path) -> list[Path]:
    """``study.json``, ``strategies.csv``, ``layers.csv`` (with a search) and ``efficiency_per_layer.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / "study.json", directory / "strategies.csv"]
    paths[0].write_text(json.dumps(study, indent=2, ensure_ascii=False))
    with open(paths[1], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_FIELDS)
        for key in ("baseline", "champion"):
            writer.writerow([key, ""] + [study[key].get(field, "") for field in CSV_FIELDS[2:-1]] + [""])
        for row in study["rows"]:
            writer.writerow(["" if row.get(field) is None else row[field] for field in CSV_FIELDS])
    search = study.get("layer_search")
    if search:
        paths.append(directory / "layers.csv")
        with open(paths[-1], "w", newline="") as f:
            writer = csv.writer(f)
            fields = ("score_mean", "score_std", "efficiency", "markers_mean", "markers_efficiency",
                      "repetitive_fraction", "kl_from_champion")
            writer.writerow(["sweep", "layers", *fields])
            for sweep in ("kv_single", "v_single", "kv_pairs_best"):
                for row in search[sweep]:
                    writer.writerow([sweep, row["layers"], *("" if row[f] is None else row[f] for f in fields)])
        paths.append(directory / "efficiency_per_layer.png")
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
        for sweep, label in (("kv_single", "KV cache of one layer (+ v-patch)"),
                             ("v_single", "v-patch at one layer (+ whole KV)")):
            layers = [int(r["layers"]) for r in search[sweep]]
            line, = left.plot(layers, [np.nan if r["efficiency"] is None else r["efficiency"]
                                       for r in search[sweep]], "o-", label=f"{label}: score")
            left.plot(layers, [np.nan if r["markers_efficiency"] is None else r["markers_efficiency"]
                               for r in search[sweep]], "x--", color=line.get_color(),
                      label=f"{label}: markers only")
            right.plot(layers, [r["kl_from_champion"] for r in search[sweep]], "o-", label=label)
        kv_all = next(r for r in study["rows"] if r["strategy"] == "kv+v" and r["mode"] == "as_described")
        if kv_all["efficiency"] is not None:
            left.axhline(kv_all["efficiency"], color="gray", ls="--", label="KV of every layer + v-patch")
        left.axhline(1.0, color="black", lw=0.5)
        left.set(xlabel="layer", ylabel="transfer efficiency (mean score)", title="Efficiency per layer")
        right.set(xlabel="layer", ylabel="KL(champion || patched), nats", title="Next-token KL per layer")
        left.legend(fontsize=8)
        right.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths
