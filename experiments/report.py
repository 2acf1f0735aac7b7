"""Render every results table of README.md from the committed results under experiments/results/.

    python experiments/report.py            # print every table
    python experiments/report.py --write    # rewrite the marked regions of README.md
    python experiments/report.py --check    # exit 1 (and print a diff) when README.md differs from the render

A table lives in README.md between ``<!-- report:NAME -->`` and ``<!-- /report:NAME -->``; only those
regions are ever rewritten. A table is one function registered with :func:`table`: it takes the loaded
results file (JSON as a dict, CSV as a list of row dicts) and returns the region's markdown, a caption
naming the machine and the file, then the table. A table whose results file does not exist yet renders
nothing, and its region keeps whatever it holds. Extrapolations are rendered apart from measurements,
labelled as such.

Adding a table: write ``@table("name", "file.json") def name(data) -> str``, and put the two markers in
README.md where it belongs.
"""

from __future__ import annotations

import argparse
import csv
import difflib
import json
import re
import sys
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).parent))

from seed_claims import FUSION_MEMORY_OVERHEAD, FUSION_TIME_OVERHEAD, INJECTION_TABLE  # noqa: E402

RESULTS = Path(__file__).parent / "results"
README = Path(__file__).parent.parent / "README.md"
REGION = re.compile(r"<!-- report:([\w-]+) -->\n(.*?)<!-- /report:\1 -->", re.DOTALL)
MODEL_NAMES = {"gemma3-270m": "Gemma 3 270M", "gemma3-1b": "Gemma 3 1B", "gemma3-4b": "Gemma 3 4B",
               "gemma3-12b": "Gemma 3 12B", "gemma3-27b": "Gemma 3 27B", "olmoe-1b-7b": "OLMoE-1B-7B"}

TABLES: dict[str, tuple[str, Callable[[Any], str]]] = {}


def table(name: str, source: str) -> Callable:
    """Register ``render(data) -> markdown`` as the table of region ``name``, drawn from ``results/source``."""
    def register(render: Callable[[Any], str]) -> Callable[[Any], str]:
        if name in TABLES:
            raise ValueError(f"table {name!r} is registered twice")
        TABLES[name] = (source, render)
        return render
    return register


# --- formatting ------------------------------------------------------------------------------------------------

def markdown(header: list[str], rows: list[list[Any]]) -> str:
    """A markdown table; every cell is ``str()``-ed."""
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def num(x: float) -> str:
    """Three significant digits below 1000 (``29.4``, ``90.0``), whole numbers with spaced thousands above
    (``9 108``)."""
    if abs(x) >= 1000:
        return f"{round(x):,}".replace(",", " ")
    return f"{x:#.3g}".rstrip(".")


def pct(x: float, digits: int = 0) -> str:
    """A fraction as a percentage: ``0.72 -> 72%``."""
    return f"{100 * x:.{digits}f}%"


def big(x: float) -> str:
    """Three significant digits, in exponent notation from 1e5 on: ``30.3``, ``440``, ``1.2e11``."""
    return f"{x:.1e}".replace("e+0", "e").replace("e+", "e") if abs(x) >= 1e5 else num(x)


def duration(seconds: float) -> str:
    """``156.3 ms``, ``1.54 ms``, ``1.36 s``."""
    ms = 1e3 * seconds
    return f"{seconds:.2f} s" if ms >= 1000 else f"{ms:.1f} ms" if ms >= 10 else f"{ms:.2f} ms"


def signed_pct(x: float) -> str:
    """A relative change as a signed percentage: ``0.171 -> +17.1%``."""
    return f"{100 * x:+.1f}%"


def slashed(values, suffix: str = "") -> str:
    """``a / b / c``: numbers to one decimal (with ``suffix``), anything else as it is."""
    return " / ".join(f"{v:.1f}{suffix}" if isinstance(v, float) else f"{v}{suffix}" for v in values)


def machine(data: dict) -> str:
    """The machine a results file says it ran on: its device (``"cpu"`` becomes "CPU"), and the jax version;
    a file that recorded none says so."""
    device = data.get("device")
    if device is None:
        return "a machine the results file does not record"
    name = "CPU" if str(device).lower() == "cpu" else str(device)
    extra = [f"jax {data['jax']}"] if "jax" in data else []
    if data.get("host_cores"):
        extra.append(f"{data['host_cores']} host cores")
    return f"{name} ({', '.join(extra)})" if extra else name


def caption(data: dict, source: str, what: str = "Measured") -> str:
    """``Measured on <machine>; `experiments/results/<source>`.``"""
    return f"{what} on {machine(data)}; `experiments/results/{source}`."


# --- checkpoints ----------------------------------------------------------------------------------------------

@table("bench_tokenizer", "bench_tokenizer_cpu.json")
def bench_tokenizer(b: dict) -> str:
    """A cached load of the 262k-piece GGUF vocabulary, against transformers loading it in the same run."""
    names = {"mtijax": "mtijax: the cached sentencepiece model",
             "transformers_auto": "transformers: `AutoTokenizer` of its own conversion (mtijax's former cache)",
             "transformers_backend": "transformers: `PreTrainedTokenizerFast(tokenizer_file=...)` of it"}
    ours = b["cached_load"]["mtijax"]["median_cpu_s"]
    rows = [[names[kind], f"{r['median_wall_s']:.2f}", f"{r['median_cpu_s']:.2f}", f"{r['median_cpu_s'] / ours:.1f}x"]
            for kind, r in b["cached_load"].items()]
    load = f"{b['load_average_before'][0]:.1f} and {b['load_average_after'][0]:.1f}"
    head = (f"Measured on {machine(b)}, {b['vocabulary']:,} pieces, median of {b['repeats']} loads each in a fresh "
            f"process (imports excluded); 1-minute load average {load} before and after, so wall times include "
            f"waiting for a core; `experiments/results/bench_tokenizer_cpu.json`.")
    tail = (f"Once per GGUF file: opening it took {b['open_gguf_s']:.1f} s (the `gguf` reader), converting the "
            f"vocabulary {b['convert_mtijax_s']:.1f} s ({b['convert_transformers_s']:.1f} s for transformers' "
            f"conversion); the two give the same ids on the probe texts: {'yes' if b['same_ids'] else '**no**'}.")
    return "\n".join([head, "", markdown(["cached load", "wall s", "CPU s", "CPU time against mtijax's"], rows),
                      "", tail])


@table("first_run", "first_run_cpu.json")
def first_run(r: dict) -> str:
    """The quick start's two commands on the machine kind they were run on (``bench_first_run.py``)."""
    rows = []
    if "generate" in r:
        g = r["generate"]
        rows += [[f"`{g['command']}`, {kind}", f"{g[kind]['first_token_s']:.1f} s to the first token, "
                  f"{g[kind]['total_s']:.1f} s in all"] for kind in ("cold", "warm")]
    if "suite" in r:
        s = r["suite"]
        status = "passed" if s["exit_status"] == 0 else f"**exit status {s['exit_status']}**"
        rows.append([f"`{s['command']}`", f"{s['wall_s'] / 60:.1f} min, peak memory {s['peak_rss_gb']:.1f} GB, "
                     f"{status}"])
    return "\n".join([caption(r, "first_run_cpu.json") + " Cold: an empty `$MTIJAX_CACHE`; warm: the same command "
                      "again, with the tokenizer the first run cached.", "",
                      markdown(["command", "time"], rows)])


