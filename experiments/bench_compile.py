"""The compile cost of generation as a user sees it: seconds to the first token, cold, warm and after new shapes.

Also in a second process with a warm persistent compilation cache, beside the transformers eager peer.

For each model (random weights in the real shapes of a preset, ``mtijax.init_params``; bfloat16 on a GPU, float32
on a CPU) this process spawns child processes of itself, each with ``MTIJAX_CACHE`` pointing at a directory it
owns, so the engine's persistent compilation cache (``$MTIJAX_CACHE/xla``) is empty or warm on purpose:

1. cold process, with a fresh, empty cache directory:

   * ``startup``: seconds from spawning the child to Python running it, to ``import jax, mtijax`` done, and to the
     JAX backend up; ``init``: ``mtijax.init_params`` until its arrays are ready;
   * ``cold``: the first ``mtijax.generate_stream`` call (a 100-token prompt, 16 new tokens): seconds from the call
     to its first token, and to its last; then ``warm``: the same call again.

2. second process, with the same (now warm) cache directory: start-up, init, then

   * ``second_process``: the ``cold`` call again; its ``first_token_s`` counts from the call,
     ``first_token_since_spawn_s`` from spawning the process;
   * ``prompt_300``, ``prompt_1000``, ``prompt_<L>``: a new prompt length each (16 new tokens), then again; ``L``
     is the context limit minus 21 (so it is no multiple of 16 and its 16 new tokens fit). The limit is
     ``--context-limit`` (default 8192 on a GPU, 2048 on a CPU) or the model's, whichever is smaller;
   * ``new_64``, ``new_200``: a new ``max_new_tokens`` (the 100-token prompt), then again.

   The new shapes run here, not in the cold process, so that the budget reaches the second-process figure first;
   no earlier process compiled them, so the persistent cache holds none of them.

3. ``transformers_eager``, the peer (``--peer``, default on): a fresh process that builds the transformers model of
   the same shapes and times ``model.generate`` for 1 token (its first token) on the 100-token prompt, again,
   and on a 300-token prompt. Eager transformers compiles nothing; its cold call pays CUDA/cuBLAS start-up only.

4. ``quick_start`` (``--quick-start``, default on a CPU): the README's ``mtijax generate "The capital of France
   is" --max-new-tokens 8`` (run as ``python -m mtijax.cli`` from this checkout), twice with one fresh cache
   directory: seconds from spawning it to the first byte on its stdout (the CLI prints the first generated text
   as soon as it has it) and to its exit, with its stderr lines time-stamped.

Each call ends by waiting for the engine's tuned builds (``mtijax.engine.settle_compiles``; on a GPU the first
calls of a new shape run quick builds while the tuned ones compile, ``mtijax.engine.tiers``): ``settled_s`` is
the seconds from the call to that point, and the call's compiles include those builds, so every repeat runs
tuned programs.

Derived, per case: ``over_warm_s`` = the first call's first token minus the same call's repeat (what a new shape
costs; the target applies to it), ``over_base_warm_s`` = minus the ``warm`` first token at the base shape (the
longer prefill of a longer prompt included), ``compile_cost_s`` = the whole first call minus the whole repeat
(it also catches a decode-step compile after the first token).

Compilations are counted with ``jax.monitoring`` listeners, per call: ``backend_compiles`` (XLA executables built
or loaded, events ``/jax/core/compile/backend_compile_duration``), ``persistent_cache_hits`` (loaded from the
persistent cache), ``xla_compiles`` (their difference: actually compiled), ``persistent_cache_writes``,
``traces`` (jaxpr traces), ``compile_s`` and ``functions`` (compiles per jitted function's name), and ``timeline``:
each trace, lowering and backend compile as ``[function, event, start_s, end_s, thread]``, seconds from the
call's start, which shows what the first token waited for (the ahead compile runs on its own thread). Where
``nvidia-smi`` exists, each mtijax child also records the GPU's SM clock, performance state and power draw at its
start and end (``startup.gpu``, ``done.gpu``).

Prompts are random token ids; generation is greedy and never stops early (``stop_ids=()``). ``--budget-s``
bounds the run: each model gets an equal share of what is left; a case is not started after its share's end
(it is recorded as skipped), and children still running at ``budget + --grace-s`` are killed (what they
reported is kept). Results are rewritten after every child. The issue's targets stand beside the figures.

GPU (about 6 minutes; the targets are for an NVIDIA H200)::

    python experiments/bench_compile.py --budget-s 330 --grace-s 30 --out experiments/results/bench_compile_h200.json

Without the engine's background compile of the decode step (``MTIJAX_COMPILE_AHEAD=0`` in every child), to
measure what it buys: add ``--no-compile-ahead``.

CPU (this machine's 2 cores; the quick-start target)::

    python experiments/bench_compile.py --budget-s 1500 --out experiments/results/bench_compile_cpu.json

Smoke test (tiny shapes, every path)::

    python experiments/bench_compile.py --tiny --out /tmp/bench_compile_tiny.json
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's mtijax, not an installed one

import argparse
import collections
import datetime
import json
import platform
import selectors
import shutil
import subprocess
import tempfile
import threading
import time
from typing import Any

BASE_PROMPT, BASE_NEW = 100, 16
PROMPTS = (300, 1000)
NEW_TOKENS = (64, 200)
QUICK_START = ["generate", "The capital of France is", "--max-new-tokens", "8"]
TARGETS = {
    "cold_first_token_s": {"gemma3-270m": 10.0, "gemma3-12b": 30.0},
    "new_shape_over_warm_s": 1.0,
    "second_process_first_token_s": {"gemma3-270m": 3.0},
    "quick_start_warm_first_output_s": 15.0,
    "applies_to": {"cold_first_token_s": "NVIDIA H200", "new_shape_over_warm_s": "NVIDIA H200, every model",
                   "second_process_first_token_s": "NVIDIA H200 (from the generate call)",
                   "quick_start_warm_first_output_s": "2 CPU cores, warm cache"},
}
"""The engine issue's targets (seconds)."""


