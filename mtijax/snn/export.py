"""Per-tick telemetry as CSV and Parquet (a data set for symbolic-regression tools), and the seed's plots.

**Network telemetry** (:func:`telemetry`, :func:`write_telemetry`), one row
per tick (and per prompt when several are written)::

    prompt, tick, timestamp_ms, best_unit, population_rate, avg_pop_firing_rate_hz,
    mean_dvdt, membrane_dv_dt, mean_potential, adaptation, winner_entropy

**Gate telemetry** (:func:`gate_telemetry`, :func:`write_gate_telemetry`),
one row per layer, batch row and position of a spiking (or softmax) router::

    layer, row, position, routing_entropy

The seed's own text names no columns; the columns and formulas named after
the original come from its code (rmems/corinth-canal: ``src/latent.rs``'s
``SnnLatentCalibrator`` and ``examples/saaq_latent_calibration.rs``), which
writes ``timestamp_ms, avg_pop_firing_rate_hz, membrane_dv_dt,
routing_entropy`` per tick, with the tick's timestamp ``tick + 1`` ms, so a
tick lasts ``dt = 1 ms``. They are exported exactly as it defines them:

* ``timestamp_ms = tick + 1``;
* ``avg_pop_firing_rate_hz`` = spikes in the tick / units / ``dt`` (seconds), i.e. ``1000 * population_rate``;
* ``membrane_dv_dt`` = (``mean_potential`` of the tick − that of the tick
  before) / ``dt``, and 0 on the first tick (the original has no previous
  mean there); the potentials are the membranes clipped to ``[0, 1]``, as
  the original reads them, so this is not ``mean_dvdt``;
* ``routing_entropy`` = the normalised entropy of a router's expert weights
  (the softmax of its routing logits over the ``E`` experts):
  ``-sum_e w_e ln w_e / ln E`` over finite ``w_e > 0``, clipped to ``[0, 1]``,
  and 0 when ``E <= 1``. The original computes it on its OLMoE router, so it
  is exported for the gate, not for the walker network (below).

The other columns are mtijax's: ``population_rate`` (fraction of units
spiking), ``mean_dvdt`` (mean of ``v(t) - v(t - 1)``, unclipped, from rest),
``mean_potential``, ``adaptation``, and ``winner_entropy``, the entropy (nats)
of which unit won the ticks so far (``0..tick``; it falls towards 0 as the
routing collapses onto one unit).

**Left out.** The original's per-tick wall time (``elapsed_us``: the whole
run is one compiled scan here); a walker-network ``routing_entropy`` (the
original feeds the walkers' spikes through its projector into an OLMoE
forward and takes that router's entropy; mtijax has no such projector);
its SAAQ quantisation targets (``saaq_delta_q_*``, a rule of the original's
own, not a reading of the network); and its heartbeat and hardware sensor
columns (``heartbeat_*``, ``gpu_temp_c``, ``gpu_power_w``, ``cpu_tctl_c``,
``cpu_package_power_w``).

Every table goes to both CSV (floats to 9 significant digits) and Parquet
(``pyarrow``, a dependency of mtijax; exact values and column types).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mtijax.snn.network import Routing

COLUMNS = ("prompt", "tick", "timestamp_ms", "best_unit", "population_rate", "avg_pop_firing_rate_hz",
           "mean_dvdt", "membrane_dv_dt", "mean_potential", "adaptation", "winner_entropy")
GATE_COLUMNS = ("layer", "row", "position", "routing_entropy")
TICK_SECONDS = 1e-3
"""The original's tick length: its telemetry timestamps are ``tick + 1`` milliseconds."""
INTEGER_COLUMNS = {"prompt", "tick", "timestamp_ms", "best_unit", "layer", "row", "position"}


def running_entropy(best_unit: np.ndarray) -> np.ndarray:
    """Entropy (nats) of the winners of ticks ``0..t``, for every ``t`` ``[ticks]`` (float64)."""
    best_unit = np.asarray(best_unit)
    counts: dict[int, int] = {}
    sum_c_log_c = 0.0
    out = np.empty(len(best_unit))
    for t, unit in enumerate(best_unit.tolist()):
        c = counts.get(unit, 0)
        sum_c_log_c += (c + 1) * np.log(c + 1) - (c * np.log(c) if c else 0.0)
        counts[unit] = c + 1
        n = t + 1
        out[t] = max(np.log(n) - sum_c_log_c / n, 0.0)
    return out


def membrane_dv_dt(mean_potential: np.ndarray, dt: float = TICK_SECONDS) -> np.ndarray:
    """The original's ``membrane_dv_dt [ticks]`` float32: the change of the mean potential per second, 0 first."""
    p = np.asarray(mean_potential, np.float32)
    return np.concatenate([np.zeros(1, np.float32), (p[1:] - p[:-1]) / np.float32(dt)]).astype(np.float32)


