"""Measures of a behaviour transfer: marker score, transfer efficiency, R_V, next-token KL.

The defaults reproduce the original study's code (public repository
AmitabhainArunachala/mech-interp-latent-lab-phase1, ``score_behavior``,
``compute_pr``, ``compute_rv``):

* the **behaviour score** counts each of 21 markers once if it occurs as a
  substring of the lower-cased text, and adds 5 when the text has more than 10
  whitespace-separated words of which fewer than 60% are distinct
  (case-sensitive, punctuation attached, as ``str.split``);
* the **participation ratio** of an activation window ``X [W, d]`` with
  singular values ``s`` is ``(sum s^2)^2 / sum s^4`` of the *uncentred* window
  (centring, subtracting the mean over the window, is an option);
* **R_V** = PR(value projections at a late layer) / PR(at an early layer),
  each over the last ``W = 16`` prompt tokens, layers 5 and ``L - 5`` by default.

Where the original silently substituted a number (PR = 1.0 for an all-zero
window, efficiency 0 when champion and baseline score the same), these
functions return None (NaN for PR) and say the value is undefined.
"""

from __future__ import annotations

import re
from typing import Sequence

import jax
import numpy as np

from mtijax.config import ModelConfig
from mtijax.errors import MtijaxError
from mtijax.metrics import kl_divergence
from mtijax.models.decoder import Params
from mtijax.patching.capture import capture

MARKERS: tuple[str, ...] = (
    "itself", "self", "recursive", "loop", "process", "cycle", "return", "eigen", "writing", "mirror",
    "awareness", "consciousness", "observer", "observing", "generating", "emerging", "simultaneous",
    "fixed point", "solution", "answerer", "answer is",
)
"""The original's 21 markers."""
REPETITION_BONUS = 5
REPETITION_MIN_WORDS = 10
REPETITION_UNIQUE_FRACTION = 0.6
WINDOW = 16


def markers_found(text: str, markers: Sequence[str] = MARKERS, *, whole_words: bool = False) -> list[str]:
    """The markers present in ``text`` (case-insensitive), each once. Substrings by default (``"self"`` is found
    in ``"itself"``); ``whole_words`` requires a match not touching a letter, digit or underscore on either side."""
    lower = text.lower()
    if whole_words:
        return [m for m in markers if re.search(r"(?<!\w)" + re.escape(m.lower()) + r"(?!\w)", lower)]
    return [m for m in markers if m.lower() in lower]


def is_repetitive(text: str) -> bool:
    """The original's repetition test: more than 10 words and fewer than 60% of them distinct."""
    words = text.split()
    return len(words) > REPETITION_MIN_WORDS and len(set(words)) < len(words) * REPETITION_UNIQUE_FRACTION


def behavior_score(text: str, markers: Sequence[str] = MARKERS, *, whole_words: bool = False) -> int:
    """Markers present (each counted once) + 5 if :func:`is_repetitive` (the original's ``score_behavior``)."""
    return len(markers_found(text, markers, whole_words=whole_words)) + (REPETITION_BONUS if is_repetitive(text)
                                                                          else 0)


def efficiency(patched: float, baseline: float, champion: float) -> float | None:
    """Transfer efficiency ``(patched - baseline) / (champion - baseline)``; None (undefined) when the champion
    and the baseline score the same. A negative gap (champion below baseline) is still a defined ratio."""
    gap = champion - baseline
    if gap == 0:
        return None
    return (patched - baseline) / gap


def participation_ratio(window: np.ndarray, *, centre: bool = False) -> float:
    """``(sum s^2)^2 / sum s^4`` over the singular values ``s`` of ``window [W, d]`` (float64); NaN for an
    all-zero window. Between 1 (rank one) and ``min(W, d)`` (all directions equally used)."""
    x = np.asarray(window, np.float64).reshape(np.shape(window)[0], -1)
    if centre:
        x = x - x.mean(axis=0, keepdims=True)
    energy = np.linalg.svd(x, compute_uv=False) ** 2
    denominator = np.sum(energy**2)
    return float(np.sum(energy) ** 2 / denominator) if denominator > 0 else float("nan")


def r_v(early: np.ndarray, late: np.ndarray, *, centre: bool = False) -> float:
    """PR(late window) / PR(early window); NaN when either is undefined."""
    return participation_ratio(late, centre=centre) / participation_ratio(early, centre=centre)


def default_rv_layers(num_layers: int) -> tuple[int, int]:
    """Layers 5 and ``L - 5`` (the original's 5 and 27 of 32)."""
    if num_layers < 11:
        raise MtijaxError(f"the default R_V layers 5 and L - 5 need at least 11 layers; this model has {num_layers}: "
                          "choose the layers")
    return 5, num_layers - 5


def prompt_r_v(config: ModelConfig, params: Params, tokens: Sequence[int], *, window: int = WINDOW,
               layers: tuple[int, int] | None = None, centre: bool = False) -> float:
    """R_V of a prompt-only pass: ``attn_v`` at ``layers = (early, late)`` over its last ``window`` tokens."""
    early, late = default_rv_layers(config.num_layers) if layers is None else layers
    if len(tokens) < window:
        raise MtijaxError(f"R_V needs at least {window} prompt tokens (the window); the prompt has {len(tokens)}")
    run = capture(config, params, np.asarray([list(tokens)]), sites=("attn_v",), layers=(early, late),
                  keep=("last", window))
    values = np.asarray(run.activations["attn_v"], np.float64)  # [2, 1, W, K, H]
    order = sorted({early, late})
    return r_v(values[order.index(early), 0], values[order.index(late), 0], centre=centre)


def window_r_v(early: np.ndarray, late: np.ndarray, count: int, *, window: int = WINDOW,
               centre: bool = False) -> float:
    """R_V over the last ``window`` of the first ``count`` calls of a traced generation (``early``/``late``
    ``[N, ...]``); NaN when fewer than ``window`` calls happened."""
    if count < window:
        return float("nan")
    return r_v(early[count - window:count], late[count - window:count], centre=centre)


def next_token_kl(logits: jax.Array, champion_logits: jax.Array) -> np.ndarray:
    """KL(champion || patched) of the next-token distributions, in nats (``[..., V]`` float32 logits)."""
    return np.asarray(kl_divergence(logits, champion_logits))
