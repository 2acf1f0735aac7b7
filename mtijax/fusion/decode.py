"""Stability-aware generation with the fusion layers: the engine's decode loop with the layers grafted in
and a sampling policy with state.

The fusion layers enter the engine as grafts (:func:`grafts`): transforms on the residual stream after
the blocks ``fusion.positions``, whose carry (the Kuramoto running sums and the PRSC's previous token)
lives in the decode state. With the default causal Kuramoto coupling every fusion metric and every
logit of a decode step equals what a full forward over the whole sequence gives for that token
(tested), so the stability readings are exact, not approximations over a window. (With
``kuramoto_scope="sequence"`` each call is its own oscillator population; see ``mtijax.fusion.kuramoto``.)

At every call the readings of the token just fed (prime entropy ``S_t``, gate coherence ``C_t``, Kuramoto
order ``r_t``, averaged over the fused layers) update the Lyapunov estimate and the suggested temperature
(``mtijax.fusion.stability``); this is :class:`StabilityPolicy`. With ``auto_temperature`` the next token is
sampled at that temperature (starting from the requested one, or 0.8, the original's default, when greedy
was requested); with ``stop_on_instability`` a row whose estimate exceeds the threshold stops before
emitting that token. The switches and thresholds are data in the policy's state, so changing them does not
recompile. Other interventions (patches, step patches, a router hook) compose: pass them as
``interventions``. The whole trace comes back (:class:`StabilityTrace`) and can be plotted.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mtijax.config import ModelConfig
from mtijax.engine import loop
from mtijax.errors import MtijaxError
from mtijax.engine.interventions import Graft, Interventions
from mtijax.engine.sampling import Choice, Sampling, sample_rows
from mtijax.fusion.config import FusionConfig
from mtijax.fusion.layer import FusionLayer, LayerCarry
from mtijax.fusion.stability import StabilityConfig, StabilityState, token_readings, update
from mtijax.fusion.wrapper import Variables, check_variables
from mtijax.generate import start_run

DEFAULT_AUTO_START = 0.8
TRACE_FIELDS = ("entropy", "coherence", "kuramoto_order", "lyapunov", "temperature", "stable")


@dataclasses.dataclass(frozen=True)
class Decoding:
    """How tokens are chosen: ``sampling`` (temperature 0 is greedy), and the two stability switches."""

    sampling: Sampling = Sampling()
    auto_temperature: bool = False
    stop_on_instability: bool = False
    stability: StabilityConfig = StabilityConfig()

    @property
    def start_temperature(self) -> float:
        return self.sampling.temperature if self.sampling.temperature > 0 else DEFAULT_AUTO_START


class StabilityTrace(NamedTuple):
    """Per row and generated token ``[B, N]``: the readings that chose it (see ``StabilityStep``; ``temperature``
    is the one the token was sampled at, 0 for greedy) and ``active`` (the row was still generating)."""

    entropy: np.ndarray
    coherence: np.ndarray
    kuramoto_order: np.ndarray
    lyapunov: np.ndarray
    temperature: np.ndarray
    stable: np.ndarray
    active: np.ndarray

    def row(self, row: int) -> dict[str, list]:
        """Row ``row``'s active steps as JSON-able lists."""
        keep = self.active[row]
        return {name: np.asarray(getattr(self, name)[row][keep]).tolist() for name in TRACE_FIELDS}

    def plot(self, path: str, row: int = 0, title: str = "") -> None:
        """Write a PNG of row ``row``'s entropy, coherence, Kuramoto order, Lyapunov estimate and temperature."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        data = self.row(row)
        steps = np.arange(len(data["entropy"]))
        fig, axes = plt.subplots(3, 1, figsize=(8, 7), sharex=True)
        axes[0].plot(steps, data["entropy"], label="prime entropy S_t (bits)")
        axes[0].legend(loc="best")
        axes[1].plot(steps, data["coherence"], label="gate coherence C_t")
        axes[1].plot(steps, data["kuramoto_order"], label="Kuramoto order r_t")
        axes[1].legend(loc="best")
        axes[2].plot(steps, data["lyapunov"], label="Lyapunov estimate")
        axes[2].plot(steps, data["temperature"], label="temperature")
        unstable = [s for s, ok in zip(steps, data["stable"]) if not ok]
        if unstable:
            axes[2].scatter(unstable, [data["lyapunov"][s] for s in unstable], color="red", s=12, label="unstable")
        axes[2].legend(loc="best")
        axes[2].set_xlabel("generated token")
        fig.suptitle(title or "stability trace")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


class FusedGeneration(NamedTuple):
    """Generated tokens and the stability trace.

    Attributes:
      tokens: ``[B, N]`` int32, pad id after a row stopped. lengths: ``[B]`` tokens emitted (stop token included).
      stopped: ``[B]`` the row ended with a stop token. unstable: ``[B]`` the row was stopped by instability.
      trace: the readings of every step.
    """

    tokens: np.ndarray
    lengths: np.ndarray
    stopped: np.ndarray
    unstable: np.ndarray
    trace: StabilityTrace

    def ids(self, row: int, *, keep_stop: bool = False) -> list[int]:
        ids = self.tokens[row, : self.lengths[row]].tolist()
        return ids[:-1] if self.stopped[row] and not keep_stop else ids


@dataclasses.dataclass(frozen=True)
class FusionGraft:
    """One fusion layer as an engine graft: ``(variables, h, positions, carry) -> (h, carry, metrics)``."""

    fusion: FusionConfig

    def init_carry(self, batch: int) -> LayerCarry:
        return LayerCarry.empty(self.fusion, batch)

    def __call__(self, variables: Any, h: jax.Array, positions: jax.Array,
                 carry: LayerCarry) -> tuple[jax.Array, LayerCarry, dict[str, jax.Array]]:
        out, metrics, new_carry = FusionLayer(self.fusion).apply(variables, h, positions, carry)
        return out, new_carry, metrics


def grafts(fusion: FusionConfig, variables: Variables) -> dict[int, Graft]:
    """The fusion layers as engine grafts (``Interventions(grafts=...)``), one per fused layer."""
    layers, memories = variables["params"]["layers"], variables.get("memory", {}).get("layers", {})
    out = {}
    for position in fusion.positions:
        collections = {"params": layers[str(position)]}
        if str(position) in memories:
            collections["memory"] = memories[str(position)]
        out[position] = Graft(collections, FusionGraft(fusion))
    return out


class Controls(NamedTuple):
    """The traced part of :class:`Decoding` (so changing a switch or a threshold does not recompile)."""

    auto_temperature: jax.Array
    stop_on_instability: jax.Array
    temperature: jax.Array
    stability: dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class StabilityPolicy:
    """The engine policy of stability-aware decoding (see the module docstring).

    Only the sampler (greedy, or temperature 1 over logits divided by the chosen temperature, with top-k
    and top-p) is part of the compiled step; ``decoding`` is read by :meth:`start`, outside it.
    """

    sampler: Sampling
    decoding: Decoding = dataclasses.field(compare=False, default=Decoding())

    @classmethod
    def of(cls, decoding: Decoding) -> "StabilityPolicy":
        s = decoding.sampling
        greedy = s.temperature == 0 and not decoding.auto_temperature
        return cls(Sampling(0.0 if greedy else 1.0, s.top_k, s.top_p), decoding)

    def start(self, batch: int) -> tuple[StabilityState, Controls]:
        d = self.decoding
        fixed = d.sampling.temperature if d.sampling.temperature > 0 else 1.0
        controls = Controls(jnp.asarray(d.auto_temperature), jnp.asarray(d.stop_on_instability),
                            jnp.float32(d.start_temperature if d.auto_temperature else fixed),
                            {k: jnp.float32(v) for k, v in dataclasses.asdict(d.stability).items()})
        return StabilityState.start(batch, controls.temperature), controls

    def choose(self, state: tuple[StabilityState, Controls], logits: jax.Array, keys: jax.Array,
               metrics: Mapping[int, Mapping[str, jax.Array]], done: jax.Array,
               suppress: jax.Array | None) -> Choice:
        stability, controls = state
        new, reading = update(stability, *token_readings(metrics, logits.shape[0]),
                              StabilityConfig(**controls.stability))
        stability = jax.tree.map(lambda n, o: jnp.where(done, o, n), new, stability)
        if self.sampler.temperature == 0:
            temperature = jnp.zeros_like(reading.temperature)
            token = sample_rows(logits, keys, self.sampler, suppress)
        else:
            temperature = jnp.where(controls.auto_temperature, reading.temperature, controls.temperature)
            token = sample_rows(logits / temperature[:, None], keys, self.sampler, suppress)
        halt = controls.stop_on_instability & reading.diverging & ~done
        record = reading._replace(stable=reading.stable & ~done, temperature=temperature)._asdict()
        return Choice(token, ~done & ~halt, halt, (stability, controls), record)


class StepReport(NamedTuple):
    """One generation step, on the host: ``tokens [B]`` (pad for rows that stopped), ``emitted [B]``, ``done [B]``,
    ``unstable [B]`` (stopped by instability so far) and the readings (numpy ``[B]`` each) that chose the tokens."""

    tokens: np.ndarray
    emitted: np.ndarray
    done: np.ndarray
    unstable: np.ndarray
    reading: dict[str, np.ndarray]


def _with_fusion(config: ModelConfig, fusion: FusionConfig, variables: Variables,
                 interventions: Interventions | None) -> Interventions:
    """``interventions`` with the fusion layers added as grafts."""
    check_variables(fusion, config, variables)
    interventions = Interventions() if interventions is None else interventions
    overlap = sorted(set(interventions.grafts) & set(fusion.positions))
    if overlap:
        raise MtijaxError(f"layer {overlap[0]} already has a graft; a fusion layer cannot share it")
    interventions = interventions.replace(grafts={**interventions.grafts, **grafts(fusion, variables)})
    return interventions


def stream_fused(config: ModelConfig, params: Mapping[str, Any], fusion: FusionConfig, variables: Variables,
                 prompts: Sequence[Sequence[int]], max_new_tokens: int = 32, *, decoding: Decoding = Decoding(),
                 seed: int = 0, stop_ids: Sequence[int] | None = None, suppress_ids: Sequence[int] | None = None,
                 interventions: Interventions | None = None) -> Iterator[StepReport]:
    """Generate and yield every step as it is made (see :func:`generate_fused`); ends when all rows are done."""
    interventions = _with_fusion(config, fusion, variables, interventions)
    request, steps = start_run(config, params, prompts, max_new_tokens, policy=StabilityPolicy.of(decoding),
                               seed=seed, stop_ids=stop_ids, suppress_ids=suppress_ids, interventions=interventions)
    batch = request.batch
    unstable = np.zeros(batch, bool)
    for _, record in loop.stream(steps, request):
        halt = np.asarray(record.halt)[:batch]
        unstable = unstable | halt
        yield StepReport(np.asarray(record.token)[:batch], np.asarray(record.emit)[:batch],
                         np.asarray(record.done)[:batch], unstable.copy(),
                         {name: np.asarray(v)[:batch] for name, v in record.readings.items()})


def generate_fused(config: ModelConfig, params: Mapping[str, Any], fusion: FusionConfig, variables: Variables,
                   prompts: Sequence[Sequence[int]], max_new_tokens: int = 32, *, decoding: Decoding = Decoding(),
                   seed: int = 0, stop_ids: Sequence[int] | None = None, suppress_ids: Sequence[int] | None = None,
                   interventions: Interventions | None = None) -> FusedGeneration:
    """Generate up to ``max_new_tokens`` per prompt with the fusion layers, monitoring stability.

    Rows stop at a token of ``stop_ids`` (default: the config's EOS ids) or, with
    ``decoding.stop_on_instability``, when diverging. ``interventions`` (patches, step patches, a router hook,
    other grafts) compose with the fusion layers. Returns the tokens and the full trace.
    """
    interventions = _with_fusion(config, fusion, variables, interventions)
    request, steps = start_run(config, params, prompts, max_new_tokens, policy=StabilityPolicy.of(decoding),
                               seed=seed, stop_ids=stop_ids, suppress_ids=suppress_ids, interventions=interventions)
    run = loop.collect(steps, request, config.pad_token_id, check_every=1, lag=0)
    batch = request.batch
    trace = {name: np.zeros((batch, max_new_tokens), bool if name == "stable" else np.float32)
             for name in TRACE_FIELDS}
    active = np.zeros((batch, max_new_tokens), bool)
    previous_done = np.zeros(batch, bool)
    for index, record in enumerate(run.records):
        active[:, index] = ~previous_done
        for name in TRACE_FIELDS:
            trace[name][:, index] = record.readings[name]
        previous_done = record.done
    return FusedGeneration(run.tokens, run.lengths, run.stopped, run.halted, StabilityTrace(**trace, active=active))
