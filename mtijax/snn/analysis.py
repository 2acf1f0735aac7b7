"""What a routing run says: collapse, dominant units and bands, similarity between prompts, clustering vs a null.

Host-side NumPy on one :class:`~mtijax.snn.network.Routing` (use :func:`row`
to take one prompt out of a batch). Entropies are in nats and *normalised*
by ``log(units)``, so 1 is a perfectly even spread and 0 a single unit.

**Collapse** (the seed's "blackhole") is flagged when any of these holds:

* the top unit wins at least :data:`COLLAPSE_TOP_SHARE` (90%) of the ticks;
* the ticks' winners are effectively at most :data:`COLLAPSE_EFFECTIVE_UNITS`
  (2) units: ``exp(H) <= 2`` for the entropy ``H`` (nats) of which unit won
  each tick;
* the spikes effectively come from at most 2 units (the same on the
  spike-count entropy).

"Effective units" (the perplexity ``exp(H)``) does not depend on how many
units there are. Two is where a single unit, or a locked pair, ends: a
read-out that alternates between two units 2:1 (what every input much larger
than the threshold produces, see ``README``) has ``exp(H) = 1.89``. A network
that never spikes has no spike-count entropy (NaN) and is judged on the
other two.
"""

from __future__ import annotations

import itertools
from typing import Any, NamedTuple, Sequence

import jax
import numpy as np

from mtijax.errors import MtijaxError
from mtijax.snn.network import Routing

COLLAPSE_TOP_SHARE = 0.9
COLLAPSE_EFFECTIVE_UNITS = 2.0
TOP_UNITS = 10
"""How many units :func:`similarity` compares by Jaccard index."""
BANDS = 16
"""Unit indices are split into this many equal bands (the seed's "frequency bands" of walker ids)."""


def row(routing: Routing, index: int) -> Routing:
    """Prompt ``index`` of a batched routing."""
    return jax.tree.map(lambda x: x[index], routing)


def normalised_entropy(counts: np.ndarray) -> float:
    """Shannon entropy of ``counts / sum`` divided by ``log(len(counts))``; NaN when all counts are 0."""
    counts = np.asarray(counts, np.float64)
    total = counts.sum()
    if total <= 0:
        return float("nan")
    p = counts[counts > 0] / total
    return float(-(p * np.log(p)).sum() / np.log(max(len(counts), 2)))


def win_counts(routing: Routing) -> np.ndarray:
    """How many ticks each unit was the best unit ``[units]``."""
    return np.bincount(np.asarray(routing.best_unit), minlength=routing.spike_counts.shape[-1])


class Collapse(NamedTuple):
    """The collapse detector's reading of one run (see the module docstring).

    ``routing_entropy`` and ``spike_entropy`` are normalised to [0, 1];
    ``effective_winners`` and ``effective_spikers`` are the perplexities the thresholds apply to.
    """

    top_unit: int
    top_share: float
    routing_entropy: float
    spike_entropy: float
    effective_winners: float
    effective_spikers: float
    flagged: bool
    reason: str


def effective_units(counts: np.ndarray) -> float:
    """``exp(H)`` of ``counts / sum`` (nats): 1 for a single unit, N for N equal units; NaN when all are 0."""
    counts = np.asarray(counts, np.float64)
    if counts.sum() <= 0:
        return float("nan")
    p = counts[counts > 0] / counts.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def collapse(routing: Routing) -> Collapse:
    """Detect a routing collapse (thresholds in the module docstring)."""
    wins = win_counts(routing)
    spikes = np.asarray(routing.spike_counts)
    top = int(np.argmax(wins))
    share = float(wins[top] / wins.sum())
    winners, spikers = effective_units(wins), effective_units(spikes)
    reasons = []
    if share >= COLLAPSE_TOP_SHARE:
        reasons.append(f"unit {top} wins {share:.0%} of ticks (>= {COLLAPSE_TOP_SHARE:.0%})")
    if winners <= COLLAPSE_EFFECTIVE_UNITS:
        reasons.append(f"the winners are {winners:.2f} effective units (<= {COLLAPSE_EFFECTIVE_UNITS:g})")
    if spikers <= COLLAPSE_EFFECTIVE_UNITS:
        reasons.append(f"the spikes come from {spikers:.2f} effective units (<= {COLLAPSE_EFFECTIVE_UNITS:g})")
    return Collapse(top, share, normalised_entropy(wins), normalised_entropy(spikes), winners, spikers,
                    bool(reasons), "; ".join(reasons) or "no collapse")


def band_of(unit: int | np.ndarray, num_units: int, bands: int = BANDS) -> int | np.ndarray:
    """The band of a unit index: ``unit * bands // num_units`` (band 0 holds the lowest indices)."""
    return np.asarray(unit) * bands // num_units


def dominant_units(routing: Routing, k: int = 5) -> list[tuple[int, float]]:
    """The ``k`` units that win the most ticks, with their share of ticks (best first, ties to lower index)."""
    wins = win_counts(routing)
    order = np.argsort(-wins, kind="stable")[:k]
    return [(int(u), float(wins[u] / wins.sum())) for u in order if wins[u] > 0]