# ---- child processes ----------------------------------------------------------------------------------------------

def emit(**event: Any) -> None:
    """One JSON line on stdout for the parent."""
    print(json.dumps(event), flush=True)


def run_child(argv: list[str], env: dict[str, str], kill_at: float) -> dict:
    """Run ``argv`` to its end or until ``time.time() >= kill_at`` (then kill it).

    Returns ``rc`` (None if killed), ``killed``, ``seconds``, ``first_stdout_s`` (first non-blank stdout bytes),
    ``stdout`` (text) and ``stderr`` (``[seconds, line]`` pairs), times counted from the spawn.
    """
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT)
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ, "out")
    selector.register(proc.stderr, selectors.EVENT_READ, "err")
    out, err, first_stdout, killed = bytearray(), [], None, False
    pending = b""
    while selector.get_map():
        left = kill_at - time.time()
        if left <= 0:
            proc.kill()
            killed = True
            break
        for key, _ in selector.select(timeout=min(left, 1.0)):
            data = os.read(key.fileobj.fileno(), 65536)
            now = time.perf_counter() - start
            if not data:
                selector.unregister(key.fileobj)
            elif key.data == "out":
                if first_stdout is None and data.strip():
                    first_stdout = now
                out += data
            else:
                pending += data
                *lines, pending = pending.split(b"\n")
                err += [[round(now, 3), line.decode(errors="replace")] for line in lines if line.strip()]
    rc = proc.wait()
    if pending.strip():
        err.append([round(time.perf_counter() - start, 3), pending.decode(errors="replace")])
    return {"rc": None if killed else rc, "killed": killed, "seconds": time.perf_counter() - start,
            "first_stdout_s": first_stdout, "stdout": out.decode(errors="replace"), "stderr": err}


def events(child: dict) -> list[dict]:
    """The JSON event lines a worker printed."""
    found = []
    for line in child["stdout"].splitlines():
        if line.startswith("{"):
            try:
                found.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a line cut by a kill
    return found


def child_env(cache: Path | None, **extra: str) -> dict[str, str]:
    """The environment of a child: this checkout first on PYTHONPATH, ``MTIJAX_CACHE`` at ``cache``."""
    env = {**os.environ, **extra}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    if cache is not None:
        env["MTIJAX_CACHE"] = str(cache)
    return env