# --- seed 000: injection ---------------------------------------------------------------------------------------

@table("injection", "resonance_injection/study.json")
def injection(study: dict) -> str:
    """The seed's table beside ours, alpha by alpha, with how many greedy continuations stay as at alpha 0."""
    seed = {alpha: (norm, div) for alpha, norm, div in INJECTION_TABLE}
    unchanged = study["rows"][0]["continuations"]
    rows = []
    for row in study["rows"]:
        same = sum(a == b for a, b in zip(row["continuations"], unchanged))
        seed_norm, seed_div = seed.get(row["alpha"], ("", ""))
        rows.append([f"{row['alpha']:.2f}", seed_norm and f"{seed_norm:.2f}", seed_div != "" and f"{seed_div:.2f}",
                     f"{row['output_norm']:.2f}", f"{row['divergence']:.2f}", f"{row['kl']:.4f}",
                     f"{row['top1_agreement']:.2f}", f"{same} of {len(unchanged)}"])
    head = caption(study.get("setup", {}), "resonance_injection/study.json")
    body = markdown(["alpha", "seed 000: output norm", "seed 000: divergence", "measured: output norm",
                     "measured: divergence", "measured: KL (nats)", "measured: top-1 agreement",
                     "measured: greedy continuations as at alpha 0"], rows)
    lines = [head, "", body]
    check = study["integrity"]
    lines += ["", f"Integrity, after the sweep: checksums of {check['files']} file(s) "
                  f"{'unchanged' if check['checksums_unchanged'] else '**changed**'}; "
                  + (f"{check['tensors']} params leaves reloaded from disk, "
                     f"{'all equal to' if check['arrays_unchanged'] else '**not all equal to**'} those loaded before; "
                     if "arrays_unchanged" in check else "tensors not reloaded (an older run); ")
                  + f"probe difference {check['probe_diff']:g}."]
    texts = study["rows"][-1].get("texts")
    if texts:
        lines += ["", f"The {len(texts)} continuations at alpha {study['rows'][-1]['alpha']:.2f} "
                      f"({len(study['rows'][-1]['continuations'][0])} greedy tokens; alpha 0's in brackets):", ""]
        lines += [f"- {prompt!r} -> {text!r} ({base!r})" for prompt, text, base in
                  zip(study["setup"]["prompt_texts"], texts, study["rows"][0]["texts"])]
    return "\n".join(lines)


# --- seed 003: SNN router --------------------------------------------------------------------------------------

@table("snn_seed_runs", "snn_routing/results.json")
def snn_seed_runs(results: dict) -> str:
    """The seed's four runs on the Gemma network."""
    runs = results["gemma_seed_four"]
    section = results["gemma_embeddings"]
    rows = [[label, s["top_unit"], f"{s['top_share']:.2f}", f"{s['effective_winners']:.2f}", s["units_firing"],
             f"**yes**: {s['collapse_reason']}" if s["collapse"] else "no"]
            for label, s in zip(runs["labels"], runs["summaries"])]
    head = (f"{section['model']}, embeddings driver, synapses `{section['synapses']}` ({section['units']} GIF units), "
            f"{section['ticks']:,} ticks; computed on {machine(results)} (the run is device-independent up to "
            f"float32 rounding); `experiments/results/snn_routing/results.json`.")
    return "\n".join([head, "", markdown(["run", "top unit", "share of ticks", "effective winners", "units firing",
                                          "collapse"], rows)])


@table("snn_scales", "snn_routing/results.json")
def snn_scales(results: dict) -> str:
    """The English prompt at other input norms."""
    rows = [[s["input"], f"{s['norm']:.3g}", s["units_firing"], f"{s['effective_winners']:.2f}",
             f"{s['top_share']:.2f}", "**yes**" if s["collapse"] else "no"] for s in results["gemma_scales"]]
    return "\n".join([f"Same network and prompt; `experiments/results/snn_routing/results.json`.", "",
                      markdown(["input", "norm", "units firing", "effective winners", "top unit's share of ticks",
                                "collapse"], rows)])


def _clustering_cell(section: dict, measure: str) -> str:
    labels = section["label_permutation"][measure]
    nulls = section.get("network_null", {})
    brackets = ", ".join(f"{nulls[kind][measure]['p_value']:.2f}" for kind in ("random", "shuffled")
                         if measure in nulls.get(kind, {}))
    return f"{labels['statistic']:+.3f}, p {labels['p_value']:.2f}" + (f" ({brackets})" if brackets else "")


@table("snn_clustering", "snn_routing/results.json")
def snn_clustering(results: dict) -> str:
    """Code-math closeness against shuffled labels and null networks, per driver."""
    rows = []
    for key in ("gemma_embeddings", "gemma_resid8", "olmoe_embeddings"):
        s = results[key]
        rows.append([f"{s['model']}: {s['driver']} -> `{s['synapses']}`, {s['units']} units",
                     *(_clustering_cell(s, m) for m in ("rate_cosine", "jaccard", "same_band")),
                     f"p {s['label_permutation']['input_cosine']['p_value']:.2f}"])
    return "\n".join(["Statistic, p against shuffled labels (in brackets: against 10 random and 10 shuffled-synapse "
                      "networks); `experiments/results/snn_routing/results.json`.", "",
                      markdown(["driver", "rate cosine", "winners' Jaccard", "same dominant band",
                                "the inputs themselves"], rows)])


@table("bench_snn", "bench_snn_h100.json")
def bench_snn(bench: dict) -> str:
    """The seed's workload and the LIF layer against their peers in the same run."""
    rows = []
    for r in bench["rows"]:
        if r["workload"] == "seed":
            rows.append([f"seed: {r['units']} GIF units x {r['ticks']:,} ticks, batch {r['batch']}",
                         f"{1e3 * r['mtijax_s']:.1f} ms ({r['mtijax_ticks_per_s'] / 1e3:.0f}k ticks/s)",
                         f"PyTorch loop {r['torch_loop_s']:.2f} s; NumPy loop {r['numpy_loop_s']:.2f} s",
                         f"{num(r['torch_loop_s'] / r['mtijax_s'])}x; {num(r['numpy_loop_s'] / r['mtijax_s'])}x "
                         f"(best units agree: PyTorch {100 * r['torch_agreement']:.6g}%, NumPy {100 * r['numpy_agreement']:.6g}%)"])
        else:
            rows.append([f"LIF layer, {r['units']:,} units x {r['ticks']} ticks, batch {r['batch']}, forward",
                         f"{1e3 * r['mtijax_s']:.1f} ms",
                         f"spyx {r['spyx_version']}: {1e3 * r['spyx_s']:.1f} ms; "
                         f"snnTorch {r['snntorch_version']}: {1e3 * r['snntorch_s']:.1f} ms",
                         f"{r['spyx_s'] / r['mtijax_s']:.1f}x; {r['snntorch_s'] / r['mtijax_s']:.1f}x"])
    head = f"{caption(bench, 'bench_snn_h100.json')} torch {bench['torch']}."
    return "\n".join([head, "", markdown(["workload", "mtijax", "peer", "ratio"], rows)])


# --- seeds 004, 000: layer streaming ---------------------------------------------------------------------------

