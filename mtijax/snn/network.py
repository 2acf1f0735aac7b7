"""A layer of spiking units driven through a synaptic matrix, simulated as one jitted ``lax.scan`` over ticks.

A :class:`Network` is a pytree: the synapses ``W [width, units]`` (float32)
and a unit model (``mtijax.snn.units``). A driver is a sequence of *frames*
``[S, width]`` (one mean-pooled embedding, or one captured activation per
token); frame ``s`` is presented during ticks ``[s * ticks / S, (s + 1) *
ticks / S)``, so a constant input is a single frame held for every tick. The
input current of a tick is ``frame @ W``, i.e. ``I_i = sum_j W_ji e_j``. With
a model's matrix stored ``[in, out]`` (as every mtijax params tree is) this is
the seed's ``sum_j W_ij e_j`` over PyTorch's ``[out, in]`` weight. Currents
are computed once per frame (float32, full precision), and the tick loop is
elementwise over units.

Every unit starts at rest for each input; nothing is carried from one call to
the next. :func:`simulate_batch` is :func:`simulate` under ``jax.vmap`` over
a batch of inputs.

Both are JAX transforms of their arguments: they run under ``jax.jit``,
``jax.vmap`` (over frames, synapses or unit constants) and ``jax.grad``
(with respect to frames, synapses and unit constants), since the checks at
the boundary read only shapes and dtypes, never values. Gradients flow
through the membranes; the spikes themselves have gradient 0 unless a
surrogate is chosen (``mtijax.snn.surrogate``).

Everything is float32. Frames and synapses of any other dtype are refused
(:class:`~mtijax.errors.MtijaxError`) rather than cast: the seed's
"blackhole" collapse came from a kernel reading float16 data as float32, so
a cast must be the caller's explicit decision.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from mtijax.errors import MtijaxError
from mtijax.snn.surrogate import Surrogate, make_surrogate
from mtijax.snn.units import GIF, UnitModel, UnitState, initial_state

RASTER_CELLS = 2**22
"""The automatic raster bin keeps ``(ticks / bin) * units`` under this many cells (16 MiB of counts)."""


@struct.dataclass
class Network:
    """Spiking units behind a synaptic matrix.

    Attributes:
      synapses: ``[width, units]`` float32; a frame ``e [width]`` drives the units with ``e @ synapses``.
      units: the unit model and its constants (default: the seed's :class:`~mtijax.snn.units.GIF`).
    """

    synapses: jax.Array
    units: UnitModel = GIF()

    @property
    def width(self) -> int:
        """Width of the frames this network reads."""
        return self.synapses.shape[0]

    @property
    def num_units(self) -> int:
        """Number of units."""
        return self.synapses.shape[1]


@struct.dataclass
class Routing:
    """What a simulation records (leading batch axis ``B`` for :func:`simulate_batch`).

    Attributes:
      best_unit: ``[ticks]`` int32, argmax of the units' scores after each tick (ties to the lower index).
      population_rate: ``[ticks]`` float32, fraction of units that spiked in the tick.
      mean_dvdt: ``[ticks]`` float32, mean over units of ``v(t) - v(t - 1)`` (per tick).
      adaptation: ``[ticks]`` float32, mean adaptation over units after the tick (the GIF's fatigue).
      mean_potential: ``[ticks]`` float32, mean over units of the membrane clipped to ``[0, 1]`` after the
        tick (the "potentials" corinth-canal's telemetry averages; see ``mtijax.snn.export``).
      raster: ``[ticks / raster_bin, units]`` spike counts per bin of ``raster_bin`` ticks
        (uint8 when a bin holds fewer than 256 ticks, else int32); ``raster_bin = 1`` is the full raster.
      spike_counts: ``[units]`` int32, spikes of each unit over the whole run.
      final: the units' :class:`UnitState` after the last tick.
      raster_bin: ticks per raster row (static).
    """

    best_unit: jax.Array
    population_rate: jax.Array
    mean_dvdt: jax.Array
    adaptation: jax.Array
    mean_potential: jax.Array
    raster: jax.Array
    spike_counts: jax.Array
    final: UnitState
    raster_bin: int = struct.field(pytree_node=False, default=1)

    @property
    def ticks(self) -> int:
        """Number of simulated ticks."""
        return self.best_unit.shape[-1]

    @property
    def rates(self) -> jax.Array:
        """Firing rate of each unit, spikes per tick ``[units]``."""
        return self.spike_counts / self.ticks


def check_float32(name: str, x) -> None:
    """Refuse anything but float32 (see the module docstring); reads only the dtype, so tracers pass through."""
    dtype = np.dtype(x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype)
    if dtype != np.float32:
        raise MtijaxError(f"{name}: dtype {dtype}, not float32; cast explicitly (x.astype(jnp.float32)) if that is "
                          "what you mean: the spiking network computes in float32 only")


def auto_raster_bin(ticks: int, units: int) -> int:
    """The smallest divisor of ``ticks`` that keeps the raster under :data:`RASTER_CELLS` cells."""
    need = math.ceil(ticks * units / RASTER_CELLS)
    return next(b for b in range(max(need, 1), ticks + 1) if ticks % b == 0)


def even_schedule(num_frames: jax.Array | int, ticks: int) -> jax.Array:
    """Frame shown at each tick ``[ticks]`` int32: ``S`` frames in order, each for ``ticks / S`` ticks (±1)."""
    t = jnp.arange(ticks, dtype=jnp.int32)
    return (t * jnp.asarray(num_frames, jnp.int32)) // ticks


def _validate(network: Network, frames, ticks: int, raster_bin: int | None, batched: bool) -> int:
    if not isinstance(ticks, (int, np.integer)) or isinstance(ticks, bool) or ticks <= 0:
        raise MtijaxError(f"ticks must be a positive integer, got {ticks!r}")
    check_float32("the synapses", network.synapses)
    check_float32("the driver's frames", frames)
    want = 3 if batched else 2
    if np.ndim(frames) != want:
        shape = "[B, S, width]" if batched else "[S, width] (one frame per token; [1, width] for a constant input)"
        raise MtijaxError(f"frames must be {shape}, got shape {tuple(np.shape(frames))}")
    if np.ndim(network.synapses) != 2:
        raise MtijaxError(f"synapses must be [width, units], got shape {tuple(np.shape(network.synapses))}")
    if np.shape(frames)[-1] != network.width:
        raise MtijaxError(f"the driver is {np.shape(frames)[-1]} wide but the synapses read {network.width} inputs")
    if np.shape(frames)[-2] == 0:
        raise MtijaxError("the driver has no frames")
    if raster_bin is None:
        return auto_raster_bin(ticks, network.num_units)
    if not isinstance(raster_bin, (int, np.integer)) or raster_bin <= 0 or ticks % raster_bin:
        raise MtijaxError(f"raster_bin must be a positive divisor of ticks={ticks}, got {raster_bin!r}")
    return int(raster_bin)


def _run(network: Network, frames: jax.Array, num_frames: jax.Array, ticks: int, raster_bin: int,
         unroll: int, surrogate: Surrogate | None) -> Routing:
    """The simulation of one input (vmapped by :func:`simulate_batch`)."""
    currents = jnp.matmul(frames, network.synapses, precision=jax.lax.Precision.HIGHEST)
    count_dtype = jnp.uint8 if raster_bin < 256 else jnp.int32

    def tick(state: UnitState, frame: jax.Array):
        new, out = network.units.step(state, currents[frame], surrogate)
        telemetry = (jnp.argmax(out.score).astype(jnp.int32), jnp.mean(out.spikes),
                     jnp.mean(new.v - state.v), jnp.mean(new.a), jnp.mean(jnp.clip(new.v, 0.0, 1.0)))
        return new, (telemetry, out.spikes != 0)

    def raster_row(state: UnitState, frames_of_bin: jax.Array):
        state, (telemetry, spikes) = jax.lax.scan(tick, state, frames_of_bin, unroll=unroll)
        return state, (telemetry, jnp.sum(spikes, axis=0, dtype=count_dtype))

    schedule = even_schedule(num_frames, ticks).reshape(ticks // raster_bin, raster_bin)
    final, (telemetry, raster) = jax.lax.scan(raster_row, initial_state(network.num_units), schedule)
    best, rate, dvdt, adaptation, potential = (x.reshape(ticks) for x in telemetry)
    counts = jnp.sum(raster, axis=0, dtype=jnp.int32)
    return Routing(best, rate, dvdt, adaptation, potential, raster, counts, final, raster_bin)


STATIC = ("ticks", "raster_bin", "unroll", "surrogate")


@functools.partial(jax.jit, static_argnames=STATIC)
def _simulate(network, frames, num_frames, ticks, raster_bin, unroll, surrogate):
    return _run(network, frames, num_frames, ticks, raster_bin, unroll, surrogate)


@functools.partial(jax.jit, static_argnames=STATIC)
def _simulate_batch(network, frames, num_frames, ticks, raster_bin, unroll, surrogate):
    run = functools.partial(_run, ticks=ticks, raster_bin=raster_bin, unroll=unroll, surrogate=surrogate)
    return jax.vmap(run, in_axes=(None, 0, 0))(network, frames, num_frames)


def simulate(network: Network, frames: jax.Array, ticks: int, *, raster_bin: int | None = None,
             unroll: int = 1, surrogate: str | None = None, slope: float | None = None) -> Routing:
    """Run ``network`` for ``ticks`` ticks on one driver, from rest.

    Args:
      frames: ``[S, width]`` float32; frame ``s`` is presented for the ``s``-th ``1/S`` of the ticks.
      ticks: number of ticks (> 0).
      raster_bin: ticks per raster row; must divide ``ticks``. Default: 1 while the full raster has at most
        :data:`RASTER_CELLS` cells, else the smallest divisor of ``ticks`` that stays under it.
      unroll: ``lax.scan`` unroll of the tick loop (speed only; results are identical).
      surrogate: ``None``, ``"fast_sigmoid"`` or ``"arctan"``: the spikes' gradient under ``jax.grad``
        (``mtijax.snn.surrogate``). The values are the same bit for bit whichever is chosen.
      slope: the surrogate's slope (default: its own).
    """
    raster_bin = _validate(network, frames, ticks, raster_bin, batched=False)
    return _simulate(network, jnp.asarray(frames), jnp.int32(np.shape(frames)[0]), ticks, raster_bin, unroll,
                     make_surrogate(surrogate, slope))


def simulate_batch(network: Network, frames: jax.Array, ticks: int, num_frames=None, *,
                   raster_bin: int | None = None, unroll: int = 1, surrogate: str | None = None,
                   slope: float | None = None) -> Routing:
    """:func:`simulate` over a batch of drivers at once (``jax.vmap``); every field gains a leading ``[B]``.

    Args:
      frames: ``[B, S, width]`` float32, drivers padded to a common ``S`` (see :func:`stack_frames`).
      num_frames: ``[B]`` real frames per driver (the rest is padding, never shown); default all ``S``.
      raster_bin, unroll, surrogate, slope: as for :func:`simulate`.
    """
    raster_bin = _validate(network, frames, ticks, raster_bin, batched=True)
    b, s = np.shape(frames)[:2]
    num_frames = np.full((b,), s, np.int32) if num_frames is None else _check_counts(num_frames, b, s)
    return _simulate_batch(network, jnp.asarray(frames), jnp.asarray(num_frames, jnp.int32), ticks, raster_bin,
                           unroll, make_surrogate(surrogate, slope))


def _check_counts(num_frames, batch: int, frames: int):
    """``num_frames`` must be ``[batch]`` counts in ``1..frames``; traced counts are checked by shape only."""
    if np.shape(num_frames) != (batch,):
        raise MtijaxError(f"num_frames must be [{batch}] counts in 1..{frames}, got shape {np.shape(num_frames)}")
    try:
        counts = np.asarray(num_frames)
    except jax.errors.TracerArrayConversionError:
        return num_frames
    if counts.min() < 1 or counts.max() > frames:
        raise MtijaxError(f"num_frames must be [{batch}] counts in 1..{frames}, got {counts.tolist()}")
    return counts


def stack_frames(drivers: list) -> tuple[jax.Array, np.ndarray]:
    """Pad drivers ``[S_i, width]`` with zero frames to ``[B, max S_i, width]``; returns it and ``[B]`` counts."""
    if not drivers:
        raise MtijaxError("no drivers to stack")
    for i, frames in enumerate(drivers):
        check_float32(f"driver {i}", frames)
    widths = {np.shape(f)[-1] for f in drivers}
    if len(widths) != 1 or any(np.ndim(f) != 2 for f in drivers):
        raise MtijaxError(f"drivers must all be [S, width] with one width, got shapes "
                          f"{[tuple(np.shape(f)) for f in drivers]}")
    counts = np.asarray([np.shape(f)[0] for f in drivers], np.int32)
    frames = jnp.stack([jnp.pad(jnp.asarray(f), ((0, counts.max() - f.shape[0]), (0, 0))) for f in drivers])
    return frames, counts