def spawn_worker(spec: dict, env: dict[str, str], kill_at: float) -> tuple[dict, list[dict]]:
    """Run this script as a worker on ``spec``; the child's record (stdout dropped) and its events."""
    spec = {**spec, "spawned_at": time.time()}
    child = run_child([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)], env, kill_at)
    found = events(child)
    child.pop("stdout")
    child["stderr"] = child["stderr"][-20:]
    return child, found


# ---- workers (run in the children) --------------------------------------------------------------------------------

class CompileCounter:
    """Counts JAX's compile events through ``jax.monitoring`` (see the module doc for the names)."""

    BACKEND = "/jax/core/compile/backend_compile_duration"
    TRACE = "/jax/core/compile/jaxpr_trace_duration"
    LOWER = "/jax/core/compile/jaxpr_to_mlir_module_duration"
    HIT = "/jax/compilation_cache/cache_hits"
    WRITE = "/jax/compilation_cache/cache_misses"  # jax records it when it writes an entry

    def __init__(self) -> None:
        import jax

        self.counts: collections.Counter = collections.Counter()
        self.seconds: collections.Counter = collections.Counter()
        self.functions: collections.Counter = collections.Counter()
        self.events: list[tuple[str, str, float, float, str]] = []
        jax.monitoring.register_event_listener(self._event)
        jax.monitoring.register_event_duration_secs_listener(self._duration)

    def _event(self, event: str, **kwargs: Any) -> None:
        self.counts[event] += 1

    def _duration(self, event: str, duration: float, **kwargs: Any) -> None:
        self.counts[event] += 1
        self.seconds[event] += duration
        name = str(kwargs.get("fun_name", "?"))
        if event == self.BACKEND:
            self.functions[name] += 1
        kinds = {self.BACKEND: "compile", self.TRACE: "trace", self.LOWER: "lower"}
        if event in kinds:
            end = time.perf_counter()
            self.events.append((name, kinds[event], end - duration, end, threading.current_thread().name))

    def snapshot(self) -> tuple:
        return self.counts.copy(), self.seconds.copy(), self.functions.copy(), len(self.events)

    def since(self, snapshot: tuple, start: float) -> dict:
        """What was counted after ``snapshot``, taken at ``time.perf_counter() == start``."""
        counts, seconds, functions = (now - then for now, then in zip(self.snapshot()[:3], snapshot[:3]))
        timeline = [[name, kind, round(begin - start, 3), round(end - start, 3), thread]
                    for name, kind, begin, end, thread in self.events[snapshot[3]:]]
        backend, hits = counts[self.BACKEND], counts[self.HIT]
        return {"backend_compiles": backend, "persistent_cache_hits": hits, "xla_compiles": backend - hits,
                "persistent_cache_writes": counts[self.WRITE], "traces": counts[self.TRACE],
                "compile_s": round(seconds[self.BACKEND], 3), "functions": dict(functions.most_common()),
                "timeline": timeline}


def jax_cache_settings() -> dict:
    """JAX's persistent-cache settings as the engine left them, and the files under ``$MTIJAX_CACHE/xla``."""
    import jax

    settings = {}
    for name in ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
                 "jax_persistent_cache_min_entry_size_bytes"):
        try:
            settings[name] = getattr(jax.config, name)
        except AttributeError:
            settings[name] = None
    xla = Path(os.environ.get("MTIJAX_CACHE", Path.home() / ".cache" / "mtijax")) / "xla"
    files = [p for p in xla.rglob("*") if p.is_file()] if xla.is_dir() else []
    settings["xla_cache_files"] = len(files)
    settings["xla_cache_bytes"] = sum(p.stat().st_size for p in files)
    return settings


def worker_probe(spec: dict) -> None:
    """The machine, and each model's context limit and size."""
    import jax
    import jaxlib

    from bench_generate import model_config

    device = jax.devices()[0]
    cpu = ""
    if Path("/proc/cpuinfo").exists():
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), "")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    emit(event="machine", platform=device.platform, device=getattr(device, "device_kind", str(device)), cpu=cpu,
         cpu_cores=len(os.sched_getaffinity(0)), jax=jax.__version__, jaxlib=jaxlib.__version__,
         python=platform.python_version(), commit=commit or None,
         date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    for name in spec["models"]:
        config = model_config(name)
        emit(event="model", name=name, max_position_embeddings=config.max_position_embeddings,
             num_params=config.num_params, vocab_size=config.vocab_size)


def gpu_state() -> dict | None:
    """The GPU's SM clock, performance state and power draw as ``nvidia-smi`` reads them now (None without it):
    a fresh machine's first run compiles more slowly than later ones, and this is recorded to tell why."""
    if shutil.which("nvidia-smi") is None:
        return None
    fields = ("clocks.sm", "pstate", "power.draw")
    out = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader"],
                         capture_output=True, text=True)
    if out.returncode or not out.stdout.strip():
        return None
    return dict(zip(fields, (v.strip() for v in out.stdout.splitlines()[0].split(","))))


