"""Route prompts through spiking units driven by a model, read the result, write it out (``mtijax snn route``)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mtijax.errors import MtijaxError
from mtijax.snn import analysis, export
from mtijax.snn.drivers import make_driver, parse_driver
from mtijax.snn.network import Network, Routing, simulate_batch, stack_frames
from mtijax.snn.synapses import DEFAULT_SPEC, parse_synapses
from mtijax.snn.units import UNIT_MODELS

SEED_TICKS = 10_000


@dataclasses.dataclass
class RouteStudy:
    """Prompts routed through one network.

    Attributes:
      labels: one name per prompt (its text, or its token ids).
      frames: each prompt's driver ``[S_i, width]``.
      network: the network they went through.
      routing: the batched :class:`Routing` (``[P, ...]``).
      settings: how it was made (model, driver, synapses, unit model, ticks, normalised).
    """

    labels: list[str]
    frames: list[Any]
    network: Network
    routing: Routing
    settings: dict[str, Any]

    def prompt(self, index: int) -> Routing:
        """One prompt's routing."""
        return analysis.row(self.routing, index)

    def summaries(self) -> list[dict[str, Any]]:
        """:func:`summarise` of every prompt."""
        return [summarise(self.prompt(i)) for i in range(len(self.labels))]

    def to_json(self) -> dict[str, Any]:
        """Settings, per-prompt summaries and the similarity matrices, as plain JSON types."""
        sims = analysis.similarity([self.prompt(i) for i in range(len(self.labels))])
        return {"settings": self.settings, "collapse_thresholds": {"top_share": analysis.COLLAPSE_TOP_SHARE,
                                                                   "effective_units": analysis.COLLAPSE_EFFECTIVE_UNITS},
                "prompts": [{"label": label, **s} for label, s in zip(self.labels, self.summaries())],
                "similarity": {k: np.round(v, 4).tolist() for k, v in sims.items()}}


def summarise(routing: Routing, bands: int = analysis.BANDS) -> dict[str, Any]:
    """Collapse reading, dominant units and band, and spiking totals of one run."""
    c = analysis.collapse(routing)
    counts = np.asarray(routing.spike_counts)
    return {"collapse": c.flagged, "collapse_reason": c.reason, "top_unit": c.top_unit,
            "top_share": round(c.top_share, 4), "routing_entropy": round(c.routing_entropy, 4),
            "spike_entropy": None if np.isnan(c.spike_entropy) else round(c.spike_entropy, 4),
            "effective_winners": round(c.effective_winners, 3),
            "effective_spikers": None if np.isnan(c.effective_spikers) else round(c.effective_spikers, 3),
            "dominant_units": [[u, round(s, 4)] for u, s in analysis.dominant_units(routing)],
            "dominant_band": analysis.dominant_band(routing, bands), "bands": bands,
            "units_firing": int((counts > 0).sum()), "spikes": int(counts.sum()),
            "population_rate": round(float(np.mean(np.asarray(routing.population_rate))), 6)}


def route_prompts(model, prompts: Sequence[Sequence[int]], labels: Sequence[str] | None = None, *,
                  ticks: int = SEED_TICKS, driver: str = "embeddings", synapses: str = DEFAULT_SPEC,
                  units: int | None = None, unit_model: str = "gif", normalise: bool = True,
                  raster_bin: int | None = None) -> RouteStudy:
    """Drive a network with each prompt (token ids) of ``model`` (an ``mtijax.Model``) and simulate them as one
    batch.

    Args:
      driver: ``embeddings``, ``resid:L`` or ``SITE:L`` (``mtijax.snn.drivers``).
      synapses: ``PATH[:LAYER]`` of the model, ``random[:SEED]`` or ``identity`` (``mtijax.snn.synapses``).
      units: keep the first ``units`` units (default: all the synapses' outputs).
      unit_model: ``gif`` (the seed's), ``lif`` or ``alif``, with their default constants.
      normalise: L2-normalise every frame (the seed's fix); False presents the raw activations.
    """
    if not prompts:
        raise MtijaxError("no prompts to route")
    if unit_model not in UNIT_MODELS:
        raise MtijaxError(f"unknown unit model {unit_model!r}; choose from {', '.join(UNIT_MODELS)}")
    spec = parse_driver(driver, model.config.num_layers)
    frames = [make_driver(model.config, model.params, ids, spec, normalise=normalise) for ids in prompts]
    matrix = parse_synapses(synapses, model.params, frames[0].shape[-1], units)
    network = Network(matrix, UNIT_MODELS[unit_model]())
    stacked, counts = stack_frames(frames)
    routing = simulate_batch(network, stacked, ticks, counts, raster_bin=raster_bin)
    settings = {"model": model.source, "architecture": model.config.architecture, "driver": driver,
                "synapses": synapses, "units": network.num_units, "unit_model": unit_model, "ticks": ticks,
                "normalised": normalise, "raster_bin": routing.raster_bin}
    labels = list(labels) if labels is not None else [" ".join(map(str, p)) for p in prompts]
    return RouteStudy(labels, frames, network, routing, settings)


def table(study: RouteStudy) -> str:
    """A plain-text table, one row per prompt."""
    header = f"{'prompt':<44} {'top unit':>8} {'share':>6} {'route H':>7} {'spike H':>7} {'band':>4} " \
             f"{'firing':>6}  collapse"
    lines = [header, "-" * len(header)]
    for label, s in zip(study.labels, study.summaries()):
        spike_h = "-" if s["spike_entropy"] is None else f"{s['spike_entropy']:.3f}"
        short = label if len(label) <= 44 else label[:41] + "..."
        lines.append(f"{short:<44} {s['top_unit']:>8} {s['top_share']:>6.2f} {s['routing_entropy']:>7.3f} "
                     f"{spike_h:>7} {s['dominant_band']:>4} {s['units_firing']:>6}  "
                     f"{'YES: ' + s['collapse_reason'] if s['collapse'] else 'no'}")
    return "\n".join(lines)


def write_outputs(study: RouteStudy, out: str | Path) -> list[Path]:
    """``routing.json``, ``telemetry.csv`` and ``.parquet``, and ``raster_i.png`` and
    ``best_unit_i.png`` per prompt, under ``out``. Returns the paths written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = [study.prompt(i) for i in range(len(study.labels))]
    written = export.write_telemetry(runs, out / "telemetry")
    for i, (label, run) in enumerate(zip(study.labels, runs)):
        written.append(export.plot_raster(run, out / f"raster_{i}.png", label))
        written.append(export.plot_best_unit(run, out / f"best_unit_{i}.png", label))
    (out / "routing.json").write_text(json.dumps(study.to_json(), indent=1))
    return [out / "routing.json", *written]

