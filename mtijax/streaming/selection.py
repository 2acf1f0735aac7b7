"""Layer selection (the seed's "sectors"): choose which layers run, skip the rest as identity, and price it.

A skipped layer is the identity on the residual stream at every step: it is
neither read nor moved nor computed, so a selection of ``n`` of ``L`` layers
streams ``n / L`` of the bytes. :func:`selection_study` measures what that
costs in perplexity on a held-out text, so the saving can be weighed.

:class:`KeywordSectors` is the original's predictor (MTI-EVO,
``resonance_loader.predict_active_layers``): three fixed layer ranges of the
48-layer Gemma 3 12B, "Pillar" 0-12, "Bridge" 13-30 and "Ghost" 31-47, switched
on by keywords in the prompt, plus layers 0, 1, 2, 47 and "glue" layers 15,
25, 35 that always run. Bridge scores 0.2 without a keyword, below its 0.5
threshold, and 1.0 with one, above the 0.8 that makes it take every layer, so
its "every other layer" branch never fires; we keep the rule as it was.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mtijax.errors import MtijaxError


class LayerPredictor(Protocol):
    """Chooses the layers that run for a prompt."""

    def select(self, prompt: str, num_layers: int) -> tuple[int, ...]:
        """Sorted layer indices in ``0 .. num_layers - 1``."""


@dataclasses.dataclass(frozen=True)
class KeywordSectors:
    """The original keyword rule, with its 48-layer ranges scaled to ``num_layers`` (``floor(i * L / 48)``).

    Keywords match as substrings of the lower-cased prompt, as in the original.
    """

    pillar_words: tuple[str, ...] = ("what", "define", "fact", "list", "calculate", "prove")
    bridge_words: tuple[str, ...] = ("why", "explain", "code", "function", "analyze", "reason")
    ghost_words: tuple[str, ...] = ("describe", "imagine", "story", "dream", "feel", "color", "poem")
    reference_layers: int = 48

    def sectors(self, prompt: str) -> tuple[str, ...]:
        """The sectors the prompt switches on (``Pillar``, ``Bridge``, ``Ghost``)."""
        text = prompt.lower()
        hit = lambda words: any(w in text for w in words)
        scores = {"Pillar": 0.8 * hit(self.pillar_words), "Bridge": 0.2 + 0.8 * hit(self.bridge_words),
                  "Ghost": 0.8 * hit(self.ghost_words)}
        return tuple(name for name, score in scores.items() if score > 0.5)

    def select(self, prompt: str, num_layers: int) -> tuple[int, ...]:
        scale = lambda i: min(num_layers - 1, i * num_layers // self.reference_layers)
        active = {scale(0), scale(1), scale(2), num_layers - 1, scale(15), scale(25), scale(35)}
        ranges = {"Pillar": (0, 13), "Bridge": (13, 31), "Ghost": (31, self.reference_layers)}
        for sector in self.sectors(prompt):
            start, end = ranges[sector]
            active.update(range(scale(start), num_layers if end == self.reference_layers else scale(end)))
        return tuple(sorted(active))


@dataclasses.dataclass(frozen=True)
class SelectionResult:
    """The cost and the saving of one layer selection on a held-out text.

    Attributes:
      name: the selection's label. layers: the layers that run.
      nll: mean next-token negative log-likelihood (nats). perplexity: ``exp(nll)``.
      nll_increase: ``nll`` minus the all-layers ``nll`` of the same study.
      bytes_per_pass: layer bytes streamed per forward pass. bytes_saved: fraction of all layers' bytes not streamed.
    """

    name: str
    layers: tuple[int, ...]
    nll: float
    perplexity: float
    nll_increase: float
    bytes_per_pass: int
    bytes_saved: float


@jax.jit
def _token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def selection_study(model, token_ids: Sequence[int], selections: Mapping[str, Sequence[int] | None]
                    ) -> list[SelectionResult]:
    """Perplexity of ``token_ids`` (one held-out text) under each selection, with its bytes streamed.

    Args:
      model: a :class:`~mtijax.streaming.StreamedModel`.
      selections: label -> layers that run (None: all). An all-layers run is added first if absent.
    """
    ids = np.asarray(token_ids, np.int32)
    if ids.ndim != 1 or ids.size < 2:
        raise MtijaxError("the held-out text needs at least 2 tokens")
    num_layers = model.config.num_layers
    runs = dict(selections)
    if not any(layers is None or len(set(layers)) == num_layers for layers in runs.values()):
        runs = {"all layers": None, **runs}
    results, base = [], None
    for name, layers in runs.items():
        chosen = tuple(range(num_layers)) if layers is None else tuple(sorted(set(layers)))
        logits = model.forward(ids[None, :-1], layers=chosen).logits
        nll = float(np.mean(np.asarray(_token_nll(logits, jnp.asarray(ids[None, 1:])), np.float64)))
        if base is None and len(chosen) == num_layers:
            base = nll
        results.append((name, chosen, nll))
    return [SelectionResult(name, layers, nll, float(np.exp(nll)), nll - base, len(layers) * model.layer_nbytes,
                            1 - len(layers) / num_layers) for name, layers, nll in results]