def worker_session(spec: dict) -> None:
    """Start-up, init, then each case of ``spec["cases"]`` (``name``, ``prompt_len``, ``new_tokens``, ``repeat``)
    until ``spec["deadline"]``; every result is one event line."""
    spawned, entered = spec["spawned_at"], time.time()
    import jax
    import jax.numpy as jnp
    import numpy as np

    import mtijax
    from mtijax.engine import settle_compiles

    imported = time.time()
    counter = CompileCounter()
    jax.devices()
    ready = time.time()
    emit(event="startup", to_python_s=entered - spawned, import_s=imported - entered, backend_s=ready - imported,
         startup_s=ready - spawned, gpu=gpu_state())
    from bench_generate import model_config

    config = model_config(spec["model"])
    before, start = counter.snapshot(), time.perf_counter()
    params = jax.block_until_ready(mtijax.init_params(config, jax.random.key(0), jnp.dtype(spec["dtype"])))
    emit(event="init", seconds=time.perf_counter() - start, compiles=counter.since(before, start))
    rng = np.random.default_rng(0)

    def call(prompt: list[int], new_tokens: int) -> dict:
        before, start = counter.snapshot(), time.perf_counter()
        stream = mtijax.generate_stream(config, params, [prompt], new_tokens, stop_ids=())
        next(stream)
        first, at = time.perf_counter() - start, time.time() - spawned
        count = 1 + sum(1 for _ in stream)
        total = time.perf_counter() - start
        settle_compiles()
        return {"first_token_s": first, "total_s": total, "settled_s": time.perf_counter() - start, "tokens": count,
                "first_token_since_spawn_s": at, "compiles": counter.since(before, start)}

    for case in spec["cases"]:
        if time.time() >= spec["deadline"]:
            emit(event="skipped", name=case["name"], reason="budget: the model's share was spent")
            continue
        prompt = rng.integers(3, config.vocab_size, case["prompt_len"]).tolist()
        result = {"event": "case", **case, "first": call(prompt, case["new_tokens"])}
        if case["repeat"]:
            result["repeat"] = call(prompt, case["new_tokens"])
        emit(**result)
    emit(event="done", since_spawn_s=time.time() - spawned, cache=jax_cache_settings(), gpu=gpu_state())


def worker_peer(spec: dict) -> None:
    """The transformers eager peer: start-up, model build, then a 1-token ``generate`` per case."""
    spawned, entered = spec["spawned_at"], time.time()
    import torch
    import transformers  # noqa: F401  (its import is part of the peer's start-up)

    imported = time.time()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.empty(1, device=device)
    ready = time.time()
    emit(event="startup", to_python_s=entered - spawned, import_s=imported - entered, backend_s=ready - imported,
         startup_s=ready - spawned)
    helper = time.time()
    from bench_generate import hf_model, model_config, sync  # this benchmark's helpers, not the peer's start-up

    helper_s = time.time() - helper
    config = model_config(spec["model"])
    start = time.perf_counter()
    model = hf_model(config, spec["dtype"], device)
    sync(device)
    emit(event="init", seconds=time.perf_counter() - start)
    generator = torch.Generator(device).manual_seed(0)
    for case in spec["cases"]:
        if time.time() >= spec["deadline"]:
            emit(event="skipped", name=case["name"], reason="budget: the model's share was spent")
            continue
        ids = torch.randint(3, config.vocab_size, (1, case["prompt_len"]), device=device, generator=generator)
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False,
                           pad_token_id=config.pad_token_id)
        sync(device)
        emit(event="case", name=case["name"], prompt_len=case["prompt_len"],
             first={"first_token_s": time.perf_counter() - start,
                    "first_token_since_spawn_s": time.time() - spawned - helper_s})