@table("stream_selection", "stream_selection_270m.json")
def stream_selection(results: dict) -> str:
    """Perplexity of a held-out text under each selection of layers, with the single skips apart."""
    s = results["selection"]
    total = len(s["rows"][0]["layers"])
    names = {"all layers": "all layers", "keyword: no keyword": "keyword rule, no keyword"}
    rows, singles = [], []
    for r in s["rows"]:
        if r["name"].startswith("skip layer "):
            singles.append(r)
            continue
        name = names.get(r["name"], r["name"].replace("keyword: ", "keyword rule, ").replace(
            "cheapest skips: ", "the layers whose single skip costs least: "))
        rows.append([name, len(r["layers"]), big(r["perplexity"]), f"{r['nll_increase']:.2f}",
                     pct(r["bytes_saved"])])
    head = (f"{s['model']}, {total} layers; {s['held_out_tokens']}-token held-out English passage; computed on "
            f"{machine(results)} (device-independent); `experiments/results/stream_selection_270m.json`.")
    single = markdown(["skipped layer", *(r["name"].removeprefix("skip layer ") for r in singles)],
                      [["NLL increase", *(f"{r['nll_increase']:.2f}" for r in singles)]])
    return "\n".join([head, "", markdown(["selection", "layers run", "perplexity", "NLL increase (nats/token)",
                                          "layer bytes saved"], rows), "",
                      f"One layer skipped ({pct(singles[0]['bytes_saved'])} of the layer bytes saved), "
                      "NLL increase in nats/token:", "", single])


def _host_cache(stats: dict, layers: int, setting: Any = "absent") -> str:
    cache = stats["host_cache"]
    if setting == "absent":  # older results: read the setting off the counters
        held = "every layer" if cache["items"] == layers and cache["evictions"] == 0 else f"{cache['items']} layers"
        return f"the host cache held {held} ({cache['items']} items, {cache['evictions']} evictions)"
    return f"host cache of {'every layer (unbounded)' if setting is None else f'{setting} layers'}"


@table("bench_stream", "bench_stream_h100.json")
def bench_stream(b: dict) -> str:
    """Everything one streaming benchmark run measured, all at the size it ran (its JSON's extrapolation to 48
    layers is not rendered: the README sets no extrapolation beside a measurement)."""
    bw, st, peer, res = b["bandwidth"], b["stream"], b["peer"], b["resident"]
    layers, per = st["layers"], {r["batch"]: r for r in st["batches"]}
    first = per[min(per)]
    prefetch = st["prefetch"]
    peer_rate = {r["batch"]: r["decode_tok_s"] for r in peer["batches"]}
    whole = {r["batch"]: r for r in b["olmoe"]["whole_layers"]}
    experts = {r["batch"]: r for r in b["olmoe"]["experts"]}
    rows = [
        ["pinned host -> device copy", f"{bw['pinned_to_device_gbps']:.1f} GB/s ({bw['pinned_to_device_queued_gbps']:.1f}"
         f" GB/s with copies queued); pageable numpy -> device {bw['pageable_to_device_gbps']:.1f} GB/s"],
        ["filling pinned memory: first touch / refill of reused pages",
         f"{bw['pinned_first_fill_gbps']:.1f} GB/s / {bw['pinned_refill_gbps']:.1f} GB/s"],
        [f"streamed decode pass (host cache warm), batch {first['batch']}",
         f"{1e3 * first['decode_pass_s']:.1f} ms, {first['effective_gbps']:.1f} GB/s effective, "
         f"{pct(first['fraction_of_pinned_bandwidth'])} of the pinned copy rate (goal 85%)"],
        ["the same pass: transfer alone / compute alone (layers resident)",
         f"{1e3 * st['transfer_only_pass_s']:.1f} ms / {1e3 * st['compute_only_pass_s']:.1f} ms"],
        [f"prefetch {slashed(p['prefetch'] for p in prefetch)}",
         f"{slashed(1e3 * p['decode_pass_s'] for p in prefetch)} ms per pass "
         f"({slashed(p['effective_gbps'] for p in prefetch)} GB/s)"],
        [f"tokens/s at batch {slashed(per)}", slashed(r["decode_tok_s"] for r in per.values())],
        ["peak device memory, streamed / all layers resident",
         f"{st['allocator_peak_bytes'] / 1e9:.1f} GB allocator peak ({st['accounted_peak_bytes'] / 1e9:.1f} GB "
         f"accounted: at most {st['stats']['max_live_layers']} layers live) / {res['allocator_peak_bytes'] / 1e9:.1f} GB"],
        [f"peer: {peer['what']}, batch {slashed(peer_rate)}",
         f"{slashed(num(v) for v in peer_rate.values())} tok/s (streamed is "
         f"{slashed([per[k]['decode_tok_s'] / v for k, v in peer_rate.items()], suffix='x')} faster)"],
        ["cold pass (layers read from the page cache into pinned memory)",
         f"{st['cold_pass']['seconds']:.2f} s, {st['cold_pass']['read_gbps']:.1f} GB/s"],
        [f"OLMoE-1B-7B shapes ({b['olmoe_config']['num_layers']} layers), bytes moved per token, whole layers / "
         "experts only", "; ".join(f"batch {k}: {whole[k]['bytes_per_token'] / 1e9:.2f} GB / "
                                   f"{experts[k]['bytes_per_token'] / 1e9:.2f} GB" for k in whole)],
        ["OLMoE tokens/s, whole layers / experts only",
         "; ".join(f"batch {k}: {whole[k]['decode_tok_s']:.1f} / {experts[k]['decode_tok_s']:.1f}" for k in whole)],
    ]
    config = b["gemma"]["config"]
    head = (f"Measured on {machine(b)}; {layers} of the 12B's {b['gemma'].get('layers_of', 48)} layers "
            f"(hidden {config['hidden_size']}), {st['layer_bytes'] / 1e6:.0f} MB each, bfloat16; "
            f"{_host_cache(st['stats'], layers, st.get('host_cache_layers', 'absent'))}, not the default 8-layer "
            f"LRU; `experiments/results/bench_stream_h100.json`. Every figure is at {layers} layers:")
    return "\n".join([head, "", markdown(["what", "measured"], rows)])


# --- seed 002: fusion layers -----------------------------------------------------------------------------------

@table("fusion_parameters", "train_fusion/results.json")
def fusion_parameters(results: dict) -> str:
    """Trained parameters per preset against the seed's counts."""
    rows = [[name, ", ".join(map(str, p["positions"])), ", ".join(p["components"]), f"{p['parameters']:,}",
             f"{p['parameters_at_768_wide']:,}", p["seed_claim"]] for name, p in results["parameter_counts"].items()]
    return "\n".join([f"Counted on the embedded Gemma 3 270M; `experiments/results/train_fusion/results.json`.", "",
                      markdown(["preset", "positions on the 270M", "components", "trained params (width 640)",
                                "at GPT-2's width (768)", "seed"], rows)])


@table("fusion_overhead_cpu", "train_fusion/results.json")
def fusion_overhead_cpu(results: dict) -> str:
    """Forward time per preset, and the same positions with identity transforms."""
    f = results["forward_overhead"]
    v = f["variants"]
    rows = [["base", f"{1e3 * v['base']['median_seconds']:.0f}", "", "", ""]]
    for preset in ("minimal", "standard", "full"):
        rows.append([preset, f"{1e3 * v[preset]['median_seconds']:.0f}", signed_pct(v[preset]["overhead_vs_base"]),
                     signed_pct(v[f"{preset} positions, identity"]["overhead_vs_base"]), v[preset]["seed_claim"]])
    head = (f"Measured on {machine(results)}, float32, forward to logits of {f['tokens'][0]} x {f['tokens'][1]} "
            f"tokens, median of {f['repeats']} interleaved runs (random-init fusion params); "
            "`experiments/results/train_fusion/results.json`.")
    return "\n".join([head, "", markdown(["variant", "ms", "vs base", "same positions, identity transforms",
                                          "seed"], rows)])


