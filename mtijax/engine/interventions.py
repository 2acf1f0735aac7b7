"""What a generation run does to the model, as data threaded through the engine's prefill and decode step.

:class:`Interventions` holds every kind the engine knows; each is a pytree (arrays are traced, so new
values never recompile; the structure and the static fields are part of the compiled program):

============== =========================================================================================
patches        ``site -> Patch`` applied at every call (prefill chunks and decode steps); values and masks
               broadcast over the call's tokens (``value [L, B|1, 1, ...]``, ``mask [L]`` or ``[L, B|1, 1]``)
prompt_patches ``site -> Patch`` applied to the prefill only, laid out on the request's prefill slots
               (``value [L, B|1, W, ...]``, ``mask [L]`` or ``[L, B|1, W]``; see ``mtijax.engine.request``)
step_patches   ``site -> StepPatch``: a value that changes with the decode call (persistent patches)
grafts         ``layer -> Graft``: a transform with its own variables and carry, applied to the residual
               stream leaving block ``layer`` (fusion layers)
router         a :class:`~mtijax.interventions.RouterHook` with its state (the spiking gate's membranes),
               which persists from the prefill through every decode step
cache_edit     a :class:`CacheEdit` applied to the KV cache once, after the prefill (KV-cache patching)
trace          static ``((site, layers), ...)``: sites recorded at every decode call
============== =========================================================================================

Arrays with a batch axis may have one row (broadcast) or one per prompt; the engine pads them to the
batch bucket.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Protocol

import jax
import jax.numpy as jnp
from flax import struct

from mtijax.config import ModelConfig
from mtijax.errors import MtijaxError
from mtijax.interventions import Patch, RouterHook, check_sites
from mtijax.models.decoder import family


@struct.dataclass
class StepPatch:
    """A patch whose value follows the decode call ``t``.

    Attributes:
      values: ``[L, B|1, N', *site_shape]``; call ``t`` gets ``values[:, :, min(t, N' - 1)]``.
      on: ``[N']`` float32 weight of the patch at each call (same clamping); 0 switches it off.
      mask: ``[L]`` or ``[L, B|1]`` weights of layers (and rows).
      mode: ``"replace"`` (``(1 - w) h + w v``) or ``"add"`` (``h + w v``), ``w = mask * on[t]``.
    """

    values: jax.Array
    on: jax.Array
    mask: jax.Array
    mode: str = struct.field(pytree_node=False, default="replace")

    def at(self, step: jax.Array) -> Patch:
        """The :class:`~mtijax.interventions.Patch` of decode call ``step`` (one token per row)."""
        index = jnp.minimum(step, self.values.shape[2] - 1)
        value = jax.lax.dynamic_slice_in_dim(self.values, index, 1, axis=2)
        weight = self.mask * self.on[index]
        if weight.ndim == 2:
            weight = weight[:, :, None]
        return Patch(value, weight, self.mode)


class GraftModule(Protocol):
    """A transform grafted between blocks (static, hashable: part of the compiled program)."""

    def init_carry(self, batch: int) -> Any:
        """The carry before any token."""

    def __call__(self, variables: Any, h: jax.Array, positions: jax.Array,
                 carry: Any) -> tuple[jax.Array, Any, dict[str, jax.Array]]:
        """``h [B, S, D]`` -> ``(h', carry', metrics name -> [B, S])``."""


@struct.dataclass
class Graft:
    """``module`` with its ``variables`` (a pytree: traced, so trained values never recompile)."""

    variables: Any
    module: GraftModule = struct.field(pytree_node=False)


@struct.dataclass
class CacheEdit:
    """``fn(cache, data, width) -> cache``, applied after the prefill (``width``: the prefill region's slots)."""

    data: Any
    fn: Callable = struct.field(pytree_node=False)


@struct.dataclass
class Interventions:
    """Everything a run does to the model (see the module docstring)."""

    patches: dict[str, Patch] = struct.field(default_factory=dict)
    prompt_patches: dict[str, Patch] = struct.field(default_factory=dict)
    step_patches: dict[str, StepPatch] = struct.field(default_factory=dict)
    grafts: dict[int, Graft] = struct.field(default_factory=dict)
    router: RouterHook | None = None
    cache_edit: CacheEdit | None = None
    trace: tuple[tuple[str, tuple[int, ...]], ...] = struct.field(pytree_node=False, default=())


def check(interventions: Interventions, config: ModelConfig) -> None:
    """Raise on interventions the engine cannot thread: sites ``config``'s architecture does not have (or
    cannot patch), two patches at one site in one call, layers out of range."""
    architecture = family(config)
    for patches in (interventions.patches, interventions.prompt_patches, interventions.step_patches):
        check_sites(patches.keys(), patching=True, architecture=architecture)
    check_sites({site for site, _ in interventions.trace}, architecture=architecture)
    num_layers = config.num_layers
    both = sorted(set(interventions.patches) & set(interventions.step_patches))
    if both:
        raise MtijaxError(f"site {both[0]!r} has both a patch and a step patch; give one per site")
    both = sorted(set(interventions.patches) & set(interventions.prompt_patches))
    if both:
        raise MtijaxError(f"site {both[0]!r} has both a patch and a prompt patch; give one per site")
    bad = [l for l in interventions.grafts if not (isinstance(l, int) and 0 <= l < num_layers)]
    if bad:
        raise MtijaxError(f"graft at layer {bad[0]!r} is out of range: the model has layers 0..{num_layers - 1}")
    for site, layers in interventions.trace:
        out = [l for l in layers if not 0 <= l < num_layers]
        if out:
            raise MtijaxError(f"traced layer {out[0]} of {site} is out of range: the model has layers "
                              f"0..{num_layers - 1}")


def _pad_rows(x: jax.Array, axis: int, batch: int, rows: int) -> jax.Array:
    """Pad axis ``axis`` of ``x`` from ``batch`` to ``rows`` (zeros) when it holds one entry per prompt."""
    if rows == batch or x.ndim <= axis or x.shape[axis] != batch or batch == 1:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, rows - batch)
    return jnp.pad(jnp.asarray(x), pad)


def pad_batch(interventions: Interventions, batch: int, rows: int) -> Interventions:
    """``interventions`` with every per-prompt axis padded to the batch bucket's ``rows``."""
    if rows == batch:
        return interventions

    def patch(p: Patch) -> Patch:
        return p.replace(value=_pad_rows(p.value, 1, batch, rows), mask=_pad_rows(p.mask, 1, batch, rows))

    def step(p: StepPatch) -> StepPatch:
        return p.replace(values=_pad_rows(p.values, 1, batch, rows), mask=_pad_rows(p.mask, 1, batch, rows))

    return interventions.replace(
        patches={k: patch(v) for k, v in interventions.patches.items()},
        prompt_patches={k: patch(v) for k, v in interventions.prompt_patches.items()},
        step_patches={k: step(v) for k, v in interventions.step_patches.items()})


def chunk_patches(prompt_patches: Mapping[str, Patch], start: jax.Array, size: int) -> dict[str, Patch]:
    """The prompt patches of prefill slots ``start .. start + size - 1``."""
    def cut(x: jax.Array) -> jax.Array:
        return x if x.ndim < 3 or x.shape[2] == 1 else jax.lax.dynamic_slice_in_dim(x, start, size, axis=2)

    return {site: p.replace(value=cut(p.value), mask=cut(p.mask)) for site, p in prompt_patches.items()}