# ---- the parent -------------------------------------------------------------------------------------------------

def mtijax_cases(limit: int) -> tuple[list[dict], list[dict]]:
    """The cases of the cold and of the second process for a context limit of ``limit`` tokens (module doc)."""
    case = lambda name, prompt, new: {"name": name, "prompt_len": prompt, "new_tokens": new, "repeat": True}
    long = limit - BASE_NEW - 5
    prompts = [p for p in PROMPTS if p + BASE_NEW <= limit] + ([long] if long > max(PROMPTS + (BASE_PROMPT,)) else [])
    return [case("cold", BASE_PROMPT, BASE_NEW)], (
        [case("second_process", BASE_PROMPT, BASE_NEW)] + [case(f"prompt_{p}", p, BASE_NEW) for p in prompts]
        + [case(f"new_{n}", BASE_PROMPT, n) for n in NEW_TOKENS if BASE_PROMPT + n <= limit])


def session_record(child: dict, found: list[dict], planned: list[dict]) -> dict:
    """A child's events as one record: startup, init, cases by name, skipped cases (those it never reached
    included), the end state and the child's exit."""
    record: dict = {"cases": {}, "skipped": {}, "child": child}
    for event in found:
        kind = event.pop("event")
        if kind == "case":
            record["cases"][event["name"]] = event
        elif kind == "skipped":
            record["skipped"][event["name"]] = event["reason"]
        else:
            record[kind] = event
    for case in planned:
        if case["name"] not in record["cases"] and case["name"] not in record["skipped"]:
            record["skipped"][case["name"]] = ("killed at the budget's end" if child["killed"]
                                               else f"the child exited with status {child['rc']}")
    return record


def measure(spec: dict, env: dict[str, str], kill_at: float) -> dict:
    """Run a session or peer worker on ``spec`` and return its :func:`session_record`; if ``spec["deadline"]`` has
    passed already, no process is started and every case is recorded as skipped."""
    if time.time() >= spec["deadline"]:
        return {"cases": {}, "skipped": {case["name"]: "budget: spent before this process would start"
                                         for case in spec["cases"]}, "child": None}
    child, found = spawn_worker(spec, env, kill_at)
    return session_record(child, found, spec["cases"])


def derive(cold: dict, second: dict, peer: dict | None, model: str) -> dict:
    """The summary of one model: the headline figures, each beside its target and its peer's figure."""
    base = cold["cases"].get("cold", {})
    warm = base.get("repeat", {}).get("first_token_s")
    summary: dict = {"startup_s": cold.get("startup", {}).get("startup_s"),
                     "init_s": cold.get("init", {}).get("seconds"),
                     "cold_first_token_s": base.get("first", {}).get("first_token_s"), "warm_first_token_s": warm,
                     "cold_settled_s": base.get("first", {}).get("settled_s"), "new_shapes": {}}
    for name, case in {**cold["cases"], **second["cases"]}.items():
        first, repeat = case["first"], case.get("repeat")
        if repeat:
            case["over_warm_s"] = first["first_token_s"] - repeat["first_token_s"]
            case["compile_cost_s"] = first["total_s"] - repeat["total_s"]
        if warm is not None:
            case["over_base_warm_s"] = first["first_token_s"] - warm
        if name not in ("cold", "second_process"):
            summary["new_shapes"][name] = {key: case.get(key) for key in ("over_warm_s", "over_base_warm_s",
                                                                          "compile_cost_s")}
            summary["new_shapes"][name]["xla_compiles"] = first["compiles"]["xla_compiles"]
    second_case = second["cases"].get("second_process", {}).get("first", {})
    summary["second_process_first_token_s"] = second_case.get("first_token_s")
    summary["second_process_first_token_since_spawn_s"] = second_case.get("first_token_since_spawn_s")
    summary["second_process_xla_compiles"] = second_case.get("compiles", {}).get("xla_compiles")
    worst = max((c["over_warm_s"] for c in summary["new_shapes"].values() if c.get("over_warm_s") is not None),
                default=None)
    summary["worst_new_shape_over_warm_s"] = worst
    targets = {"cold_first_token_s": TARGETS["cold_first_token_s"].get(model),
               "worst_new_shape_over_warm_s": TARGETS["new_shape_over_warm_s"],
               "second_process_first_token_s": TARGETS["second_process_first_token_s"].get(model)}
    summary["targets"] = {key: {"target_s": target, "measured_s": summary[key],
                                "met": None if summary[key] is None else summary[key] <= target}
                          for key, target in targets.items() if target is not None}
    if peer:
        peer_cold = peer["cases"].get("cold", {}).get("first", {}).get("first_token_s")
        peer_warm = peer["cases"].get("warm", {}).get("first", {}).get("first_token_s")
        peer_300 = peer["cases"].get("prompt_300", {}).get("first", {}).get("first_token_s")
        summary["transformers_eager"] = {"cold_first_token_s": peer_cold, "warm_first_token_s": peer_warm,
                                         "prompt_300_first_token_s": peer_300,
                                         "startup_s": peer.get("startup", {}).get("startup_s"),
                                         "init_s": peer.get("init", {}).get("seconds")}
        ratio = lambda theirs, ours: theirs / ours if theirs and ours else None
        summary["speedup_vs_transformers_eager"] = {
            "cold_first_token": ratio(peer_cold, summary["cold_first_token_s"]),
            "warm_first_token": ratio(peer_warm, warm)}
    return summary


