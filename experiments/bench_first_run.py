"""The README's two quick-start commands timed as a new user meets them, on the machine this runs on.

``--generate``: ``mtijax generate "The capital of France is"`` in a fresh process, twice, with an empty
``$MTIJAX_CACHE`` before the first (cold: the GGUF vocabulary is converted and every program compiled) and the
tokenizer cache of the first run before the second (warm). Each run records the seconds to its first
printed token and to its exit. ``--suite``: ``python -m pytest`` (the test command), its wall time and the
peak resident memory of its process.

    python experiments/bench_first_run.py --generate --suite --out experiments/results/first_run_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from machine import describe  # noqa: E402

PROMPT = "The capital of France is"
ROOT = Path(__file__).parent.parent


def time_generate(cache: Path) -> dict[str, float]:
    """Seconds to the first byte on stdout (the first token) and to the exit of one ``mtijax generate``."""
    env = {**os.environ, "MTIJAX_CACHE": str(cache)}
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "mtijax.cli", "generate", PROMPT], stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, env=env, cwd=ROOT)
    first = process.stdout.read(1)
    first_token = time.perf_counter() - start
    text = (first + process.stdout.read()).decode()
    if process.wait() != 0:
        raise SystemExit(f"mtijax generate exited with {process.returncode}")
    return {"first_token_s": round(first_token, 1), "total_s": round(time.perf_counter() - start, 1),
            "text": text.strip()}


def time_suite() -> dict[str, float]:
    """Wall seconds, exit status and peak resident memory (GB) of ``python -m pytest``."""
    start = time.perf_counter()
    status = subprocess.call([sys.executable, "-m", "pytest", "-q"], cwd=ROOT, stdout=subprocess.DEVNULL)
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"wall_s": round(time.perf_counter() - start), "exit_status": status, "peak_rss_gb": round(peak_kb / 1e6, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generate", action="store_true", help="time the generate command, cold then warm")
    parser.add_argument("--suite", action="store_true", help="time the test command")
    parser.add_argument("--out", help="write the results as JSON here (merged into an existing file)")
    args = parser.parse_args()
    result = json.loads(Path(args.out).read_text()) if args.out and Path(args.out).exists() else {}
    result.update(describe())
    if args.generate:
        with tempfile.TemporaryDirectory() as cache:
            result["generate"] = {"command": f'mtijax generate "{PROMPT}"',
                                  "cold": time_generate(Path(cache)), "warm": time_generate(Path(cache))}
    if args.suite:
        result["suite"] = {"command": "python -m pytest", **time_suite()}
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
