"""Patch specifications as data: which site, which layers, which positions, how, and from what source.

A :class:`PatchSpec` describes one site's patch for one forward call. Every
choice that a sweep varies is an array (the layer mask, the position range,
the coefficient, the source values), so one compiled forward serves every
choice and ``jax.vmap`` over a batch of specs runs a sweep in one call.
:func:`to_patches` turns specs into the per-layer :class:`~mtijax.interventions.Patch`
values and masks that the blocks apply at their sites.

Positions (the ``positions`` argument of :func:`patch_spec`) count the *real*
tokens of the call (padding excluded), like a Python slice:

==================  =====================================================
rule                patched tokens of a call of ``n`` real tokens
==================  =====================================================
``"all"``           every token
``"last"``          the last token
``("last", w)``     the last ``w`` tokens (the original hooks' window, w=16)
``(start, stop)``   tokens ``start .. stop - 1``; negative counts from the end
==================  =====================================================

Source alignment (``align``) says which source token feeds which patched token:
``"end"`` (default) pairs the call's last token with the source's last token and
walks back from there (the original's ``[-16:]`` hooks); ``"start"`` pairs the
first tokens; ``"broadcast"`` takes a source with one position (a vector, such
as a mean) and applies it at every patched token. Sources are laid out
left-padded, as :func:`mtijax.patching.capture` and ``generate`` make them.

Modes: ``"replace"`` sets the activation to the source value; ``"interpolate"``
gives ``(1 - coef) * h + coef * source``; ``"add"`` gives ``h + coef * source``
(a steering vector scaled by ``coef``). Tokens a spec does not patch keep their
activation bit for bit.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from mtijax.config import ModelConfig
from mtijax.errors import MtijaxError
from mtijax.interventions import Patch, layer_mask
from mtijax.patching.capture import Capture, check_site
from mtijax.patching.positions import END, PositionRule, parse_positions, span_bounds

MODES = ("replace", "add", "interpolate")
ALIGNMENTS = ("end", "start", "broadcast")


@struct.dataclass
class PatchSpec:
    """One site's patch, as data (build it with :func:`patch_spec`).

    Attributes:
      site: the activation site (static).
      layers: ``[L]`` float32 layer mask (1 = patched; fractions weight the patch).
      span: ``[2]`` int32 ``(start, stop)`` range of the call's real tokens (see the module docstring).
      coef: float32 scalar: the coefficient of ``add`` and ``interpolate`` (``replace`` ignores it).
      source: ``[L, Bs, T, *site_shape]`` source values (``Bs`` is 1 or the target batch).
      source_positions: ``[Bs, T]`` int32 token positions of the source, -1 on padding.
      mode: ``replace``, ``add`` or ``interpolate`` (static).
      align: ``end``, ``start`` or ``broadcast`` (static).
    """

    layers: jax.Array
    span: jax.Array
    coef: jax.Array
    source: jax.Array
    source_positions: jax.Array
    site: str = struct.field(pytree_node=False, default="resid_post")
    mode: str = struct.field(pytree_node=False, default="replace")
    align: str = struct.field(pytree_node=False, default="end")


def patch_spec(config: ModelConfig, site: str, layers: Iterable[int] | jax.Array,
               source: Capture | jax.Array, *, positions: PositionRule = "all", mode: str = "replace",
               coef: float = 1.0, align: str | None = None) -> PatchSpec:
    """A checked :class:`PatchSpec`.

    Args:
      layers: layer indices, or an ``[L]`` mask.
      source: a :class:`Capture` holding ``site`` at every patched layer (its values at their token positions),
        or an array of vectors: ``[*site_shape]`` (the same at every layer) or ``[L, *site_shape]``, applied with
        ``align="broadcast"`` (the default for arrays).
      positions: which tokens of the call to patch (see the module docstring).
    """
    check_site(config, site, patching=True)
    if mode not in MODES:
        raise MtijaxError(f"unknown patch mode {mode!r}; modes are {', '.join(MODES)}")
    num_layers = config.num_layers
    if isinstance(layers, (jax.Array, np.ndarray)) and np.ndim(layers) == 1 and len(layers) == num_layers \
            and np.asarray(layers).dtype.kind == "f":
        mask = jnp.asarray(layers, jnp.float32)
        chosen = [int(l) for l in np.flatnonzero(np.asarray(layers))]
    else:
        chosen = [int(l) for l in layers]
        mask = layer_mask(num_layers, chosen)
    span = parse_positions(positions)
    if isinstance(source, Capture):
        align = align or "end"
        if align == "broadcast":
            raise MtijaxError("align='broadcast' needs a vector source, not a capture")
        values, source_positions = source.full_layers(site, num_layers, chosen)
    else:
        align = align or "broadcast"
        if align != "broadcast":
            raise MtijaxError(f"a vector source is broadcast over tokens; align={align!r} needs a capture")
        values, source_positions = _vector_source(config, site, jnp.asarray(source))
    if align not in ALIGNMENTS:
        raise MtijaxError(f"unknown alignment {align!r}; alignments are {', '.join(ALIGNMENTS)}")
    return PatchSpec(mask, jnp.asarray(span, jnp.int32), jnp.asarray(coef, jnp.float32), values,
                     source_positions, site=site, mode=mode, align=align)


def _vector_source(config: ModelConfig, site: str, vector: jax.Array) -> tuple[jax.Array, jax.Array]:
    shape = site_shape(config, site)
    if vector.shape == shape:
        vector = jnp.broadcast_to(vector, (config.num_layers, *shape))
    if vector.shape != (config.num_layers, *shape):
        raise MtijaxError(f"a vector source for {site} must have shape {shape} or {(config.num_layers, *shape)}, "
                          f"got {vector.shape}")
    return vector[:, None, None], jnp.zeros((1, 1), jnp.int32)


def site_shape(config: ModelConfig, site: str) -> tuple[int, ...]:
    """The per-token shape of an activation site (after ``[B, S]``)."""
    heads = {"attn_q": config.num_heads, "attn_z": config.num_heads, "attn_k": config.num_kv_heads,
             "attn_v": config.num_kv_heads}
    if site in heads:
        return heads[site], config.head_dim
    if site == "router_logits":
        return (config.num_experts,)
    return (config.hidden_size,)


def position_mask(spec: PatchSpec, positions: jax.Array) -> jax.Array:
    """``[B, S]`` bool: the tokens of a call (``positions [B, S]``, -1 on padding) that ``spec`` patches."""
    real = positions >= 0
    n = jnp.sum(real, axis=-1, keepdims=True)
    index = jnp.cumsum(real, axis=-1) - 1
    start, stop = spec.span[0], spec.span[1]
    lo = jnp.where(start < 0, n + start, start)
    hi = jnp.where(stop < 0, n + stop, jnp.minimum(stop, n))
    return real & (index >= lo) & (index < hi)


def to_patch(spec: PatchSpec, positions: jax.Array) -> Patch:
    """The :class:`Patch` (``value [L, B, S, ...]``, ``mask [L, B, S]``) that ``spec`` makes for a call whose
    tokens sit at ``positions [B, S]``. Pure ``jnp``: jit- and vmap-able."""
    b, s = positions.shape
    where = position_mask(spec, positions)
    if spec.align == "broadcast":
        value = spec.source[:, :, :1]
        valid = jnp.ones((b, s), bool)
    else:
        real = positions >= 0
        n = jnp.sum(real, axis=-1, keepdims=True)
        index = jnp.cumsum(real, axis=-1) - 1
        source_real = spec.source_positions >= 0
        m = jnp.sum(source_real, axis=-1, keepdims=True)
        t = spec.source.shape[2]
        j = index + (m - n if spec.align == "end" else 0)
        valid = (j >= 0) & (j < m)
        slots = jnp.clip(t - m + j, 0, t - 1)
        source = jnp.broadcast_to(spec.source, (spec.source.shape[0], b, *spec.source.shape[2:]))
        value = jax.vmap(lambda rows, index: rows[:, index], in_axes=(1, 0), out_axes=1)(source, slots)
    weight = spec.coef if spec.mode in ("add", "interpolate") else jnp.float32(1.0)
    mask = spec.layers[:, None, None] * (where & valid).astype(jnp.float32)[None] * weight
    return Patch(value, mask, "add" if spec.mode == "add" else "replace")


def to_patches(specs: Sequence[PatchSpec] | Mapping[str, PatchSpec], positions: jax.Array) -> dict[str, Patch]:
    """The ``patches`` argument of ``forward`` for a list of specs (one spec per site)."""
    specs = list(specs.values()) if isinstance(specs, Mapping) else list(specs)
    sites = [s.site for s in specs]
    repeated = sorted({s for s in sites if sites.count(s) > 1})
    if repeated:
        raise MtijaxError(f"two patches at site {repeated[0]!r}: give one spec per site (its layer mask may "
                          "hold several layers)")
    return {spec.site: to_patch(spec, positions) for spec in specs}


def check_span(spec: PatchSpec, positions: np.ndarray) -> None:
    """Raise if ``spec``'s position range reaches outside a call's real tokens, or (aligned sources) outside the
    source's; ``positions [B, S]`` concrete."""
    lengths = (np.asarray(positions) >= 0).sum(-1)
    span = tuple(int(v) for v in np.asarray(spec.span))
    source_lengths = (np.asarray(spec.source_positions) >= 0).sum(-1)
    for row, n in enumerate(lengths):
        lo, hi = span_bounds(span, int(n))
        stop = "end" if span[1] == END else span[1]
        if lo < 0 or hi > n or lo >= hi:
            raise MtijaxError(f"{spec.site}: position range ({span[0]}, {stop}) is outside the prompt of row {row}, "
                              f"which has {n} tokens (0..{n - 1})")
        if spec.align in ("end", "start"):
            m = int(source_lengths[row if len(source_lengths) > 1 else 0])
            first, last = (lo - n + m, hi - 1 - n + m) if spec.align == "end" else (lo, hi - 1)
            if first < 0 or last >= m:
                raise MtijaxError(f"{spec.site}: tokens {lo}..{hi - 1} of row {row} ({n} tokens) have no "
                                  f"{spec.align}-aligned source token: the source has {m} tokens")