def fmt(value: float | None, width: int = 8, digits: int = 3) -> str:
    return f"{value:>{width}.{digits}f}" if isinstance(value, (int, float)) else f"{'-':>{width}}"


def print_model(model: str, record: dict) -> None:
    summary = record["summary"]
    target = lambda key: summary["targets"].get(key, {}).get("target_s")
    peer = summary.get("transformers_eager", {})
    print(f"\n{model} ({record['dtype']}): start-up {fmt(summary['startup_s'], 0)} s, "
          f"init {fmt(summary['init_s'], 0)} s"
          f"; transformers eager: start-up {fmt(peer.get('startup_s'), 0)} s, init {fmt(peer.get('init_s'), 0)} s, "
          f"warm first token {fmt(peer.get('warm_first_token_s'), 0)} s")
    print(f"  {'case':<15}{'first tok':>10}{'total':>8}{'repeat':>8}{'over warm':>10}{'compile':>9}"
          f"{'xla':>5}{'hits':>5}{'target':>8}{'hf eager':>9}")
    peers = {"cold": peer.get("cold_first_token_s"), "prompt_300": peer.get("prompt_300_first_token_s")}
    goals = {"cold": target("cold_first_token_s"), "second_process": target("second_process_first_token_s")}
    cases = {**record["cold_process"]["cases"], **record["second_process"]["cases"]}
    for name, case in cases.items():
        goal = goals.get(name, target("worst_new_shape_over_warm_s"))
        first, repeat = case["first"], case.get("repeat", {})
        print(f"  {name:<15}{fmt(first['first_token_s'], 10)}{fmt(first['total_s'])}{fmt(repeat.get('first_token_s'))}"
              f"{fmt(case.get('over_warm_s'), 10)}{fmt(case.get('compile_cost_s'), 9)}"
              f"{first['compiles']['xla_compiles']:>5}{first['compiles']['persistent_cache_hits']:>5}"
              f"{fmt(goal)}{fmt(peers.get(name), 9)}", flush=True)
    for where in ("cold_process", "second_process"):
        for name, reason in record[where]["skipped"].items():
            print(f"  {name:<15}skipped: {reason}")


def print_summary(report: dict) -> None:
    """One line per model: the headline figures and whether each target was met."""
    print(f"\n{'model':<13}{'start-up':>9}{'init':>7}{'cold':>8}{'warm':>8}{'worst new':>10}{'2nd proc':>9}"
          f"{'hf cold':>8}{'hf warm':>8}  targets met")
    for model, record in report["models"].items():
        summary = record["summary"]
        peer = summary.get("transformers_eager", {})
        met = ", ".join(f"{key}: {'yes' if t['met'] else 'no' if t['met'] is False else '-'}"
                        for key, t in summary["targets"].items())
        print(f"{model:<13}{fmt(summary['startup_s'], 9)}{fmt(summary['init_s'], 7)}"
              f"{fmt(summary['cold_first_token_s'])}{fmt(summary['warm_first_token_s'])}"
              f"{fmt(summary['worst_new_shape_over_warm_s'], 10)}{fmt(summary['second_process_first_token_s'], 9)}"
              f"{fmt(peer.get('cold_first_token_s'))}{fmt(peer.get('warm_first_token_s'))}  {met}", flush=True)


