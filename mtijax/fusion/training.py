"""Training the fusion params with optax while the base model stays frozen.

The loss is the next-token cross-entropy plus the original's regularisers, here computed from traced
metrics so that they are differentiated (the original turned them into Python floats, so they trained
nothing)::

    loss = CE + 0.1 (1 - C) + 0.05 (H - 2)^2 + 0.05 (r - 0.7)^2 + 0.01 mean_layers sigmoid(alpha)^2

with ``C`` the gate coherence, ``H`` the prime entropy and ``r`` the Kuramoto order, each averaged over
tokens and fused layers (a term is left out when its component is switched off). ``jax.value_and_grad``
is taken with respect to the fusion params only; the base params are an ordinary (non-donated) argument
of the jitted step, read and never updated. The optimiser is gradient clipping (global norm 1) then AdamW
with a linear warmup and a cosine decay to 0. The SMF banks, when present, are written once per step.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtijax.config import ModelConfig
from mtijax.errors import MtijaxError
from mtijax.fusion.config import FusionConfig
from mtijax.fusion.data import batch_at
from mtijax.fusion.wrapper import Variables, check_variables, fused_forward, summarize
from mtijax.models.decoder import forward


def default_warmup(steps: int) -> int:
    """The warmup a run of ``steps`` steps gets unless told otherwise: a tenth of the run, at most 10 steps
    (10 for the default 100 steps, 0 for a run of 1 to 9 steps)."""
    return min(10, steps // 10)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation and loss settings (the loss weights are the original's).

    ``warmup_steps=None`` (the default) becomes :func:`default_warmup` of ``steps``, so a short run
    needs no warmup flag.
    """

    steps: int = 100
    batch_size: int = 2
    seq_len: int = 128
    learning_rate: float = 1e-3
    warmup_steps: int | None = None
    weight_decay: float = 0.01
    clip_norm: float = 1.0
    seed: int = 0
    coherence_weight: float = 0.1
    entropy_weight: float = 0.05
    entropy_target: float = 2.0
    kuramoto_weight: float = 0.05
    kuramoto_target: float = 0.7
    alpha_weight: float = 0.01

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len"):
            if getattr(self, name) < 1:
                raise MtijaxError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps is None:
            object.__setattr__(self, "warmup_steps", default_warmup(self.steps))
        if not 0 <= self.warmup_steps < self.steps:
            raise MtijaxError(f"warmup steps must be in [0, steps), got {self.warmup_steps} of {self.steps}")
        if not self.learning_rate > 0:
            raise MtijaxError(f"learning rate must be > 0, got {self.learning_rate}")

    def schedule(self) -> optax.Schedule:
        """Linear warmup from 0 to ``learning_rate``, then cosine decay to 0 at ``steps``."""
        return optax.warmup_cosine_decay_schedule(0.0, self.learning_rate, self.warmup_steps, self.steps, 0.0)

    def optimizer(self) -> optax.GradientTransformation:
        return optax.chain(optax.clip_by_global_norm(self.clip_norm),
                           optax.adamw(self.schedule(), weight_decay=self.weight_decay))

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "TrainConfig":
        return cls(**data)


class TrainState(NamedTuple):
    """Everything training changes: fusion ``params``, optax ``opt_state``, SMF ``memory`` and the ``step``."""

    params: Any
    opt_state: Any
    memory: Any
    step: jax.Array


def init_train_state(variables: Variables, train: TrainConfig) -> TrainState:
    """The state before the first step."""
    return TrainState(variables["params"], train.optimizer().init(variables["params"]), variables.get("memory", {}),
                      jnp.int32(0))


def variables_of(state: TrainState) -> Variables:
    """The fusion variables held by a train state."""
    return {"params": state.params, "memory": state.memory}


def next_token_loss(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """Mean cross-entropy of ``logits [B, S, V]`` predicting ``tokens[:, 1:]``."""
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]))


def loss_terms(params: Any, memory: Any, config: ModelConfig, base_params: Mapping[str, Any], fusion: FusionConfig,
               train: TrainConfig, tokens: jax.Array, store_memory: bool = True) -> tuple[jax.Array, dict[str, Any]]:
    """The training loss of ``tokens [B, S]`` and ``(terms, metrics, new memory)``; differentiable in ``params``."""
    out = fused_forward(config, base_params, fusion, {"params": params, "memory": memory}, tokens,
                        store_memory=store_memory)
    summary = summarize(out.metrics, jnp.ones(tokens.shape, bool))
    terms = {"cross_entropy": next_token_loss(out.logits, tokens)}
    if "gate_coherence" in summary:
        terms["coherence"] = train.coherence_weight * (1 - summary["gate_coherence"])
    if "prime_entropy" in summary:
        terms["entropy"] = train.entropy_weight * (summary["prime_entropy"] - train.entropy_target) ** 2
    if "kuramoto_order" in summary:
        terms["kuramoto"] = train.kuramoto_weight * (summary["kuramoto_order"] - train.kuramoto_target) ** 2
    blends = [m["fusion_alpha"] for m in out.metrics.values() if "fusion_alpha" in m]
    if blends:
        terms["alpha"] = train.alpha_weight * jnp.mean(jnp.stack(blends) ** 2)
    loss = sum(terms.values())
    return loss, {"terms": terms, "metrics": summary, "memory": out.memory}