@table("fusion_perplexity", "train_fusion/results.json")
def fusion_perplexity(results: dict) -> str:
    """Held-out perplexity before and after training, against the linear control."""
    e, c = results["training"]["evaluation"], results["control"]
    t = results["training"]["train"]
    rows = [["base", 0, f"{e['perplexity_base']:.2f}", ""],
            ["standard preset", f"{e['parameters']:,}", f"{e['perplexity_fused_before']:.2f}",
             f"{e['perplexity_fused_after']:.2f}"],
            [f"control: {c['what']}", f"{c['parameters']:,}", f"{c['evaluation']['perplexity_fused_before']:.2f}",
             f"{c['evaluation']['perplexity_fused_after']:.2f}"]]
    head = (f"Trained on {machine(results)}: {t['steps']} steps of {t['batch_size']} x {t['seq_len']} tokens, AdamW "
            f"at learning rate {t['learning_rate']:g}, {t['warmup_steps']} warmup steps, cosine decay, seed {t['seed']}; "
            f"held out: {e['held_out_windows']} windows, {e['held_out_tokens']} tokens; "
            "`experiments/results/train_fusion/results.json`.")
    return "\n".join([head, "", markdown(["model", "trained params", "before training",
                                          f"after {t['steps']} steps"], rows)])


@table("fusion_gpu", "bench_fusion.json")
def fusion_gpu(bench: dict) -> str:
    """Forward-time and device-memory overhead per preset and size, against the seed's +5/15/25% and +2/5/8%."""
    def gb(value: int | None) -> str:
        return "n/a" if value is None else f"{value / 1e9:.2f}"

    def change(value: float | None) -> str:
        return "n/a" if value is None else signed_pct(value)

    rows = []
    for r in bench["runs"]:
        base = r["base"]
        for preset, p in r["presets"].items():
            rows.append([MODEL_NAMES.get(r["size"], r["size"]), r.get("layer_split", "-"), preset,
                         ", ".join(map(str, p["positions"])),
                         f"{p['fusion_parameters']:,}", duration(base["seconds"]), duration(p["seconds"]),
                         signed_pct(p["time_overhead"]), signed_pct(p["identity_time_overhead"]),
                         f"+{100 * FUSION_TIME_OVERHEAD[preset]:.0f}%", gb(base["peak_bytes"]), gb(p["peak_bytes"]),
                         change(p["memory_overhead"]), change(p["accounted_memory_overhead"]),
                         f"+{100 * FUSION_MEMORY_OVERHEAD[preset]:.0f}%"])
    head = (f"Measured on {machine(bench)}, {bench['dtype']} random weights, forward to logits of {bench['batch']} x "
            f"{bench['seq_len']} tokens, median of {bench['repeats']} interleaved runs; peak device memory: "
            f"{bench['memory_source']}; \"accounted\" is XLA's memory analysis of the compiled forward (arguments, "
            "outputs, temporaries); `experiments/results/bench_fusion.json`.")
    early = [r["size"] for r in bench["runs"] for v in (r["base"], *r["presets"].values())
             if v.get("peak_is_the_forwards") is False]
    if early:
        head += (f" **For {', '.join(sorted(set(early)))}, the allocator's peak was reached before the forward "
                 "(making the params), so its peak columns do not measure the forward.**")
    return "\n".join([head, "", markdown(
        ["model", "layer split", "preset", "positions", "fusion params", "base", "fused", "time", "identity transforms",
         "seed: time", "base peak GB", "fused peak GB", "memory", "accounted", "seed: memory"], rows)])


# --- the generation engine --------------------------------------------------------------------------------

def _seconds(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f} s"


def _compile_table(b: dict, source: str) -> str:
    """Seconds to the first token: cold, warm, in a second process, and what each new shape costs over warm;
    with the quick-start command's cold and warm first output where the run has it."""
    m = b["machine"]
    shapes = ["prompt_300", "prompt_1000", "new_64", "new_200"]
    rows = []
    for name, model in b["models"].items():
        s = model.get("summary") or {}
        if not s.get("cold_first_token_s"):
            continue
        new = s.get("new_shapes") or {}
        longest = next((k for k in new if k.startswith("prompt_") and k not in shapes), None)
        cells = [new.get(k, {}).get("over_warm_s") for k in shapes[:2] + ([longest] if longest else [None]) + shapes[2:]]
        rows.append([MODEL_NAMES.get(name, name), _seconds(s["cold_first_token_s"]), _seconds(s["warm_first_token_s"]),
                     _seconds(s.get("second_process_first_token_s")),
                     *[("skipped" if c is None else f"{c:+.2f} s") for c in cells],
                     longest.split("_")[1] if longest else "-"])
    gpu = m.get("platform") == "gpu"
    where = m["device"] if gpu else (m["cpu"] or "a CPU")
    head = (f"Measured on {where} ({m['cpu_cores']} host cores, jax {m['jax']}), random "
            f"{'bfloat16' if gpu else 'float32'} weights, a 100-token prompt and 16 new tokens, greedy; a new shape's "
            "cost is its first call's first token minus the same call repeated. Targets: " +
            ("cold first token at most 10 s (270M) and 30 s (12B), a new shape at most 1 s over warm, a second "
             "process at most 3 s (270M)." if gpu else "the quick-start command's first output within 15 s with a "
             "warm cache.") + f" `experiments/results/{source}`.")
    table = markdown(["model", "cold first token", "warm", "second process", "prompt 300", "prompt 1000", "prompt L",
                      "max_new 64", "max_new 200", "L"], rows)
    quick = b.get("quick_start")
    if quick:
        first = lambda run: _seconds(quick.get(run, {}).get("first_stdout_s"))
        table += ("\n\n" + markdown(["command", "cold first output", "warm first output"],
                                     [[f"`{quick['command']}`", first("cold"), first("warm")]]))
    return "\n".join([head, "", table])


@table("bench_compile_h200", "bench_compile_h200.json")
def bench_compile_h200(b: dict) -> str:
    """The compile costs on the H200."""
    return f"Code: {b['machine']['commit']}. " + _compile_table(b, "bench_compile_h200.json")


@table("bench_compile_h200_c6e3d55", "bench_compile_h200_c6e3d55.json")
def bench_compile_h200_c6e3d55(b: dict) -> str:
    """The H200's compile costs before decode blocks."""
    return f"Code: {b['machine']['commit']}. " + _compile_table(b, "bench_compile_h200_c6e3d55.json")


@table("bench_compile_h200_before", "bench_compile_h200_before.json")
def bench_compile_h200_before(b: dict) -> str:
    """The H200's compile costs before the 8192-slot rung and the per-layer weight buffers (three models)."""
    return f"Code: {b['machine']['commit']}. " + _compile_table(b, "bench_compile_h200_before.json")