def tiny_checkpoint(directory: Path) -> Path:
    """A tiny-gemma3 transformers checkpoint with random weights in ``directory`` (the smoke test's model)."""
    from bench_generate import hf_model, model_config

    hf_model(model_config("tiny-gemma3"), "float32", "cpu").save_pretrained(directory)
    return directory


def quick_start(workdir: Path, kill_at: float, tiny: bool) -> dict:
    """The README's quick-start command, twice with one fresh cache directory (cold, then warm); with ``tiny``,
    on a tiny checkpoint and token ids instead of the default model and text."""
    cache = workdir / "quick_start"
    cache.mkdir()
    command = QUICK_START
    if tiny:
        model = tiny_checkpoint(workdir / "tiny-gemma3-hf")
        command = ["generate", "--model", str(model), "--token-ids", "5,17,9", "--max-new-tokens", "8"]
    argv = [sys.executable, "-m", "mtijax.cli", *command]
    runs = {}
    for name in ("cold", "warm"):
        child = run_child(argv, child_env(cache), kill_at)
        child["stderr"] = child["stderr"][-20:]
        runs[name] = child
    warm = runs["warm"]["first_stdout_s"]
    return {"command": "mtijax " + " ".join(command), "argv": argv[1:], **runs,
            "target": {"target_s": TARGETS["quick_start_warm_first_output_s"], "measured_s": warm,
                       "met": None if warm is None else warm <= TARGETS["quick_start_warm_first_output_s"]}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=None, help="comma-separated presets (default: gemma3-270m,gemma3-12b,"
                        "olmoe-1b-7b on a GPU, gemma3-270m on a CPU; tiny-gemma3 with --tiny)")
    parser.add_argument("--dtype", default=None, help="bfloat16 (default on a GPU) or float32 (default on a CPU)")
    parser.add_argument("--context-limit", type=int, default=None,
                        help="the longest context measured (default 8192 on a GPU, 2048 on a CPU; the model's own "
                             "limit if smaller)")
    parser.add_argument("--budget-s", type=float, default=330.0, help="no case starts after this many seconds")
    parser.add_argument("--grace-s", type=float, default=30.0,
                        help="children still running at budget + grace are killed")
    parser.add_argument("--peer", action=argparse.BooleanOptionalAction, default=True,
                        help="measure the transformers eager peer")
    parser.add_argument("--quick-start", action=argparse.BooleanOptionalAction, default=None,
                        help="time the README's quick-start command, before the models (default: on a CPU only; "
                             "with --tiny on a tiny checkpoint)")
    parser.add_argument("--no-persistent-cache", action="store_true",
                        help="run the children with MTIJAX_COMPILATION_CACHE=0")
    parser.add_argument("--no-compile-ahead", action="store_true",
                        help="run the children with MTIJAX_COMPILE_AHEAD=0 (the decode step compiles after the prefill)")
    parser.add_argument("--tiny", action="store_true", help="smoke test: the tiny-gemma3 shapes")
    parser.add_argument("--keep", action="store_true", help="keep the cache directories (path printed)")
    parser.add_argument("--out", default=None, help="JSON path, rewritten after every child")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        {"probe": worker_probe, "session": worker_session, "peer": worker_peer}[spec["kind"]](spec)
        return

    started = time.time()
    kill_at = started + args.budget_s + args.grace_s
    workdir = Path(tempfile.mkdtemp(prefix="bench_compile_"))
    extra = {**({"MTIJAX_COMPILATION_CACHE": "0"} if args.no_persistent_cache else {}),
             **({"MTIJAX_COMPILE_AHEAD": "0"} if args.no_compile_ahead else {})}
    requested = args.sizes.split(",") if args.sizes else None
    probe_models = requested or (["tiny-gemma3"] if args.tiny else ["gemma3-270m", "gemma3-12b", "olmoe-1b-7b"])
    probe, found = spawn_worker({"kind": "probe", "models": probe_models}, child_env(workdir / "probe"), kill_at)
    machine = next(({k: v for k, v in e.items() if k != "event"} for e in found if e["event"] == "machine"), None)
    if machine is None:
        sys.exit(f"bench_compile: the probe child failed: {probe['stderr'][-3:]}")
    gpu = machine["platform"] == "gpu"
    sizes = requested or (["tiny-gemma3"] if args.tiny else probe_models if gpu else ["gemma3-270m"])
    limits = {e["name"]: e["max_position_embeddings"] for e in found if e["event"] == "model"}
    dtype = args.dtype or ("bfloat16" if gpu else "float32")
    context_limit = args.context_limit or (8192 if gpu else 2048)
    do_quick_start = not gpu if args.quick_start is None else args.quick_start
    report: dict = {
        "script": "experiments/bench_compile.py", "argv": sys.argv[1:], "machine": machine,
        "settings": {"dtype": dtype, "sizes": sizes, "context_limit": context_limit, "base_prompt_len": BASE_PROMPT,
                     "base_new_tokens": BASE_NEW, "budget_s": args.budget_s, "grace_s": args.grace_s,
                     "persistent_cache": not args.no_persistent_cache, "compile_ahead": not args.no_compile_ahead,
                     "env": {k: os.environ.get(k) for k in (
                         "MTIJAX_COMPILATION_CACHE", "MTIJAX_COMPILE_AHEAD", "MTIJAX_TIERED_COMPILE", "XLA_FLAGS",
                         "XLA_PYTHON_CLIENT_PREALLOCATE", "JAX_PLATFORMS")}},
        "targets": TARGETS, "models": {}, "quick_start": None, "elapsed_s": 0.0, "finished": False,
    }

    def save() -> None:
        report["elapsed_s"] = time.time() - started
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=2))

    print(f"{machine['device']} ({machine['cpu']}, {machine['cpu_cores']} cores), jax {machine['jax']}; "
          f"seconds; targets beside the figures", flush=True)
    try:
        if do_quick_start:  # first: on a CPU it is the target that matters most
            report["quick_start"] = qs = quick_start(workdir, kill_at, args.tiny)
            save()
            print(f"quick start `{qs['command']}`: first output {fmt(qs['cold']['first_stdout_s'])} s cold, "
                  f"{fmt(qs['warm']['first_stdout_s'])} s warm (target {qs['target']['target_s']:.0f} s); "
                  f"exit {fmt(qs['cold']['seconds'])} / {fmt(qs['warm']['seconds'])} s, status "
                  f"{qs['cold']['rc']} / {qs['warm']['rc']}", flush=True)
        for index, model in enumerate(sizes):
            share_end = time.time() + (started + args.budget_s - time.time()) / (len(sizes) - index)
            limit = min(context_limit, limits.get(model, context_limit))
            cold_cases, second_cases = mtijax_cases(limit)
            cache = workdir / model
            cache.mkdir()
            reserve = 0.15 * (share_end - time.time()) if args.peer else 0.0  # for the peer
            record: dict = {"dtype": dtype, "context_limit": limit, "cache_dir": str(cache)}
            report["models"][model] = record
            spec = {"kind": "session", "model": model, "dtype": dtype}
            record["cold_process"] = measure({**spec, "cases": cold_cases, "deadline": share_end - reserve},
                                             child_env(cache, **extra), kill_at)
            save()
            record["second_process"] = measure({**spec, "cases": second_cases, "deadline": share_end - reserve},
                                               child_env(cache, **extra), kill_at)
            save()
            peer = None
            if args.peer:
                peer_cases = [{"name": "cold", "prompt_len": BASE_PROMPT}, {"name": "warm", "prompt_len": BASE_PROMPT},
                              {"name": "prompt_300", "prompt_len": 300}]
                peer = record["transformers_eager"] = measure(
                    {"kind": "peer", "model": model, "dtype": dtype, "cases": peer_cases, "deadline": share_end},
                    child_env(None, JAX_PLATFORMS="cpu"), kill_at)
            record["summary"] = derive(record["cold_process"], record["second_process"], peer, model)
            save()
            print_model(model, record)
        print_summary(report)
        report["finished"] = True
        save()
    finally:
        if args.keep:
            print(f"cache directories kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