def _train_step(config: ModelConfig, fusion: FusionConfig, train: TrainConfig, state: TrainState,
                base_params: Mapping[str, Any], tokens: jax.Array) -> tuple[TrainState, dict[str, Any]]:
    (loss, aux), grads = jax.value_and_grad(loss_terms, has_aux=True)(
        state.params, state.memory, config, base_params, fusion, train, tokens)
    updates, opt_state = train.optimizer().update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    logs = {"loss": loss, **aux["terms"], **aux["metrics"], "grad_norm": optax.tree.norm(grads),
            "learning_rate": train.schedule()(state.step)}
    return TrainState(params, opt_state, aux["memory"], state.step + 1), logs


train_step = jax.jit(_train_step, static_argnames=("config", "fusion", "train"))
"""One optimisation step: ``train_step(config, fusion, train, state, base_params, tokens) -> (state, logs)``."""


def _eval_loss(config: ModelConfig, base_params, fusion: FusionConfig | None, variables: Variables | None,
               tokens: jax.Array) -> jax.Array:
    if fusion is None:
        logits = forward(config, base_params, tokens).logits
    else:
        logits = fused_forward(config, base_params, fusion, variables, tokens).logits
    return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]))


_eval_loss_jit = jax.jit(_eval_loss, static_argnames=("config", "fusion"))


def perplexity(config: ModelConfig, base_params: Mapping[str, Any], windows: np.ndarray, *,
               fusion: FusionConfig | None = None, variables: Variables | None = None, batch_size: int = 4) -> float:
    """``exp`` of the mean next-token cross-entropy over every window (base model when ``fusion`` is None)."""
    total, count = 0.0, 0
    for start_row in range(0, len(windows), batch_size):
        batch = jnp.asarray(windows[start_row:start_row + batch_size])
        total += float(_eval_loss_jit(config, base_params, fusion, variables, batch))
        count += batch.shape[0] * (batch.shape[1] - 1)
    return float(np.exp(total / count))


class TrainResult(NamedTuple):
    """The final state and one log entry per step (plain floats)."""

    state: TrainState
    history: list[dict[str, float]]


def train(config: ModelConfig, base_params: Mapping[str, Any], fusion: FusionConfig, state: TrainState,
          windows: np.ndarray, train_config: TrainConfig, *, until: int | None = None,
          history: list[dict[str, float]] | None = None, progress: bool = True) -> TrainResult:
    """Run steps ``state.step .. until - 1`` (default: to ``train_config.steps``) on batches of ``windows``.

    Resuming is passing a restored state (and its history): step ``k``'s batch depends only on the seed and
    ``k``, so the result equals an uninterrupted run's.
    """
    from tqdm.auto import tqdm

    check_variables(fusion, config, variables_of(state))
    if windows.ndim != 2 or windows.shape[1] != train_config.seq_len:
        raise MtijaxError(f"training windows must be [n, {train_config.seq_len}], got {list(windows.shape)}")
    until = train_config.steps if until is None else until
    history = list(history or [])
    first = int(state.step)
    bar = tqdm(range(first, until), desc="training fusion layers", disable=not progress, unit="step", initial=first,
               total=train_config.steps)
    for step in bar:
        tokens = jnp.asarray(batch_at(windows, step, train_config.batch_size, train_config.seed))
        tick = time.perf_counter()
        state, logs = train_step(config, fusion, train_config, state, base_params, tokens)
        logs = {k: float(v) for k, v in logs.items()}
        entry = {"step": step + 1, **logs, "seconds": time.perf_counter() - tick}
        history.append(entry)
        bar.set_postfix(loss=f"{entry['loss']:.3f}", ce=f"{entry['cross_entropy']:.3f}")
    return TrainResult(state, history)


def plot_history(history: list[dict[str, float]], path: str, held_out: Sequence[Sequence[float]] = (),
                 base_perplexity: float | None = None, smoothing: int = 10) -> None:
    """Write a PNG of three panels: training loss and cross-entropy per step (with a running mean over
    ``smoothing`` steps); held-out perplexity of the fused model (``[step, perplexity]`` pairs) against the base
    model's; the weighted regulariser terms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.asarray([h["step"] for h in history])
    running = lambda v: np.convolve(v, np.ones(smoothing) / smoothing, mode="valid") if len(v) >= smoothing else v
    fig, (top, middle, bottom) = plt.subplots(3, 1, figsize=(8, 9), sharex=True,
                                              gridspec_kw={"height_ratios": [2, 1.3, 1]})
    for key, label, color in (("loss", "loss", "tab:blue"), ("cross_entropy", "cross-entropy", "tab:orange")):
        values = np.asarray([h[key] for h in history])
        top.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
        top.plot(steps[len(steps) - len(running(values)):], running(values), color=color,
                 label=f"training {label} ({smoothing}-step mean)")
    top.set_ylabel("nats / token")
    top.legend(loc="best", fontsize=8)
    if held_out:
        points = np.asarray(held_out, np.float64)
        middle.plot(points[:, 0], points[:, 1], "o-", color="tab:green", label="fused")
    if base_perplexity is not None:
        middle.axhline(base_perplexity, color="black", linestyle="--", linewidth=1, label="base model")
    middle.set_ylabel("held-out perplexity")
    middle.legend(loc="best", fontsize=8)
    for name in ("coherence", "entropy", "kuramoto", "alpha"):
        if name in history[0]:
            bottom.plot(steps, [h[name] for h in history], label=f"{name} term")
    bottom.set_ylabel("regulariser (weighted)")
    bottom.set_xlabel("step")
    bottom.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