def routing_entropy(weights: np.ndarray) -> np.ndarray:
    """The original's ``routing_entropy`` of expert weights ``[..., E]``: ``[...]`` float32 in ``[0, 1]``."""
    w = np.asarray(weights, np.float32)
    if w.shape[-1] <= 1:
        return np.zeros(w.shape[:-1], np.float32)
    usable = np.isfinite(w) & (w > 0)
    safe = np.where(usable, w, np.float32(1))
    entropy = np.sum(np.where(usable, -safe * np.log(safe), np.float32(0)), axis=-1, dtype=np.float32)
    return np.clip(entropy / np.float32(np.log(w.shape[-1])), 0, 1).astype(np.float32)


def telemetry(routing: Routing, prompt: int = 0) -> dict[str, np.ndarray]:
    """The network telemetry columns of one run (see the module docstring)."""
    best = np.asarray(routing.best_unit)
    ticks = len(best)
    rate = np.asarray(routing.population_rate, np.float32)
    potential = np.asarray(routing.mean_potential, np.float32)
    return {"prompt": np.full(ticks, prompt, np.int32), "tick": np.arange(ticks, dtype=np.int32),
            "timestamp_ms": np.arange(1, ticks + 1, dtype=np.int64), "best_unit": best.astype(np.int32),
            "population_rate": rate, "avg_pop_firing_rate_hz": rate / np.float32(TICK_SECONDS),
            "mean_dvdt": np.asarray(routing.mean_dvdt), "membrane_dv_dt": membrane_dv_dt(potential),
            "mean_potential": potential, "adaptation": np.asarray(routing.adaptation),
            "winner_entropy": running_entropy(best)}


def gate_telemetry(routing_logits: jax.Array, valid: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The gate telemetry columns of routing logits ``[L, B, S, E]`` (a layer's softmax router, or its spiking
    gate's from ``gate_scan``): one row per valid ``(layer, row, position)``, in that order."""
    logits = np.asarray(routing_logits, np.float32)
    weights = np.asarray(jax.nn.softmax(logits, axis=-1))
    layers, rows, positions = logits.shape[:3]
    keep = np.ones((rows, positions), bool) if valid is None else np.asarray(valid, bool)
    keep = np.broadcast_to(keep, (layers, rows, positions))
    layer, row, position = np.nonzero(keep)
    return {"layer": layer.astype(np.int32), "row": row.astype(np.int32), "position": position.astype(np.int32),
            "routing_entropy": routing_entropy(weights)[keep]}


def write_telemetry(routings: Sequence[Routing], stem: str | Path) -> list[Path]:
    """Write the network telemetry of every run to ``stem.csv`` and ``stem.parquet``; returns both paths."""
    tables = [telemetry(r, i) for i, r in enumerate(routings)]
    return write_table({name: np.concatenate([t[name] for t in tables]) for name in COLUMNS}, stem)


def write_gate_telemetry(routing_logits: jax.Array, stem: str | Path, valid: np.ndarray | None = None) -> list[Path]:
    """Write :func:`gate_telemetry` to ``stem.csv`` and ``stem.parquet``; returns both paths."""
    return write_table(gate_telemetry(routing_logits, valid), stem)


def write_table(columns: dict[str, np.ndarray], stem: str | Path) -> list[Path]:
    """Columns of equal length to ``stem.csv`` (floats to 9 significant digits) and ``stem.parquet`` (exact)."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    written = [stem.with_suffix(".csv"), stem.with_suffix(".parquet")]
    names = list(columns)
    with open(written[0], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(names)
        rows = zip(*(columns[name].tolist() if name in INTEGER_COLUMNS else
                     [f"{x:.9g}" for x in columns[name].tolist()] for name in names))
        writer.writerows(rows)
    pq.write_table(pa.table({name: columns[name] for name in names}), written[1])
    return written


def plot_raster(routing: Routing, path: str | Path, title: str = "") -> Path:
    """Spikes of every unit over time (units on the y axis, as the seed's plots); binned rasters as counts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    raster = np.asarray(routing.raster, np.float32).T  # [units, bins]
    fig, ax = plt.subplots(figsize=(10, 5))
    ax.imshow(raster > 0 if routing.raster_bin == 1 else raster, aspect="auto", origin="lower", cmap="Greys",
              interpolation="nearest", extent=(0, routing.ticks, 0, raster.shape[0]))
    ax.set_xlabel("tick")
    ax.set_ylabel("unit (walker)")
    binned = "" if routing.raster_bin == 1 else f" (spike counts per {routing.raster_bin} ticks)"
    ax.set_title((title + "\n" if title else "") + "spike raster" + binned, fontsize=9)
    return _save(fig, path)


def plot_best_unit(routing: Routing, path: str | Path, title: str = "") -> Path:
    """The best unit of every tick (the seed's "walker" over time)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = np.asarray(routing.best_unit)
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.plot(np.arange(len(best)), best, ",", color="tab:red", alpha=0.6)
    ax.set_ylim(-0.5, routing.spike_counts.shape[-1] - 0.5)
    ax.set_xlabel("tick")
    ax.set_ylabel("best unit")
    ax.set_title((title + "\n" if title else "") + "best unit per tick", fontsize=9)
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
