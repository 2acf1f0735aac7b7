"""Per-tick telemetry as CSV and Parquet (a data set for symbolic-regression tools), and the seed's plots.

Telemetry columns, one row per tick (and per prompt when several are written):
``prompt, tick, best_unit, population_rate, mean_dvdt, routing_entropy, adaptation``.
``routing_entropy`` is the entropy (nats) of which unit has won the ticks so
far, ``0..tick``: it falls towards 0 as the routing collapses onto one unit.

Parquet needs ``pyarrow``, which mtijax does not depend on: the Parquet file
is written only when ``pyarrow`` can be imported (``pip install pyarrow``),
and :func:`write_telemetry` says which files it wrote. CSV is always written.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

import numpy as np

from mtijax.snn.network import Routing

COLUMNS = ("prompt", "tick", "best_unit", "population_rate", "mean_dvdt", "routing_entropy", "adaptation")


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


def telemetry(routing: Routing, prompt: int = 0) -> dict[str, np.ndarray]:
    """The telemetry columns of one run (see the module docstring)."""
    best = np.asarray(routing.best_unit)
    ticks = len(best)
    return {"prompt": np.full(ticks, prompt, np.int32), "tick": np.arange(ticks, dtype=np.int32),
            "best_unit": best.astype(np.int32), "population_rate": np.asarray(routing.population_rate),
            "mean_dvdt": np.asarray(routing.mean_dvdt), "routing_entropy": running_entropy(best),
            "adaptation": np.asarray(routing.adaptation)}


def write_telemetry(routings: Sequence[Routing], stem: str | Path) -> list[Path]:
    """Write ``stem.csv`` (and ``stem.parquet`` when pyarrow is installed); returns the paths written."""
    tables = [telemetry(r, i) for i, r in enumerate(routings)]
    columns = {name: np.concatenate([t[name] for t in tables]) for name in COLUMNS}
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    written = [stem.with_suffix(".csv")]
    with open(written[0], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        ints = {"prompt", "tick", "best_unit"}
        rows = zip(*(columns[name].tolist() if name in ints else [f"{x:.9g}" for x in columns[name].tolist()]
                     for name in COLUMNS))
        writer.writerows(rows)
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return written
    written.append(stem.with_suffix(".parquet"))
    pq.write_table(pa.table({name: columns[name] for name in COLUMNS}), written[1])
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