def dominant_band(routing: Routing, bands: int = BANDS) -> int:
    """The band whose units win the most ticks together."""
    wins = win_counts(routing)
    per_band = np.bincount(band_of(np.arange(len(wins)), len(wins), bands), weights=wins, minlength=bands)
    return int(np.argmax(per_band))


def similarity(routings: Sequence[Routing], top: int = TOP_UNITS, bands: int = BANDS) -> dict[str, np.ndarray]:
    """Pairwise similarity of prompts' routing, each ``[P, P]``.

    * ``jaccard``: Jaccard index of the ``top`` units by ticks won;
    * ``rate_cosine``: cosine of the firing-rate vectors (0 when either network is silent);
    * ``win_cosine``: cosine of the ticks-won vectors;
    * ``same_band``: 1 where the two dominant bands are the same.
    """
    wins = [win_counts(r) for r in routings]
    tops = [_top_units(w, top) for w in wins]
    rates = [np.asarray(r.spike_counts, np.float64) for r in routings]
    dom = [dominant_band(r, bands) for r in routings]
    p = len(routings)
    out = {name: np.eye(p) for name in ("jaccard", "rate_cosine", "win_cosine", "same_band")}
    for i, j in itertools.combinations(range(p), 2):
        union = tops[i] | tops[j]
        values = {"jaccard": len(tops[i] & tops[j]) / len(union) if union else 1.0,
                  "rate_cosine": _cosine(rates[i], rates[j]), "win_cosine": _cosine(wins[i], wins[j]),
                  "same_band": float(dom[i] == dom[j])}
        for name, value in values.items():
            out[name][i, j] = out[name][j, i] = value
    return out


def _top_units(wins: np.ndarray, k: int) -> set[int]:
    """The ``k`` units that win the most ticks (only units that won at least once)."""
    order = np.argsort(-wins, kind="stable")[:k]
    return {int(u) for u in order if wins[u] > 0}


def cosine_matrix(vectors: np.ndarray) -> np.ndarray:
    """Pairwise cosine ``[P, P]`` of rows ``[P, N]`` (the drivers' own similarity, for comparison)."""
    v = np.asarray(vectors, np.float64)
    return np.asarray([[_cosine(a, b) for b in v] for a in v])


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return float(np.dot(a, b) / (na * nb)) if na > 0 and nb > 0 else 0.0


def clustering_statistic(sim: np.ndarray, labels: Sequence[str], together: Sequence[str],
                         apart: Sequence[str]) -> float:
    """Mean similarity between prompts of different ``together`` groups, minus the mean between a ``together``
    prompt and an ``apart`` prompt. Positive when e.g. code and math are closer to each other than to prose."""
    labels = np.asarray(labels)
    inside = [sim[i, j] for i, j in itertools.combinations(range(len(labels)), 2)
              if labels[i] in together and labels[j] in together and labels[i] != labels[j]]
    across = [sim[i, j] for i in range(len(labels)) for j in range(len(labels))
              if labels[i] in together and labels[j] in apart]
    if not inside or not across:
        raise MtijaxError(f"the clustering statistic needs prompts of two groups of {list(together)} and of "
                          f"{list(apart)}; labels are {sorted(set(labels.tolist()))}")
    return float(np.mean(inside) - np.mean(across))


def permutation_test(sim: np.ndarray, labels: Sequence[str], together: Sequence[str], apart: Sequence[str],
                     permutations: int = 2000, seed: int = 0) -> dict[str, Any]:
    """:func:`clustering_statistic` against the same statistic with the labels shuffled among the prompts.

    Returns ``{"statistic", "p_value", "null_mean", "null_std"}``; ``p_value`` is
    ``(1 + #{null >= observed}) / (1 + permutations)``, so the claim can fail.
    """
    observed = clustering_statistic(sim, labels, together, apart)
    rng = np.random.default_rng(seed)
    null = np.asarray([clustering_statistic(sim, rng.permutation(np.asarray(labels)), together, apart)
                       for _ in range(permutations)])
    return {"statistic": observed, "p_value": float((1 + np.sum(null >= observed - 1e-12)) / (1 + permutations)),
            "null_mean": float(null.mean()), "null_std": float(null.std())}


def network_null(observed: float, null_statistics: Sequence[float]) -> dict[str, Any]:
    """An observed statistic against the same statistic from null networks (random or shuffled synapses).

    ``p_value`` is ``(1 + #{null >= observed}) / (1 + n)``: small when the real network clusters more than
    networks without its weights do.
    """
    null = np.asarray(null_statistics, np.float64)
    return {"statistic": float(observed), "p_value": float((1 + np.sum(null >= observed - 1e-12)) / (1 + len(null))),
            "null_mean": float(null.mean()), "null_std": float(null.std()), "null_runs": len(null)}
