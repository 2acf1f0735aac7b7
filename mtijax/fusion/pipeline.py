"""Train fusion layers end to end: corpus, held-out perplexities before and after, checkpoints, loss curve.

Used by ``mtijax fuse train`` and ``experiments/train_fusion.py``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import numpy as np

from mtijax.config import ModelConfig
from mtijax.errors import MtijaxError
from mtijax.fusion import checkpoint
from mtijax.fusion.config import FusionConfig
from mtijax.fusion.data import python_topics, token_windows
from mtijax.fusion.training import (TrainConfig, TrainState, init_train_state, perplexity, plot_history, train,
                                 variables_of)
from mtijax.fusion.wrapper import init_fusion, param_count

PYTHON_TOPICS = "python-topics"
"""The default corpus: CPython's ``pydoc_data.topics`` (see ``mtijax.fusion.data``)."""
LOSS_CURVE = "loss_curve.png"


class Corpus(NamedTuple):
    """Token windows ``[n, seq_len]`` for training and held-out evaluation, and where the text came from."""

    train: np.ndarray
    held_out: np.ndarray
    source: str


def load_corpus(encode: Callable[[str], Sequence[int]], seq_len: int, bos_id: int | None, *,
                text_file: str | None = None, held_out_windows: int | None = None) -> Corpus:
    """Python's reference topics (default), or a UTF-8 ``text_file`` whose last tenth is held out."""
    if text_file is None:
        train_text, held_text = python_topics()
        source = "CPython pydoc_data.topics (the Python Language Reference topics that help() shows); every " \
                 "fifth topic by name held out"
    else:
        path = Path(text_file)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise MtijaxError(f"cannot read the training text {path}: {e}") from None
        cut = int(len(text) * 0.9)
        train_text, held_text = text[:cut], text[cut:]
        source = f"{path} (last tenth held out)"
    return Corpus(token_windows(train_text, encode, seq_len, bos_id),
                  token_windows(held_text, encode, seq_len, bos_id, limit=held_out_windows), source)


class FitReport(NamedTuple):
    """What :func:`fit` did: final state, per-step history, and the held-out perplexities (``base``,
    ``fused_before``, ``fused_after``) with the parameter count and timings."""

    state: TrainState
    history: list[dict[str, float]]
    evaluation: dict[str, Any]


def fit(config: ModelConfig, params: Mapping[str, Any], fusion: FusionConfig, train_config: TrainConfig,
        corpus: Corpus, out_dir: str | Path, *, resume: bool = False, model_name: str | None = None,
        save_every: int = 0, eval_every: int = 0, include_optimizer: bool = True, progress: bool = True,
        log: Callable[[str], None] = print) -> FitReport:
    """Train ``fusion`` on ``corpus`` over the frozen base model and save the checkpoint in ``out_dir``.

    With ``resume``, continue from the checkpoint in ``out_dir`` (same fusion and train configs); every
    ``save_every`` steps (0: only at the end) the checkpoint is rewritten, optimiser state included; every
    ``eval_every`` steps (0: never) the held-out perplexity is measured (``evaluation["held_out_curve"]``,
    ``[step, perplexity]`` pairs). Writes ``out_dir/loss_curve.png``.
    """
    out_dir = Path(out_dir)
    if resume:
        restored = checkpoint.restore(out_dir, config)
        if restored.fusion != fusion or restored.train != train_config:
            raise MtijaxError(f"the checkpoint in {out_dir} was made with other fusion or training settings; "
                              f"resume with the same ones")
        if restored.state.opt_state is None:
            raise MtijaxError(f"the checkpoint in {out_dir} has no optimiser state, so it cannot resume training")
        state, history = restored.state, restored.meta["history"]
        evaluation = dict(restored.meta.get("evaluation") or {})
        log(f"resuming at step {int(state.step)} of {train_config.steps}")
    else:
        state = init_train_state(init_fusion(fusion, config, jax.random.key(train_config.seed)), train_config)
        history = []
        evaluation = {"parameters": param_count(fusion, config.hidden_size), "corpus": corpus.source,
                      "train_windows": int(len(corpus.train)), "held_out_windows": int(len(corpus.held_out)),
                      "held_out_tokens": int(corpus.held_out.shape[0] * (corpus.held_out.shape[1] - 1))}
        log(f"{evaluation['parameters']:,} fusion parameters at layers {list(fusion.positions)}; "
            f"{len(corpus.train)} training windows of {train_config.seq_len} tokens")
        evaluation["perplexity_base"] = perplexity(config, params, corpus.held_out)
        evaluation["perplexity_fused_before"] = perplexity(config, params, corpus.held_out, fusion=fusion,
                                                           variables=variables_of(state))
        log(f"held-out perplexity: base {evaluation['perplexity_base']:.3f}, "
            f"fused before training {evaluation['perplexity_fused_before']:.3f}")
        evaluation["held_out_curve"] = [[0, evaluation["perplexity_fused_before"]]]
    tick = time.perf_counter()
    while int(state.step) < train_config.steps:
        step = int(state.step)
        until = min([train_config.steps] + [(step // every + 1) * every for every in (save_every, eval_every) if every])
        state, history = train(config, params, fusion, state, corpus.train, train_config, until=until,
                               history=history, progress=progress)
        if eval_every and until % eval_every == 0 and until < train_config.steps:
            evaluation["held_out_curve"].append([until, perplexity(config, params, corpus.held_out, fusion=fusion,
                                                                   variables=variables_of(state))])
        if save_every and until % save_every == 0 and until < train_config.steps:
            checkpoint.save(out_dir, state, fusion, config, train=train_config, history=history, model=model_name,
                            extra={"evaluation": evaluation})
    evaluation["train_seconds"] = evaluation.get("train_seconds", 0.0) + time.perf_counter() - tick
    evaluation["perplexity_fused_after"] = perplexity(config, params, corpus.held_out, fusion=fusion,
                                                      variables=variables_of(state))
    evaluation.setdefault("held_out_curve", []).append([train_config.steps, evaluation["perplexity_fused_after"]])
    log(f"held-out perplexity after {train_config.steps} steps: {evaluation['perplexity_fused_after']:.3f}")
    checkpoint.save(out_dir, state, fusion, config, train=train_config, history=history, model=model_name,
                    include_optimizer=include_optimizer, extra={"evaluation": evaluation})
    plot_history(history, str(out_dir / LOSS_CURVE), evaluation["held_out_curve"], evaluation["perplexity_base"])
    return FitReport(state, history, evaluation)