@table("step_profile_h200", "probe_step_profile_270m_h200.json")
def step_profile_h200(results: dict) -> str:
    """Per variant and code: the first call (compiles), the untraced step, GPU time and kernels per step."""
    rows = []
    for number, run in enumerate(results["runs"], 1):
        for name, v in run["variants"].items():
            prefill = name.startswith("prefill")
            rows.append([number, name.replace("_", " "), f"{v['first_call_s']:.1f} s",
                         "-" if "steady_ms" not in v else f"{v['steady_ms']:.2f} ms",
                         f"{v['wall_ms']:.2f} ms", f"{v['busy_ms']:.2f} ms", num(v["kernels"]),
                         "call" if prefill else "step"])
    codes = "; ".join(f"run {n}: {run['code']}" for n, run in enumerate(results["runs"], 1))
    head = (f"Measured on {results['runs'][0]['device']} (jax {results['runs'][0]['jax']}), Gemma 3 270M shapes "
            "(random bfloat16), greedy, no persistent compilation cache; `r256` variants ran on the default ladder "
            "of their commit (a 512-slot rung), `r8k`/`r32k` on a pinned rung; first call: the variant's first "
            "call in its process (compiles; XLA's in-process autotuning results carry over from earlier variants "
            "of the same run); steady: 64 untraced steps; traced: wall time per step under the profiler; GPU "
            f"time: the kernels' summed durations. {codes}. `experiments/results/probe_step_profile_270m_h200.json`.")
    return "\n".join([head, "", markdown(["run", "variant", "first call", "steady", "traced", "GPU time", "kernels",
                                           "per"], rows)])


@table("bench_compile_cpu", "bench_compile_cpu.json")
def bench_compile_cpu(b: dict) -> str:
    """The compile costs on this project's 2-core CPU machine, with the quick-start command."""
    return f"Code: {b['machine']['commit'][:7]}. " + _compile_table(b, "bench_compile_cpu.json")


@table("compile_levers_h200", "probe_compile_levers_12b_h200.json")
def compile_levers_h200(b: dict) -> str:
    """Compile time and per-token time of the decode-step forms, Gemma 3 12B shapes."""
    rows = [[r["variant"], r["flags"], r["batch"], f"{r['compile_s']:.0f} s", f"{r['ms_per_token']:.2f} ms",
             pct(r["fraction_of_bound"])] for r in b["runs"] if "ms_per_token" in r]
    head = (f"Measured on {b['device']}, Gemma 3 12B shapes (random bfloat16), a {b['cache_slots']}-slot cache half "
            "full, each variant compiled in a fresh process with no compilation cache; bound: weight bytes per token "
            "over the copy bandwidth measured in the same run; `experiments/results/probe_compile_levers_12b_h200.json`.")
    return "\n".join([head, "", markdown(["decode form", "XLA flags", "batch", "compile", "per token",
                                            "of bound"], rows)])


# --- seed 001: activation patching -----------------------------------------------------------------------------

def _mean_std(row: dict, key: str) -> str:
    return f"{row[f'{key}_mean']:.2f} ± {row[f'{key}_std']:.2f}"


@table("patching_strategies", "behavior_transfer/study.json")
def patching_strategies(study: dict) -> str:
    """Every strategy as the original ran it and as the seed describes it, against the seed's claims."""
    settings = study["settings"]

    def mode(m: str) -> str:
        return m.replace("as_ran", "as ran").replace("as_described", "as described").replace(
            "(mean)", "(`mean`)").replace("(trajectory)", "(`trajectory`)")

    rows = []
    for name, row in (("baseline", study["baseline"]), ("champion", study["champion"])):
        rows.append([name, "", _mean_std(row, "score"), "", _mean_std(row, "markers"),
                     f"{row['repetitive_fraction']:.2f}", f"{row['kl_from_champion']:.2f}", _mean_std(row, "r_v"), ""])
    for row in study["rows"]:
        rows.append([row["strategy"], mode(row["mode"]), _mean_std(row, "score"),
                     f"{row['efficiency']:.2f} ({row['efficiency_per_seed_mean']:.2f} ± "
                     f"{row['efficiency_per_seed_std']:.2f})", _mean_std(row, "markers"),
                     f"{row['repetitive_fraction']:.2f}", f"{row['kl_from_champion']:.2f}", _mean_std(row, "r_v"),
                     pct(row["seed_claim_efficiency"])])
    head = (f"Computed on {machine(study)}; {settings['seeds']} sampled runs per condition (temperature "
            f"{settings['temperature']}, {settings['max_new_tokens']} new tokens), KV `{settings['kv_policy']}`, first "
            f"token `{settings['first_token']}`; \"as described\" patches the champion's `{settings['decode']}` value "
            f"unless named; `experiments/results/behavior_transfer/study.json`.")
    return "\n".join([head, "", markdown(["strategy", "mode", "score", "efficiency (per seed)", "markers",
                                          "repetitive", "KL (nats)", "R_V", "seed's claim"], rows)])


@table("patching_layers", "behavior_transfer/study.json")
def patching_layers(study: dict) -> str:
    """The minimal-layer search: which caches carry the transfer."""
    s = study["layer_search"]
    runs = study["settings"]["sweep_seeds"]

    def spread(rows: list[dict], key: str) -> str:
        values = [r[key] for r in rows]
        return f"{min(values):.2f}-{max(values):.2f}"

    best_single = min(s["kv_single"], key=lambda r: r["kl_from_champion"])
    pairs = sorted(s["kv_pairs_best"], key=lambda r: r["kl_from_champion"])
    whole = next(r for r in study["rows"] if r["strategy"] == "kv+v" and r["mode"] == "as_described")
    last = len(s["kv_single"]) - 1
    rows = [["every layer (the strategies above)", study["v_layer"], study["settings"]["seeds"],
             f"{whole['kl_from_champion']:.2f}", f"{whole['efficiency']:.2f}", f"{whole['markers_mean']:.2f}"],
            ["every layer", f"each of 0-{last}", runs, spread(s["v_single"], "kl_from_champion"),
             spread(s["v_single"], "efficiency"), spread(s["v_single"], "markers_mean")],
            [f"one layer, each of 0-{last}", study["v_layer"], runs,
             f"{spread(s['kv_single'], 'kl_from_champion')} (lowest: layer {best_single['layers']})",
             spread(s["kv_single"], "efficiency"), spread(s["kv_single"], "markers_mean")]]
    for i, p in enumerate(pairs):
        rank = f" (the lowest KL of all {len(s['kv_pairs_kl'])} pairs)" if i == 0 else ""
        rows.append([f"layers {p['layers'].replace(',', ' + ')}{rank}", study["v_layer"], runs,
                     f"{p['kl_from_champion']:.2f}", f"{p['efficiency']:.2f}", f"{p['markers_mean']:.2f}"])
    head = (f"Computed on {machine(study)}; {s['plan']}; one prompt pair; "
            "`experiments/results/behavior_transfer/study.json`.")
    return "\n".join([head, "", markdown(["KV cache of", "v-patch layer", "runs each", "next-token KL (nats)",
                                          "efficiency", "markers per run"], rows)])


