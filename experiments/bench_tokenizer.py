"""Cached load of the embedded Gemma 3 270M's GGUF tokenizer (262,144 pieces), against transformers loading the
same vocabulary in the same run.

Every timed load runs in a fresh Python process, with its imports done before the clock starts, and the
three kinds are interleaved ``--repeats`` times:

* mtijax: ``load_gguf_tokenizer(path)`` from a warm cache (the sentencepiece model it saved);
* transformers, as mtijax cached it before: ``AutoTokenizer.from_pretrained`` of transformers' own conversion
  of the vocabulary, saved with ``save_pretrained``;
* transformers' backend alone: ``PreTrainedTokenizerFast(tokenizer_file=...)`` of that conversion, its
  fastest way in.

Each gives wall and CPU seconds (the machine is shared, so CPU time is the steadier figure, and the load
average is recorded before and after). The run also times opening the GGUF file and both first conversions,
and checks that the two tokenizers give the same ids on the probe texts. The goal is a cached load under 1 s.

    python experiments/bench_tokenizer.py [--repeats 5] [--out experiments/results/bench_tokenizer_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import describe

REPO = Path(__file__).parent.parent
PROBES = ("The capital of France is", "def fibonacci(n):\n    ", "  two spaces, <start_of_turn>user\nhi<end_of_turn>",
          "naïve café 日本語 🦙")
LOADS = {
    "mtijax": ("from mtijax.tokenizer import load_gguf_tokenizer\nfrom mtijax.weights.default import default_model_path",
               "load_gguf_tokenizer(default_model_path())"),
    "transformers_auto": ("from transformers import AutoTokenizer",
                          "AutoTokenizer.from_pretrained({hf!r}, local_files_only=True)"),
    "transformers_backend": ("from transformers import PreTrainedTokenizerFast",
                             "PreTrainedTokenizerFast(tokenizer_file={hf!r} + '/tokenizer.json')"),
}
TIMER = """
import json, sys, time
{imports}
wall, cpu = time.perf_counter(), time.process_time()
{call}
print(json.dumps({{"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}}))
"""


def timed_load(kind: str, hf_dir: str, env: dict[str, str]) -> dict[str, float]:
    """One load of ``kind`` in a fresh process: ``{"wall_s", "cpu_s"}``."""
    imports, call = LOADS[kind]
    code = TIMER.format(imports=imports, call=call.format(hf=hf_dir))
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_tokenizer_cpu.json"))
    args = parser.parse_args()

    import mtijax.tokenizer as tokenizer_module
    from mtijax.weights.default import default_model_path
    from mtijax.weights.gguf_file import GGUFFile

    scratch = Path(tempfile.mkdtemp(prefix="bench_tokenizer_"))
    env = {**os.environ, "MTIJAX_CACHE": str(scratch / "cache"), "PYTHONPATH": str(REPO)}
    os.environ["MTIJAX_CACHE"] = env["MTIJAX_CACHE"]
    results = {**describe(), "load_average_before": os.getloadavg(), "repeats": args.repeats}

    start = time.perf_counter()
    gguf = GGUFFile(default_model_path())
    results["open_gguf_s"] = time.perf_counter() - start
    start = time.perf_counter()
    ours = tokenizer_module.load_gguf_tokenizer(gguf)
    results["convert_mtijax_s"] = time.perf_counter() - start
    start = time.perf_counter()
    theirs = tokenizer_module._convert_gguf_vocabulary(gguf)
    hf_dir = str(scratch / "transformers")
    theirs.save_pretrained(hf_dir)
    results["convert_transformers_s"] = time.perf_counter() - start
    results["vocabulary"] = len(ours)
    results["same_ids"] = all(ours(p)["input_ids"] == theirs(p)["input_ids"] for p in PROBES)
    print(f"opened the GGUF file in {results['open_gguf_s']:.1f} s; converted in {results['convert_mtijax_s']:.1f} s "
          f"(transformers: {results['convert_transformers_s']:.1f} s); same ids: {results['same_ids']}")

    runs: dict[str, list[dict[str, float]]] = {kind: [] for kind in LOADS}
    for repeat in range(args.repeats):
        for kind in LOADS:
            runs[kind].append(timed_load(kind, hf_dir, env))
            print(f"  {repeat}: {kind} {runs[kind][-1]['wall_s']:.2f} s wall, {runs[kind][-1]['cpu_s']:.2f} s CPU")
    results["cached_load"] = {kind: {"wall_s": [r["wall_s"] for r in rows], "cpu_s": [r["cpu_s"] for r in rows],
                                     "median_wall_s": statistics.median(r["wall_s"] for r in rows),
                                     "median_cpu_s": statistics.median(r["cpu_s"] for r in rows)}
                              for kind, rows in runs.items()}
    results["load_average_after"] = os.getloadavg()
    results["goal_s"] = 1.0
    Path(args.out).write_text(json.dumps(results, indent=1))
    for kind, row in results["cached_load"].items():
        print(f"{kind}: median {row['median_wall_s']:.2f} s wall, {row['median_cpu_s']:.2f} s CPU "
              f"({row['median_cpu_s'] / results['cached_load']['mtijax']['median_cpu_s']:.1f}x mtijax's CPU time)")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
