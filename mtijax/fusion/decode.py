"""Stability-aware generation with the KV cache: a jitted prefill, then one jitted, cache-donating step per token.

Each call feeds the model the new tokens, the KV cache, and the fusion layers' carry (``LayerCarry``):
the Kuramoto running sums and the PRSC's previous token. With the default causal Kuramoto coupling every
fusion metric and every logit of a decode step equals what a full forward over the whole sequence gives
for that token (tested), so the stability readings are exact, not approximations over a window. (With
``kuramoto_scope="sequence"`` each call is its own oscillator population; see ``mtijax.fusion.kuramoto``.)

At every step the readings of the token just fed (prime entropy ``S_t``, gate coherence ``C_t``, Kuramoto
order ``r_t``, averaged over the fused layers) update the Lyapunov estimate and the suggested temperature
(``mtijax.fusion.stability``). With ``auto_temperature`` the next token is sampled at that temperature
(starting from the requested one, or 0.8, the original's default, when greedy was requested); with
``stop_on_instability`` a row whose estimate exceeds the threshold stops before emitting that token.
Prompts are left-padded to a multiple of 16 and the cache sized to hold them and every new token, so
nearby lengths share one compile. The whole trace comes back (:class:`StabilityTrace`) and can be plotted.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mtijax.config import ModelConfig
from mtijax.fusion.config import FusionConfig
from mtijax.fusion.stability import StabilityConfig, StabilityState, StabilityStep, token_readings, update
from mtijax.fusion.wrapper import Carry, Variables, check_variables, fused_hidden
from mtijax.generate import Sampling, prepare, sample
from mtijax.models.cache import KVCache, init_cache
from mtijax.models.decoder import unembed

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


class DecodeState(NamedTuple):
    """Everything a decode step reads and writes (donated to each step)."""

    cache: KVCache
    carry: Carry
    token: jax.Array
    done: jax.Array
    unstable: jax.Array
    out: jax.Array
    count: jax.Array
    step: jax.Array
    key: jax.Array
    stability: StabilityState


class Controls(NamedTuple):
    """The traced part of :class:`Decoding` (so changing a switch or a threshold does not recompile)."""

    auto_temperature: jax.Array
    stop_on_instability: jax.Array
    temperature: jax.Array
    stability: dict[str, jax.Array]


def _split(decoding: Decoding) -> tuple[Sampling, Controls]:
    """``(static sampler, traced controls)``: the sampler is greedy only when greedy was asked for without
    auto-temperature; otherwise logits are divided by the temperature and sampled at temperature 1."""
    s = decoding.sampling
    greedy = s.temperature == 0 and not decoding.auto_temperature
    sampler = Sampling(0.0 if greedy else 1.0, s.top_k, s.top_p)
    fixed = s.temperature if s.temperature > 0 else 1.0
    controls = Controls(jnp.asarray(decoding.auto_temperature), jnp.asarray(decoding.stop_on_instability),
                        jnp.float32(decoding.start_temperature if decoding.auto_temperature else fixed),
                        {k: jnp.float32(v) for k, v in dataclasses.asdict(decoding.stability).items()})
    return sampler, controls


def _advance(config: ModelConfig, sampler: Sampling, controls: Controls, fields: dict[str, Any], logits, metrics,
             stops) -> tuple[dict[str, Any], StabilityStep]:
    """Read the fed token's metrics, update stability, choose and record the next token (rows not done)."""
    done, stability = fields["done"], fields["stability"]
    new_stability, reading = update(stability, *token_readings(metrics, logits.shape[0]),
                                         StabilityConfig(**controls.stability))
    stability = jax.tree.map(lambda new, old: jnp.where(done, old, new), new_stability, stability)
    key, sub = jax.random.split(fields["key"])
    if sampler.temperature == 0:
        temperature = jnp.zeros_like(reading.temperature)
        token = sample(logits, sub, sampler)
    else:
        temperature = jnp.where(controls.auto_temperature, reading.temperature, controls.temperature)
        token = sample(logits / temperature[:, None], sub, sampler)
    halt = controls.stop_on_instability & reading.diverging & ~done
    emit = ~done & ~halt
    token = jnp.where(emit, token, config.pad_token_id)
    step = fields["step"]
    return dict(token=token, done=done | halt | (emit & jnp.isin(token, stops)), unstable=fields["unstable"] | halt,
                out=fields["out"].at[:, step].set(token), count=fields["count"] + emit.astype(jnp.int32),
                key=key, stability=stability), reading._replace(stable=reading.stable & ~done, temperature=temperature)


def _prefill(config: ModelConfig, params, fusion: FusionConfig, variables: Variables, tokens, positions, stops, key,
             controls: Controls, sampler: Sampling, max_new_tokens: int,
             cache_length: int) -> tuple[DecodeState, StabilityStep]:
    batch = tokens.shape[0]
    cache = init_cache(config.num_layers, batch, cache_length, config.num_kv_heads, config.head_dim,
                       params["embed"].dtype)
    out = fused_hidden(config, params, fusion, variables, tokens, positions, cache=cache, write_index=0)
    logits = unembed(config, params, out.logits[:, -1])
    fields = dict(done=jnp.zeros((batch,), bool), unstable=jnp.zeros((batch,), bool),
                  out=jnp.full((batch, max_new_tokens), config.pad_token_id, jnp.int32),
                  count=jnp.zeros((batch,), jnp.int32), step=jnp.int32(0), key=key,
                  stability=StabilityState.start(batch, controls.temperature))
    fields, reading = _advance(config, sampler, controls, fields, logits, out.metrics, stops)
    return DecodeState(out.cache, out.carry, step=jnp.int32(0), **fields), reading