def _bench_patching(bench: dict, source: str) -> str:
    gen = next(r for r in bench["runs"] if r["kind"] == "generation")
    sweep = next(r for r in bench["runs"] if r["kind"] == "sweep")
    step = duration(gen["persistent_decode_ms_per_step"] / 1e3)
    rows = [[f"decode step with the KV replacement and persistent patches at `attn_v` {gen['v_layer']} and "
             f"`resid_pre` {gen['resid_layer']}", step, f"{duration(gen['kv_only_decode_ms_per_step'] / 1e3)}, KV "
             "replacement only", f"{gen['persistent_over_kv_only']:.3f} (goal <= 1.1)"],
            ["the same, against plain `mtijax.generate`", step,
             duration(gen["plain_generate_decode_ms_per_step"] / 1e3), f"{gen['persistent_over_plain_generate']:.3f}"],
            [f"logits of `attn_v` patched at each of the {sweep['layers']} layers, one `vmap`",
             duration(sweep["vmap_s"]), f"{duration(sweep['loop_s'])}, a Python loop of {sweep['layers']} "
             "calls to one compiled forward", f"{sweep['loop_over_vmap']:.2f}x faster"]]
    head = (f"Measured on {machine(bench)}; {MODEL_NAMES.get(gen['model'], gen['model'])} shapes, {bench['dtype']}, "
            f"batch {gen['batch']}, {gen['prompt_len']}-token prompt, {gen['new_tokens']} new tokens; the vmapped and "
            f"looped logits differ by up to {sweep['max_abs_difference']:.2g}; `experiments/results/{source}`.")
    return "\n".join([head, "", markdown(["measurement", "time", "peer in the same run", "ratio"], rows)])


@table("bench_patching_cpu", "bench_patching_cpu.json")
def bench_patching_cpu(bench: dict) -> str:
    """Patching cost on the CPU."""
    return _bench_patching(bench, "bench_patching_cpu.json")


@table("bench_patching_h100", "bench_patching_h100.json")
def bench_patching_h100(bench: dict) -> str:
    """Patching cost on the H100."""
    return _bench_patching(bench, "bench_patching_h100.json")


# --- performance -----------------------------------------------------------------------------------------------

@table("bench_generate", "bench_generate_h100.json")
def bench_generate(results: dict) -> str:
    """Decode and prefill against transformers in the same run, and decode against the bandwidth bound."""
    rows, new_tokens, invocations = [], {}, results["invocations"]
    for inv in invocations:
        for r in inv["runs"]:
            m, t = r["mtijax"], r["transformers"]
            name = MODEL_NAMES.get(r["model"], r["model"])
            new_tokens.setdefault(inv["new_tokens"], []).append(name)
            rows.append([name, r["batch"], num(m["decode_tok_s"]), num(t["decode_tok_s"]),
                         f"{r['decode_speedup_vs_transformers']:.1f}x", pct(r["fraction_of_bound"]),
                         num(m["prefill_tok_s"]), num(t["prefill_tok_s"])])
    versions = sorted({(i["device"], i["jax"], i["transformers"]) for i in invocations})
    bandwidth = [i["copy_bandwidth_GBps"] / 1e3 for i in invocations]
    tokens = "; ".join(f"{n} new tokens for {', '.join(dict.fromkeys(names))}" for n, names in new_tokens.items())
    head = (f"Measured on {'; '.join(f'{d} (jax {j}, transformers {t})' for d, j, t in versions)}, prompt "
            f"{invocations[0]['prompt_len']} tokens, {invocations[0]['dtype']}; copy bandwidth "
            f"{min(bandwidth):.2f}-{max(bandwidth):.2f} TB/s; {tokens}; `experiments/results/bench_generate_h100.json`.")
    return "\n".join([head, "", markdown(["model", "batch", "mtijax decode tok/s", "transformers decode tok/s",
                                          "speed-up", "% of bandwidth bound", "mtijax prefill tok/s",
                                          "transformers prefill tok/s"], rows)])


@table("bench_generate_h200", "bench_generate_h200.json")
def bench_generate_h200(results: dict) -> str:
    """Decode and prefill against both transformers peers in the same run, with the bound and the warm-ups."""
    kinds = {"decode": 0, "prefill": 1, "long": 2}
    measured = sorted(((r["model"], kinds.get(r["kind"], 3), r["batch"], r["prompt_len"], number), number, r)
                      for number, inv in enumerate(results["invocations"], 1) for r in inv["rows"]
                      if r["mtijax"].get(r["figure"]) is not None and "excluded" not in r)
    excluded = sorted({f"run {number}'s {r['kind']} rows: {r['excluded']}"
                       for number, inv in enumerate(results["invocations"], 1) for r in inv["rows"] if "excluded" in r})

    def peer(r: dict, name: str) -> str:
        value = r.get(name, {}).get(r["figure"])
        return "-" if value is None else num(value)

    def warmup(r: dict, name: str) -> str:
        value = r.get(name, {}).get("warmup_s")
        return "-" if value is None else f"{value:.0f} s"

    rows = []
    for _, number, r in measured:
        bound = r["bound"].get(r["figure"])
        rows.append([MODEL_NAMES.get(r["model"], r["model"]), r["kind"], r["batch"], r["prompt_len"], number,
                     num(r["mtijax"][r["figure"]]), peer(r, "transformers_eager"), peer(r, "transformers_static"),
                     peer(r, "transformers_compiled"), num(bound), pct(r["fraction_of_bound"]),
                     "-" if "speedup_vs_strongest" not in r else f"{r['speedup_vs_strongest']:.2f}x",
                     warmup(r, "mtijax"),
                     warmup(r, "transformers_static" if r["kind"] != "prefill" else "transformers_compiled")])
    first = results["invocations"][0]
    m = first["machine"]
    runs = "; ".join(f"run {n}: commit {inv['machine']['commit']}" + (f"; {inv['caveat']}" if inv.get("caveat") else "")
                     for n, inv in enumerate(results["invocations"], 1))
    head = (f"Measured on {m['device']} ({m['cpu_cores']} host cores, jax {m['jax']}, torch {m['torch']}, "
            f"transformers {m['transformers']}), random bfloat16 weights, greedy; copy bandwidth "
            f"{first['copy_bandwidth_GBps'] / 1e3:.2f} TB/s, matmul {first['matmul_TFLOPS']:.0f} TFLOP/s. Decode rows: "
            "tok/s over 127 steps after a 128-token prompt; prefill: prompt tok/s of a 1-token generation. Peers: "
            "transformers eager; with a static cache (generate compiles the decode forward, CUDA graphs); "
            "`torch.compile` of the whole forward (prefill only). Warm-up: the first call's extra seconds "
            f"(compiles). {runs}." + "".join(f" Not shown: {e}." for e in excluded) +
            " `experiments/results/bench_generate_h200.json`.")
    return "\n".join([head, "", markdown(
        ["model", "row", "batch", "prompt", "run", "mtijax", "eager", "static cache", "compiled forward", "bound",
         "% of bound", "x strongest peer", "mtijax warm-up", "peer warm-up"], rows)])


