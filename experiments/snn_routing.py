"""Seed 003's spiking router, measured: do prompts route to different units, and do code and math cluster?

corinth-canal drove 2048 "walkers" (the seed's GIF units with fatigue) with
the mean-pooled, L2-normalised token embedding of a prompt, through layer 0's
q-projection, for 10,000 ticks, and read the best unit of every tick. It
claimed that (1) an un-normalised input collapsed onto one unit (the
"blackhole") and normalising fixed it, (2) different prompts route to
different units, not to a "lazy resting state", and (3) code and math route
to the same band of units.

This script reruns that on the embedded Gemma 3 270M (layer 0's q_proj: 640
inputs, 1024 units), on a second driver (the residual stream after layer 8,
token by token, into layer 9's q_proj) and on an OLMoE model: the checkpoint
given with ``--olmoe``, or else a *random* OLMoE-shaped model (2048 units
like the seed's, weights of std 0.02, no semantics), labelled as such. Each
claim is tested so that it can fail: collapse with the detector's stated
thresholds, and clustering against shuffled labels and against null networks
(random synapses of the real std, and the real synapses shuffled).

It then plugs the seed's spiking MoE gate into the OLMoE model's routing and
reports its top-k agreement with the softmax router and the change in
next-token loss on a held-out text.

    python experiments/snn_routing.py [--olmoe DIR|FILE.gguf] [--ticks 10000] [--nulls 10]

Writes ``experiments/results/snn_routing/``: ``results.json``, ``telemetry.csv``
and ``.parquet``, raster and best-unit PNGs of the seed's four
inputs, ``similarity.png`` and ``null.png``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import mtijax
from mtijax.snn import analysis
from machine import describe

PROMPTS = {  # the seed's own prompt first in each kind, then a few more of the same kind
    "prose": ["Teaching OMLoE the language of SNN", "Spiking neurons communicate with brief electrical pulses.",
              "The cat slept on the warm windowsill all afternoon.",
              "Rivers carry sediment from the mountains down to the sea."],
    "code": ["fn main () { println!(); }", "let v: Vec<i32> = (0..10).collect();", "def add(a, b): return a + b",
             "for (int i = 0; i < n; i++) { sum += a[i]; }"],
    "math": ["The derivative of a constant is mathematically zero.",
             "The integral of x squared is x cubed over three.", "A prime number has exactly two divisors.",
             "The angles of a triangle add up to one hundred and eighty degrees."],
}
HELD_OUT = ("The river rose through the night, and by morning the low fields were under water. Farmers moved "
            "their animals to the hills, and the school opened its doors to families whose houses had flooded. "
            "When the rain stopped, the town counted the damage and began to rebuild.")
BLAST = 1e6
"""The failed run: the normalised input times this (a float16 buffer read as float32 gives such magnitudes)."""
SCALES = (0.3, 1.0, 3.0, 10.0, 100.0, BLAST)
TOGETHER, APART = ("code", "math"), ("prose",)
MEASURES = ("rate_cosine", "win_cosine", "jaccard", "same_band")


def tokenize(model, text: str, tokenizer) -> list[int]:
    """Token ids of ``text`` for ``model`` (a random model borrows Gemma's ids modulo its vocabulary)."""
    ids = tokenizer(text)["input_ids"]
    return [i % model.config.vocab_size for i in ids] if model.tokenizer is None else ids


def off_diagonal_mean(m: np.ndarray) -> float:
    """Mean of a square matrix off its diagonal."""
    m = np.asarray(m)
    return float(m[~np.eye(len(m), dtype=bool)].mean())


def routing_section(name: str, model, tokenizer, driver: str, synapses: str, ticks: int, nulls: int,
                    out: Path, plots: bool) -> dict:
    """The seed's analysis on one model and driver: per-prompt table, similarity, clustering vs both nulls."""
    kinds = [k for k, texts in PROMPTS.items() for _ in texts]
    texts = [t for ts in PROMPTS.values() for t in ts]
    prompts = [tokenize(model, t, tokenizer) for t in texts]
    study = mtijax.snn.route_prompts(model, prompts, texts, ticks=ticks, driver=driver, synapses=synapses)
    runs = [study.prompt(i) for i in range(len(texts))]
    rows = [{"kind": k, "prompt": t, **s} for k, t, s in zip(kinds, texts, study.summaries())]
    sims = analysis.similarity(runs)
    frames = np.stack([np.asarray(f).mean(0) for f in study.frames])
    result = {"model": name, "driver": driver, "synapses": synapses, "units": study.network.num_units,
              "ticks": ticks, "prompts": rows, "similarity": {k: np.round(v, 4).tolist() for k, v in sims.items()},
              "input_cosine": np.round(analysis.cosine_matrix(frames), 4).tolist(),
              "mean_rate_cosine": round(off_diagonal_mean(sims["rate_cosine"]), 4),
              "mean_input_cosine": round(off_diagonal_mean(analysis.cosine_matrix(frames)), 4)}
    # clustering: shuffled labels (is the grouping there at all?) and null networks (is it the weights?)
    result["label_permutation"] = {m: analysis.permutation_test(sims[m], kinds, TOGETHER, APART) for m in MEASURES}
    result["label_permutation"]["input_cosine"] = analysis.permutation_test(
        analysis.cosine_matrix(frames), kinds, TOGETHER, APART)
    real = study.network.synapses
    std = float(jnp.std(real))
    null_stats: dict[str, dict[str, list[float]]] = {"random": {m: [] for m in MEASURES},
                                                     "shuffled": {m: [] for m in MEASURES}}
    stacked, counts = mtijax.snn.stack_frames(study.frames)
    for kind, seed in tqdm([(k, s) for k in ("random", "shuffled") for s in range(nulls)],
                           desc=f"{name} {driver}: null networks"):
        synapses_null = (mtijax.snn.random_synapses(seed, *real.shape, scale=std) if kind == "random"
                         else mtijax.snn.shuffled_synapses(real, seed))
        batch = mtijax.snn.simulate_batch(mtijax.snn.Network(synapses_null), stacked, ticks, counts)
        null_sims = analysis.similarity([analysis.row(batch, i) for i in range(len(texts))])
        for m in MEASURES:
            null_stats[kind][m].append(analysis.clustering_statistic(null_sims[m], kinds, TOGETHER, APART))
    result["network_null"] = {kind: {m: analysis.network_null(result["label_permutation"][m]["statistic"], v)
                                     for m, v in stats.items()} for kind, stats in null_stats.items()}
    if plots:
        plot_similarity(sims["rate_cosine"], analysis.cosine_matrix(frames), kinds, out / "similarity.png", name)
        plot_null(result, null_stats, out / "null.png")
    return result


def scale_section(model, tokenizer, ticks: int) -> list[dict]:
    """The seed's English prompt at several input norms, and un-normalised: what does a large input do?"""
    ids = tokenize(model, PROMPTS["prose"][0], tokenizer)
    unit = mtijax.snn.embedding_driver(model.config, model.params, ids)
    raw = mtijax.snn.embedding_driver(model.config, model.params, ids, normalise=False)
    net = mtijax.snn.Network(mtijax.snn.model_synapses(model.params))
    drivers = [("raw (not normalised)", raw)] + [(f"normalised x {s:g}", unit * s) for s in SCALES]
    rows = []
    for label, frames in drivers:
        run = mtijax.snn.simulate(net, frames, ticks)
        rows.append({"input": label, "norm": round(float(jnp.linalg.norm(frames)), 4),
                     **mtijax.snn.study.summarise(run)})
    return rows


def seed_four(model, tokenizer, ticks: int, out: Path) -> dict:
    """The seed's four runs on Gemma (English, Rust, math, and the failed blown-up English): plots, telemetry."""
    labels = ["English (second-test)", "Rust (third-test)", "math (fourth-test)",
              f"failed: English un-normalised x {BLAST:g} (first-test)"]
    texts = [PROMPTS["prose"][0], PROMPTS["code"][0], PROMPTS["math"][0], PROMPTS["prose"][0]]
    frames = [mtijax.snn.embedding_driver(model.config, model.params, tokenize(model, t, tokenizer)) for t in texts]
    frames[3] = frames[3] * BLAST
    net = mtijax.snn.Network(mtijax.snn.model_synapses(model.params))
    stacked, counts = mtijax.snn.stack_frames(frames)
    batch = mtijax.snn.simulate_batch(net, stacked, ticks, counts)
    runs = [analysis.row(batch, i) for i in range(4)]
    written = mtijax.snn.write_telemetry(runs, out / "telemetry")
    for i, (label, run) in enumerate(zip(labels, runs)):
        mtijax.snn.plot_raster(run, out / f"raster_{i}.png", f"Gemma 3 270M, {label}")
        mtijax.snn.plot_best_unit(run, out / f"best_unit_{i}.png", f"Gemma 3 270M, {label}")
    sims = analysis.similarity(runs)
    return {"labels": labels, "summaries": [mtijax.snn.study.summarise(r) for r in runs],
            "jaccard_top10": np.round(sims["jaccard"], 4).tolist(), "telemetry_files": [p.name for p in written]}


def random_olmoe(vocab: int = 50_304) -> mtijax.Model:
    """A random OLMoE-shaped model: OLMoE-1B-7B's width, heads, experts and vocabulary; 2 layers of narrow
    experts; weights of std 0.02 and unit norms. It has no semantics: a labelled stand-in."""
    config = mtijax.OlmoeConfig(vocab_size=vocab, hidden_size=2048, intermediate_size=64, num_layers=2,
                                num_heads=16, num_kv_heads=16, num_experts=64, num_experts_per_tok=8)
    params = mtijax.init_params(config, jax.random.key(0))
    for name in ("input_norm", "post_attn_norm"):
        params["layers"][name] = jnp.ones_like(params["layers"][name])
    for name in ("q_norm", "k_norm"):
        params["layers"]["attn"][name] = jnp.ones_like(params["layers"]["attn"][name])
    params["final_norm"] = jnp.ones_like(params["final_norm"])
    return mtijax.Model(config, params, None, "random OLMoE-shaped model (no checkpoint given)")


def gate_section(model, tokenizer) -> dict:
    """The spiking gate as the OLMoE router: top-k agreement and next-token loss on a held-out text."""
    tokens = jnp.asarray([tokenize(model, HELD_OUT, tokenizer)], jnp.int32)
    capture = ("router_logits", "router_experts")
    forward = jax.jit(mtijax.forward, static_argnames=("config", "capture"))

    def loss(out) -> float:
        logp = jax.nn.log_softmax(out.logits[0, :-1], axis=-1)
        return float(-jnp.mean(jnp.take_along_axis(logp, tokens[0, 1:, None], axis=-1)))

    plain = forward(model.config, model.params, tokens, capture=capture)
    spiking = forward(model.config, model.params, tokens, capture=capture,
                      router=mtijax.snn.spiking_gate(model.config))
    limit = forward(model.config, model.params, tokens, capture=capture,
                    router=mtijax.snn.spiking_gate(model.config, **mtijax.snn.SOFTMAX_LIMIT))
    k = model.config.num_experts_per_tok
    chosen = np.asarray(spiking.captured["router_experts"])  # [L, 1, S, k]
    softmax_topk = np.asarray(jax.lax.top_k(spiking.captured["router_logits"], k)[1])
    plain_experts = np.asarray(plain.captured["router_experts"])

    def overlap(a: np.ndarray, b: np.ndarray) -> list[float]:
        """Mean |A ∩ B| / k per layer over tokens."""
        hits = (a[..., :, None] == b[..., None, :]).any(-1).sum(-1) / k
        return np.round(hits.mean(axis=(1, 2)), 4).tolist()

    return {"tokens": int(tokens.shape[1]), "gate": mtijax.snn.SEED_GATE,
            "agreement_same_logits": overlap(chosen, softmax_topk),
            "agreement_vs_plain_forward": overlap(chosen, plain_experts),
            "top1_same_logits": np.round((chosen[..., 0] == softmax_topk[..., 0]).mean(axis=(1, 2)), 4).tolist(),
            "loss_plain": round(loss(plain), 5), "loss_spiking": round(loss(spiking), 5),
            "loss_limit": round(loss(limit), 5), "uniform_loss": round(math.log(model.config.vocab_size), 5)}


def plot_similarity(rate_cos: np.ndarray, input_cos: np.ndarray, kinds: list[str], path: Path, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    ticks = [f"{k} {i % 4}" for i, k in enumerate(kinds)]
    for ax, m, title in zip(axes, (rate_cos, input_cos), ("routing: cosine of firing rates", "input: cosine")):
        im = ax.imshow(m, cmap="viridis", vmin=min(0.0, float(np.min(m))), vmax=1)
        ax.set_xticks(range(len(ticks)), ticks, rotation=90, fontsize=7)
        ax.set_yticks(range(len(ticks)), ticks, fontsize=7)
        ax.set_title(f"{name}\n{title}", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_null(result: dict, null_stats: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(MEASURES), figsize=(14, 3.2))
    for ax, m in zip(axes, MEASURES):
        for kind, color in (("random", "tab:blue"), ("shuffled", "tab:orange")):
            ax.hist(null_stats[kind][m], bins=12, alpha=0.6, color=color, label=f"{kind} synapses")
        ax.axvline(result["label_permutation"][m]["statistic"], color="black", lw=2, label="real synapses")
        ax.set_title(f"code-math minus code/math-prose\n{m}", fontsize=8)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def verdicts(gemma: dict, scales: list[dict], four: dict) -> dict[str, str]:
    """One line per claim of the seed, from the measurements."""
    raw = scales[0]
    blast = scales[-1]
    unit_row = next(r for r in scales if r["input"] == "normalised x 1")
    collapse_claim = (f"normalised: {'collapse' if unit_row['collapse'] else 'no collapse'} (top unit "
                      f"{unit_row['top_share']:.0%}, {unit_row['effective_winners']:.1f} effective winners); "
                      f"raw: {'collapse' if raw['collapse'] else 'no collapse'}; x{BLAST:g}: "
                      f"{'collapse' if blast['collapse'] else 'no collapse'} ({blast['collapse_reason']}), "
                      f"with {blast['units_firing']} units firing in lock-step")
    tops = [s["top_unit"] for s in four["summaries"]]
    jac = np.asarray(four["jaccard_top10"])
    off = jac[np.triu_indices(len(tops), 1)]
    distinct = (f"top units {tops}: {'all different' if len(set(tops)) == len(tops) else 'some shared'}; "
                f"Jaccard of top-10 units {off.min():.2f}..{off.max():.2f}; but the firing rates of the 12 "
                f"prompts have a mean cosine of {gemma['mean_rate_cosine']:.2f} (their inputs "
                f"{gemma['mean_input_cosine']:.2f}): the same units fire, the input picks which wins")
    lp, nn = gemma["label_permutation"], gemma["network_null"]
    cluster = "; ".join(f"{m}: statistic {lp[m]['statistic']:+.3f}, p(labels) {lp[m]['p_value']:.3f}, "
                        f"p(random nets) {nn['random'][m]['p_value']:.2f}, p(shuffled nets) "
                        f"{nn['shuffled'][m]['p_value']:.2f}" for m in ("rate_cosine", "same_band"))
    holds = lp["rate_cosine"]["p_value"] < 0.05 and nn["shuffled"]["rate_cosine"]["p_value"] < 0.05
    return {"blackhole_and_l2_fix": collapse_claim, "different_inputs_route_differently": distinct,
            "code_and_math_cluster": ("SUPPORTED: " if holds else "NOT SUPPORTED: ") + cluster +
            f"; inputs alone: p(labels) {lp['input_cosine']['p_value']:.3f}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--olmoe", default=None, help="an OLMoE checkpoint (default: a random OLMoE-shaped model)")
    parser.add_argument("--ticks", type=int, default=10_000)
    parser.add_argument("--nulls", type=int, default=10, help="null networks of each kind")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "snn_routing"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    gemma = mtijax.load("gemma3-270m")
    olmoe = mtijax.load(args.olmoe) if args.olmoe else random_olmoe()
    olmoe_name = "OLMoE " + Path(args.olmoe).name if args.olmoe else "random OLMoE-shaped (no semantics)"
    results = {
        **describe(),
        "gemma_embeddings": routing_section("Gemma 3 270M", gemma, gemma.tokenizer, "embeddings",
                                            "layers/attn/q_proj:0", args.ticks, args.nulls, out, plots=True),
        "gemma_resid8": routing_section("Gemma 3 270M", gemma, gemma.tokenizer, "resid:8", "layers/attn/q_proj:9",
                                        args.ticks, args.nulls, out, plots=False),
        "olmoe_embeddings": routing_section(olmoe_name, olmoe, olmoe.tokenizer or gemma.tokenizer, "embeddings",
                                            "layers/attn/q_proj:0", args.ticks, args.nulls, out, plots=False),
        "gemma_scales": scale_section(gemma, gemma.tokenizer, args.ticks),
        "gemma_seed_four": seed_four(gemma, gemma.tokenizer, args.ticks, out),
        "olmoe_gate": {"model": olmoe_name, **gate_section(olmoe, olmoe.tokenizer or gemma.tokenizer)},
        "collapse_thresholds": {"top_share": analysis.COLLAPSE_TOP_SHARE,
                                "effective_units": analysis.COLLAPSE_EFFECTIVE_UNITS},
    }
    results["verdicts"] = verdicts(results["gemma_embeddings"], results["gemma_scales"], results["gemma_seed_four"])
    (out / "results.json").write_text(json.dumps(results, indent=1))

    for key in ("gemma_embeddings", "gemma_resid8", "olmoe_embeddings"):
        r = results[key]
        print(f"\n{r['model']}: driver {r['driver']}, synapses {r['synapses']}, {r['units']} GIF units, "
              f"{r['ticks']} ticks")
        print(f"{'kind':<6} {'top unit':>8} {'share':>6} {'eff. winners':>12} {'band':>4} {'firing':>6}  prompt")
        for row in r["prompts"]:
            print(f"{row['kind']:<6} {row['top_unit']:>8} {row['top_share']:>6.2f} {row['effective_winners']:>12.1f} "
                  f"{row['dominant_band']:>4} {row['units_firing']:>6}  {row['prompt'][:50]}"
                  f"{'  [COLLAPSE]' if row['collapse'] else ''}")
        for m in MEASURES:
            lp, nn = r["label_permutation"][m], r["network_null"]
            print(f"  clustering {m:<11}: statistic {lp['statistic']:+.3f}  p(labels) {lp['p_value']:.3f}  "
                  f"p(random nets) {nn['random'][m]['p_value']:.2f}  p(shuffled nets) {nn['shuffled'][m]['p_value']:.2f}")
        print(f"  inputs alone (cosine): p(labels) {r['label_permutation']['input_cosine']['p_value']:.3f}; mean "
              f"cosine between prompts: firing rates {r['mean_rate_cosine']:.2f}, inputs {r['mean_input_cosine']:.2f}")
    print("\nGemma 3 270M, the seed's English prompt at several input norms:")
    for row in results["gemma_scales"]:
        print(f"  {row['input']:<22} norm {row['norm']:>12g}: top {row['top_unit']:>4} {row['top_share']:.2f}, "
              f"{row['effective_winners']:.2f} eff. winners, {row['units_firing']} firing, "
              f"{'COLLAPSE: ' + row['collapse_reason'] if row['collapse'] else 'no collapse'}")
    g = results["olmoe_gate"]
    print(f"\nspiking MoE gate on {g['model']} ({g['tokens']} held-out tokens): top-k agreement with softmax on the "
          f"same logits {g['agreement_same_logits']}, vs the plain forward {g['agreement_vs_plain_forward']}; "
          f"loss {g['loss_plain']} -> {g['loss_spiking']} (limit {g['loss_limit']}, uniform {g['uniform_loss']})")
    print("\nverdicts:")
    for claim, text in results["verdicts"].items():
        print(f"  {claim}: {text}")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