def _step(config: ModelConfig, params, fusion: FusionConfig, variables: Variables, state: DecodeState, lengths,
          width, stops, controls: Controls, sampler: Sampling) -> tuple[DecodeState, StabilityStep]:
    out = fused_hidden(config, params, fusion, variables, state.token[:, None], (lengths + state.step)[:, None],
                       cache=state.cache, write_index=width + state.step, carry=state.carry)
    logits = unembed(config, params, out.logits[:, -1])
    step = state.step + 1
    fields, reading = _advance(config, sampler, controls, dict(state._asdict(), step=step), logits, out.metrics,
                               stops)
    return DecodeState(out.cache, out.carry, step=step, **fields), reading


_prefill_jit = jax.jit(_prefill, static_argnames=("config", "fusion", "sampler", "max_new_tokens", "cache_length"))
_step_jit = jax.jit(_step, static_argnames=("config", "fusion", "sampler"), donate_argnames=("state",))


class StepReport(NamedTuple):
    """One generation step, on the host: ``tokens [B]`` (pad for rows that stopped), ``emitted [B]``, ``done [B]``,
    ``unstable [B]`` (stopped by instability so far) and the readings (numpy ``[B]`` each) that chose the tokens."""

    tokens: np.ndarray
    emitted: np.ndarray
    done: np.ndarray
    unstable: np.ndarray
    reading: dict[str, np.ndarray]


def stream_fused(config: ModelConfig, params: Mapping[str, Any], fusion: FusionConfig, variables: Variables,
                 prompts: Sequence[Sequence[int]], max_new_tokens: int = 32, *, decoding: Decoding = Decoding(),
                 seed: int = 0, stop_ids: Sequence[int] | None = None) -> Iterator[StepReport]:
    """Generate and yield every step as it is made (see :func:`generate_fused`); ends when all rows are done."""
    check_variables(fusion, config, variables)
    tokens, positions, lengths, cache_length, stops = prepare(config, prompts, max_new_tokens, stop_ids)
    stops = jnp.asarray(stops)
    sampler, controls = _split(decoding)
    state, reading = _prefill_jit(config, params, fusion, variables, tokens, positions, stops, jax.random.key(seed),
                                  controls, sampler, max_new_tokens, cache_length)
    lengths, width = jnp.asarray(lengths), jnp.int32(tokens.shape[1])
    count = np.zeros(len(prompts), np.int32)
    for index in range(max_new_tokens):
        if index:
            state, reading = _step_jit(config, params, fusion, variables, state, lengths, width, stops, controls,
                                       sampler)
        new_count = np.asarray(state.count)
        done = np.asarray(state.done)
        yield StepReport(np.asarray(state.token), new_count > count, done, np.asarray(state.unstable),
                         {name: np.asarray(value) for name, value in reading._asdict().items()})
        count = new_count
        if done.all():
            return


def generate_fused(config: ModelConfig, params: Mapping[str, Any], fusion: FusionConfig, variables: Variables,
                   prompts: Sequence[Sequence[int]], max_new_tokens: int = 32, *, decoding: Decoding = Decoding(),
                   seed: int = 0, stop_ids: Sequence[int] | None = None) -> FusedGeneration:
    """Generate up to ``max_new_tokens`` per prompt with the fusion layers, monitoring stability.

    Rows stop at a token of ``stop_ids`` (default: the config's EOS ids) or, with
    ``decoding.stop_on_instability``, when diverging. Returns the tokens and the full trace.
    """
    steps = list(stream_fused(config, params, fusion, variables, prompts, max_new_tokens, decoding=decoding,
                              seed=seed, stop_ids=stop_ids))
    batch = len(prompts)
    tokens = np.full((batch, max_new_tokens), config.pad_token_id, np.int32)
    trace = {name: np.zeros((batch, max_new_tokens), bool if name == "stable" else np.float32)
             for name in TRACE_FIELDS}
    active = np.zeros((batch, max_new_tokens), bool)
    previous_done = np.zeros(batch, bool)
    for index, report in enumerate(steps):
        tokens[:, index] = report.tokens
        active[:, index] = ~previous_done
        for name in TRACE_FIELDS:
            trace[name][:, index] = report.reading[name]
        previous_done = report.done
    last = steps[-1]
    lengths = np.sum(np.stack([s.emitted for s in steps]), axis=0).astype(np.int32)
    stops = set(config.eos_token_ids if stop_ids is None else stop_ids)
    stopped = np.array([lengths[r] > 0 and int(tokens[r, lengths[r] - 1]) in stops for r in range(batch)])
    return FusedGeneration(tokens, lengths, stopped, last.unstable, StabilityTrace(**trace, active=active))