@table("bench_generate_targets_h200", "bench_generate_h200.json")
def bench_generate_targets_h200(results: dict) -> str:
    """Each row's H200 targets (``bench_generate.targets``) in the latest run that measured the row."""
    latest: dict[tuple, tuple[int, dict]] = {}
    for number, inv in enumerate(results["invocations"], 1):
        for r in inv["rows"]:
            if r["mtijax"].get(r["figure"]) is None or "excluded" in r:
                continue
            for name, t in (r.get("targets") or {}).items():
                if t["measured"] is not None:
                    latest[(r["model"], r["kind"], r["batch"], name)] = (number, t)
    names = {"fraction_of_bound": "of the bound", "speedup_vs_strongest": "x strongest peer"}
    rows = []
    for (model, kind, batch, name), (number, t) in sorted(latest.items()):
        shown = pct(t["measured"]) if name == "fraction_of_bound" else f"{t['measured']:.2f}x"
        wanted = pct(t["target"]) if name == "fraction_of_bound" else f"{t['target']:.1f}x"
        limit = results.get("limits", {}).get(f"{model}/{kind}/{batch}/{name}", "-" if t["met"] else "not measured")
        rows.append([MODEL_NAMES.get(model, model), kind, batch, number, names[name], wanted, shown,
                     "met" if t["met"] else "missed", "" if t["met"] else limit])
    head = ("The H200 targets of each measured row, each from the latest run that measured its figure in the table "
            "above (`targets` in `experiments/results/bench_generate_h200.json`; decode: a fraction of the bound at "
            "batch 1 and 8 and a ratio to the strongest peer at batch 1; prefill: a ratio to the strongest peer). "
            "The long rows of the 1B and 12B were not reached, and have no line. What limits a missed target: "
            "`limits` in the same JSON, measured.")
    return "\n".join([head, "", markdown(["model", "row", "batch", "run", "target", "at least", "measured", "result",
                                           "what limits it"], rows)])


@table("decode_blocks_h200", "decode_blocks_h200.json")
def decode_blocks_h200(results: dict) -> str:
    """mtijax's decode with its default block of 8 calls per dispatch against one call per dispatch, same process;
    OLMoE also against the gathered dispatch (a process of its own)."""
    runs = results["runs"]
    rows = []
    for name in ("gemma3-270m", "gemma3-1b", "gemma3-12b", "olmoe-1b-7b"):
        for r in runs[name]["rows"]:
            block, one = r["mtijax"], r.get("mtijax_block1", {})
            kernel = ""
            if name == "olmoe-1b-7b":
                other = next((o for o in runs["olmoe-1b-7b_no_pallas"]["rows"] if o["batch"] == r["batch"]), None)
                kernel = "-" if other is None else num(other["mtijax"]["decode_tok_s"])
            rows.append([MODEL_NAMES.get(name, name), r["batch"], num(block["decode_tok_s"]),
                         num(block["steady_decode_tok_s"]), num(one["decode_tok_s"]), num(one["steady_decode_tok_s"]),
                         f"{block['decode_tok_s'] / one['decode_tok_s']:.2f}x", num(r["bound"]["decode_tok_s"]),
                         pct(r["fraction_of_bound"]), kernel or "-"])
    m = runs["gemma3-270m"]["machine"]
    head = (f"Measured on {m['device']} ({m['cpu_cores']} host cores, jax {m['jax']}), code {m['commit']}; random "
            "bfloat16 weights, 128-token prompt, 127 decode steps, greedy; mtijax alone (no peer). `generate`: tok/s "
            "of `mtijax.generate`; steady: the engine's steps over the second half of a run. Block 8 and block 1 ran "
            "in the same process (`MTIJAX_DECODE_BLOCK`); on OLMoE both with the in-place expert kernels, and the last "
            "column is block 8 with the gathered dispatch instead (`MTIJAX_PALLAS=0`, its own process, batch 1 only). "
            "`experiments/results/decode_blocks_h200.json`.")
    return "\n".join([head, "", markdown(
        ["model", "batch", "block 8: generate", "block 8: steady", "block 1: generate", "block 1: steady",
         "block 8 / block 1", "bound", "block 8: % of bound", "OLMoE, gathered dispatch"], rows)])


@table("bench_moe_h200", "bench_moe_h200.json")
def bench_moe_h200(results: dict) -> str:
    """One OLMoE layer per expert dispatch."""
    names = ("dense", "grouped", "gathered", "in_place")
    rows = [[r["tokens"], *[f"{r[n + '_ms']:.3f} ms" if n + "_ms" in r else "-" for n in names], r["chosen"]]
            for r in results["runs"]]
    head = (f"Measured on {results['device']} (jax {results['jax']}), code {results['commit']}: one OLMoE-1B-7B layer "
            "(random bfloat16 weights), the best of 10 jitted calls; `experiments/results/bench_moe_h200.json`.")
    return "\n".join([head, "", markdown(["tokens", *names, "chosen"], rows)])


@table("compile_first_process_h200", "probe_compile_first_process_h200.json")
def compile_first_process_h200(results: dict) -> str:
    """The 270M's cold first token by where its process ran on the machine, and under which XLA flags."""
    rows = []
    for r in results["runs"]:
        rate = r.get("decode_tok_s") or {}
        span = lambda key: "-" if r[key] is None else f"{r[key][1]:.1f} s"
        tuned = "-" if r["tuned_built_s"] is None else f"{r['tuned_built_s']:.1f} s"
        rows.append([r["device_call"], r["code"], r["builds"], "first" if r["first_process_on_the_machine"] else "later",
                     f"`{r['xla_flags']}`" if r["xla_flags"] else "defaults", f"{r['cold_first_token_s']:.2f} s",
                     span("prefill_chunk_compile_s"), span("decode_block_compile_s"), tuned,
                     f"{r['second_process_first_token_s']:.2f} s",
                     *[num(rate[k]) if k in rate else "-" for k in ("gemma3-270m b1", "gemma3-270m b8",
                                                                     "gemma3-1b b1", "gemma3-1b b8")]])
    head = (f"{results['note']} `experiments/results/probe_compile_first_process_h200.json`.")
    return "\n".join([head, "", markdown(["call", "code", "builds", "process on its machine", "XLA flags",
                                           "cold first token", "prefill compiled at", "decode compiled at",
                                           "tuned built at", "second process",
                                           "270M b1 tok/s", "270M b8", "1B b1", "1B b8"], rows)])


@table("step_profile_1b_h200", "probe_step_profile_1b_h200.json")
def step_profile_1b_h200(results: dict) -> str:
    """The 1B's decode step under the profiler, in blocks of 8 and one call per dispatch."""
    rows = []
    for block, key in ((8, "block8"), (1, "block1")):
        for name, v in results[key]["variants"].items():
            rows.append([name.replace("_", " "), block, f"{v['first_call_s']:.1f} s", f"{v['steady_ms']:.2f} ms",
                         f"{v['wall_ms']:.2f} ms", f"{v['busy_ms']:.2f} ms", f"{v['gap_ms']:.2f} ms", num(v["kernels"]),
                         f"{v['bound_ms']:.2f} ms"])
    head = (f"{results['note']} Steady: 64 untraced steps; traced: wall time per step under the profiler; GPU time: "
            "the kernels' summed durations; gap: traced minus GPU time; bound: the bytes a step reads at the copy "
            "bandwidth. `experiments/results/probe_step_profile_1b_h200.json`.")
    return "\n".join([head, "", markdown(["variant", "block", "first call", "steady", "traced", "GPU time", "gap",
                                           "kernels", "bound"], rows)])


@table("prefill_profile_h200", "probe_prefill_profile_h200.json")
def prefill_profile_h200(results: dict) -> str:
    """A 2k-token prefill under the profiler, per model and chunk size, with its untraced time."""
    rows = []
    for model, variants in results["models"].items():
        base, _, flags = model.partition("_")
        for name, v in variants.items():
            copies = sum(t["us"] for t in v["top"] if t["name"].startswith("loop_dynamic_slice_fusion")) / 1e3
            rows.append([MODEL_NAMES.get(base, base), name.replace("prefill_2k_", "").replace("_", " "),
                         "WHILE command buffers" if flags else "defaults", f"{v['untraced_ms']:.1f} ms",
                         f"{v['wall_ms']:.1f} ms", f"{v['busy_ms']:.1f} ms", num(v["kernels"]), f"{copies:.1f} ms"])
    head = (f"{results['note']} Traced: the call's wall time under the profiler; GPU time: the kernels' summed durations; "
            "weight copies: the `loop_dynamic_slice_fusion` kernels among the call's 20 longest.")
    return "\n".join([head, "", markdown(["model", "chunk", "XLA flags", "untraced", "traced", "GPU time", "kernels",
                                           "weight copies"], rows)])


@table("attention_forms_h200", "attention_forms_h200.json")
def attention_forms_h200(results: dict) -> str:
    """Decode tok/s with attention's matrix and reduced forms, one process each, in the same device call."""
    rows = []
    by = {}
    for key, run in results["runs"].items():
        model, form = key.split("/")
        for row in run["rows"]:
            by.setdefault((model, row["batch"]), {})[form] = row["mtijax"]["decode_tok_s"]
    for (model, batch), forms in sorted(by.items()):
        matmul, reduce = forms.get("matmul"), forms.get("reduce")
        rows.append([MODEL_NAMES.get(model, model), batch, num(matmul) if matmul else "-", num(reduce) if reduce else "-",
                     f"{reduce / matmul:.2f}x" if matmul and reduce else "-"])
    head = f"{results['note']} Measured on NVIDIA H200. `experiments/results/attention_forms_h200.json`."
    return "\n".join([head, "", markdown(["model", "batch", "matrix form", "reduced form", "reduced / matrix"], rows)])


@table("rolling_decode_h200", "probe_rolling_decode_270m_h200.json")
def rolling_decode_h200(results: dict) -> str:
    """The rolling KV cache against the full layout at long contexts: prefill, decode step and cache bytes."""
    by = {(r["context"], r["rolling"]): r for r in results["runs"]}
    rows = []
    for context in sorted({c for c, _ in by}):
        ring, full = by[(context, True)], by[(context, False)]
        rows.append([num(context), f"{ring['prefill_s']:.3f} s", f"{full['prefill_s']:.3f} s",
                     f"{full['prefill_s'] / ring['prefill_s']:.1f}x", f"{ring['decode_ms_per_step']:.2f} ms",
                     f"{full['decode_ms_per_step']:.2f} ms", f"{ring['cache_bytes'] / 1e6:.0f} MB",
                     f"{full['cache_bytes'] / 1e6:.0f} MB"])
    head = (f"Measured on {results['machine']}, {MODEL_NAMES.get(results['model'], results['model'])} shapes (random "
            "bfloat16), batch 1, a prompt of the context less 320 tokens; prefill: the run to its first token; decode: "
            "256 steps of a longer run, after its first 32; code: " + results["code"] +
            "; `experiments/results/probe_rolling_decode_270m_h200.json`.")
    return "\n".join([head, "", markdown(["context", "prefill, rolling", "prefill, full", "prefill gain",
                                           "decode step, rolling", "decode step, full", "cache, rolling",
                                           "cache, full"], rows)])


@table("bench_sharding_h200", "bench_sharding_h200.json")
def bench_sharding_h200(results: dict) -> str:
    """The scale-out benchmark's rows as they ran (one device: the baselines of every ratio), run by run."""
    rows, runs = [], []
    for number, run in enumerate(results["invocations"], 1):
        runs.append(f"run {number}: copy bandwidth {run['copy_GBps']:.0f} GB/s" +
                    (f" ({run['caveat']})" if run.get("caveat") else ""))
        for section in ("tensor_parallel", "expert_parallel", "data_parallel"):
            for r in run.get(section, []):
                if "tok_s" not in r:
                    continue
                devices = r.get("tp", r.get("ep", r.get("dp", 1)))
                what = r.get("model", "gemma3-1b")
                rows.append([section.replace("_", " "), MODEL_NAMES.get(what, what), r["case"].replace("_", " "),
                             devices, number, num(r["tok_s"]), "-" if "step_ms" not in r else f"{r['step_ms']:.2f} ms",
                             "-" if "hbm_fraction" not in r else pct(r["hbm_fraction"])])
    m = results["invocations"][0]["machine"]
    head = (f"Measured on {m['device']} x {m['device_count']} ({m['host_cores']} host cores, jax {m['jax']}), random "
            f"{results['invocations'][0]['dtype']} weights; \"of bound\": reading every parameter and the filled KV "
            "slots once per step at the run's copy bandwidth (a jitted read and write of 1 GiB; for OLMoE every "
            "expert, although a step reads only the routed ones: hence more than 100%). " + "; ".join(runs) +
            ". `experiments/results/bench_sharding_h200.json`.")
    return "\n".join([head, "", markdown(["section", "model", "case", "devices", "run", "tok/s", "per step",
                                           "of bound"], rows)])


# --- the README ------------------------------------------------------------------------------------------------

def load(source: str, results: Path = RESULTS) -> Any | None:
    """A results file: JSON as it is, CSV as a list of row dicts; None when it does not exist."""
    path = results / source
    if not path.is_file():
        return None
    if path.suffix == ".csv":
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    return json.loads(path.read_text())


def render(name: str, results: Path = RESULTS) -> str | None:
    """The markdown of table ``name``, or None when its results file does not exist yet."""
    source, draw = TABLES[name]
    data = load(source, results)
    return None if data is None else draw(data)


def render_readme(text: str, results: Path = RESULTS) -> str:
    """``text`` with every marked region replaced by its table (regions whose results are missing are kept).

    Raises ValueError for a region no table is registered for, or a registered table without a region."""
    found = REGION.findall(text)
    unknown = sorted({name for name, _ in found} - TABLES.keys())
    if unknown:
        raise ValueError(f"README regions without a registered table: {', '.join(unknown)}")
    missing = sorted(TABLES.keys() - {name for name, _ in found})
    if missing:
        raise ValueError(f"tables without a README region: {', '.join(missing)}")

    def replace(match: re.Match) -> str:
        body = render(match.group(1), results)
        return match.group(0) if body is None else f"<!-- report:{match.group(1)} -->\n{body}\n<!-- /report:{match.group(1)} -->"
    return REGION.sub(replace, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="rewrite the marked regions of README.md")
    mode.add_argument("--check", action="store_true", help="exit 1 when README.md differs from the render")
    parser.add_argument("--readme", type=Path, default=README)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if not (args.write or args.check):
        for name in TABLES:
            body = render(name, args.results)
            print(f"<!-- {name} -->\n{body if body is not None else '(no results file yet)'}\n")
        return 0
    text = args.readme.read_text()
    try:
        rendered = render_readme(text, args.results)
    except ValueError as e:
        print(f"report: error: {e}", file=sys.stderr)
        return 2
    if args.write:
        args.readme.write_text(rendered)
        return 0
    if rendered != text:
        sys.stdout.writelines(difflib.unified_diff(text.splitlines(True), rendered.splitlines(True),
                                                   str(args.readme), "rendered"))
        print(f"{args.readme} differs from the committed results: run python experiments/report.py --write",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
