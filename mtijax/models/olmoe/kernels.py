"""OLMoE's chosen experts read in place: Pallas kernels for the ``gathered`` dispatch of a few tokens, and a
grouped matrix product (``tiled``) for many.

:func:`~mtijax.models.olmoe.model.experts_gathered` gathers each token-expert pair's expert matrices into a new
array before its matrix-vector products (read, write, read: three times the bytes the products need). These two
kernels read the chosen expert's rows where they are: program ``(p, j)`` loads pair ``p``'s expert id, then
streams ``[rows, cols]`` tiles of that expert's matrices for output block ``j``, accumulating in float32.

- :func:`gate_up`: ``silu(x_p @ gate[e_p]) * (x_p @ up[e_p])``, ``[P, F]``;
- :func:`down`: ``h_p @ down[e_p]``, ``[P, D]``.

:func:`experts_tiled` is the many-token dispatch: the token-expert pairs, sorted by expert, are laid out in row
tiles of :data:`TILE_ROWS` that each belong to one expert (every expert's group padded to whole tiles), and program
``(t, j)`` multiplies tile ``t``'s rows by its expert's matrices for output block ``j`` on the matrix units, reading
the expert where it is. Tiles past the used ones do nothing. Its work is the chosen experts' (``k / E`` of the
dense dispatch's) plus the padding, at most one tile per expert.

On GPUs they lower through Triton; elsewhere ``interpret=True`` runs the same kernels as JAX operations (the
tests check them that way against the gathered dispatch). Every dimension a tile spans must be a power of two
(:func:`fits`).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

Params = dict[str, Any]
ROWS = 128
"""Input rows a program reads per loop iteration (the reduction tile)."""
COLS = 64
"""Output columns per program."""


TILE_ROWS = 64
"""Rows (token-expert pairs) of one tile of :func:`experts_tiled`: every expert's group is padded to a multiple."""
TILE_COLS = 128
"""Output columns per program of :func:`experts_tiled`."""
TILE_DEPTH = 64
"""The contracted dimension's step of :func:`experts_tiled`'s programs."""


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def fits(hidden: int, intermediate: int) -> bool:
    """Whether the kernels take a layer of this hidden and expert width (Triton tiles are powers of two)."""
    return _power_of_two(hidden) and _power_of_two(intermediate)


def _matvec_kernel(experts_ref, x_ref, *refs, rows: int, tile: tuple[int, int], combine: Callable):
    """Program ``(p, j)``: ``combine(x[p] @ w[e][:, block j] for each weight ref w)`` with ``e = experts[p]``,
    streamed over ``rows`` in tiles of ``tile[0]`` and accumulated in float32; ``refs`` = the weights, then the
    output."""
    *weights, out_ref = refs
    p, j = pl.program_id(0), pl.program_id(1)
    e = experts_ref[p]
    tr, tc = tile
    cols = pl.ds(j * tc, tc)

    def step(i, acc):
        span = pl.ds(i * tr, tr)
        x = x_ref[p, span].astype(jnp.float32)[:, None]
        return tuple(a + jnp.sum(x * w[e, span, cols].astype(jnp.float32), axis=0) for a, w in zip(acc, weights))

    acc = jax.lax.fori_loop(0, rows // tr, step, tuple(jnp.zeros((tc,), jnp.float32) for _ in weights))
    out_ref[p, cols] = combine(*acc).astype(out_ref.dtype)


def _gathered_matvec(x: jax.Array, weights: tuple[jax.Array, ...], experts: jax.Array, combine: Callable,
                     dtype: Any, interpret: bool) -> jax.Array:
    """``combine(x[p] @ w[experts[p]] for w in weights)`` for ``x [P, R]``, each ``w [E, R, C]``: ``[P, C]``."""
    pairs, rows = x.shape
    width = weights[0].shape[-1]
    tile = (min(ROWS, rows), min(COLS, width))
    return pl.pallas_call(functools.partial(_matvec_kernel, rows=rows, tile=tile, combine=combine),
                          out_shape=jax.ShapeDtypeStruct((pairs, width), dtype),
                          grid=(pairs, width // tile[1]), interpret=interpret)(experts, x, *weights)


def _silu_product(gate: jax.Array, up: jax.Array) -> jax.Array:
    return jax.nn.silu(gate) * up


def _identity(out: jax.Array) -> jax.Array:
    return out


@functools.partial(jax.jit, static_argnames=("interpret",))
def gate_up(x: jax.Array, gate: jax.Array, up: jax.Array, experts: jax.Array, interpret: bool = False) -> jax.Array:
    """``silu(x[p] @ gate[experts[p]]) * (x[p] @ up[experts[p]])`` for ``x [P, D]``, ``gate/up [E, D, F]``,
    ``experts [P]``: ``[P, F]`` in ``x``'s dtype."""
    return _gathered_matvec(x, (gate, up), experts, _silu_product, x.dtype, interpret)


@functools.partial(jax.jit, static_argnames=("interpret",))
def down(h: jax.Array, weights: jax.Array, experts: jax.Array, interpret: bool = False) -> jax.Array:
    """``h[p] @ weights[experts[p]]`` for ``h [P, F]``, ``weights [E, F, D]``, ``experts [P]``: ``[P, D]`` float32."""
    return _gathered_matvec(h, (weights,), experts, _identity, jnp.float32, interpret)


def experts_gathered_in_place(moe: Params, x: jax.Array, experts: jax.Array, weights: jax.Array,
                              interpret: bool | None = None) -> jax.Array:
    """What ``experts_gathered`` computes, with the chosen experts' matrices read in place by the kernels.

    ``x [T, D]``, ``experts/weights [T, k]``: ``[T, D]``. ``interpret`` defaults to True off GPUs."""
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    tokens, k = experts.shape
    flat = experts.reshape(-1).astype(jnp.int32)
    xs = jnp.repeat(x, k, axis=0)
    hidden = gate_up(xs, moe["gate_proj"], moe["up_proj"], flat, interpret=interpret)
    out = down(hidden, moe["down_proj"], flat, interpret=interpret)
    out = out * weights.reshape(-1, 1).astype(jnp.float32)
    return out.reshape(tokens, k, -1).sum(axis=1).astype(x.dtype)


def _tiled_kernel(tile_expert_ref, used_ref, x_ref, *refs, depth: int, tile: tuple[int, int, int],
                  combine: Callable):
    """Program ``(t, j)``: ``combine(x[tile t] @ w[e][:, block j] for each weight ref w)`` with ``e`` tile
    ``t``'s expert, accumulated in float32 over ``depth`` in steps of ``tile[2]``; tiles from ``used`` on are
    skipped (their output rows are never read)."""
    *weights, out_ref = refs
    t, j = pl.program_id(0), pl.program_id(1)
    rows_per_tile, cols_per_program, step_depth = tile

    @pl.when(t < used_ref[0])
    def _():
        e = tile_expert_ref[t]
        rows, cols = pl.ds(t * rows_per_tile, rows_per_tile), pl.ds(j * cols_per_program, cols_per_program)

        def step(i, acc):
            span = pl.ds(i * step_depth, step_depth)
            x = x_ref[rows, span]
            return tuple(a + jax.lax.dot(x, w[e, span, cols], preferred_element_type=jnp.float32)
                         for a, w in zip(acc, weights))

        zeros = tuple(jnp.zeros((rows_per_tile, cols_per_program), jnp.float32) for _ in weights)
        acc = jax.lax.fori_loop(0, depth // step_depth, step, zeros)
        out_ref[rows, cols] = combine(*acc).astype(out_ref.dtype)


def _tiled_matmul(x: jax.Array, weights: tuple[jax.Array, ...], tile_expert: jax.Array, used: jax.Array,
                  combine: Callable, dtype: Any, interpret: bool) -> jax.Array:
    """``combine(x[tile t] @ w[tile_expert[t]] for w in weights)`` for ``x [R, C_in]`` in tiles of
    :data:`TILE_ROWS` rows, each ``w [E, C_in, C_out]``: ``[R, C_out]`` (rows of tiles ``>= used[0]`` undefined)."""
    rows, depth = x.shape
    width = weights[0].shape[-1]
    tile = (TILE_ROWS, min(TILE_COLS, width), min(TILE_DEPTH, depth))
    return pl.pallas_call(functools.partial(_tiled_kernel, depth=depth, tile=tile, combine=combine),
                          out_shape=jax.ShapeDtypeStruct((rows, width), dtype),
                          grid=(rows // TILE_ROWS, width // tile[1]), interpret=interpret)(
        tile_expert, used, x, *weights)


def tile_layout(experts: jax.Array, num_experts: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Where :func:`experts_tiled` puts each token-expert pair: ``experts [P]`` (pair ``p``'s expert) ->
    ``(row [P]`` its row in the tiled layout, ``tile_expert [R / TILE_ROWS]``, ``used [1]`` tiles in use,
    ``rows R)``. Each expert's pairs take consecutive rows in pair order, from a tile boundary; ``R`` is the
    static bound ``P + E * (TILE_ROWS - 1)`` rounded up to whole tiles."""
    pairs = experts.shape[0]
    sizes = jnp.bincount(experts, length=num_experts).astype(jnp.int32)
    padded = -(-sizes // TILE_ROWS) * TILE_ROWS
    ends = jnp.cumsum(padded)
    order = jnp.argsort(experts, stable=True)
    rank = jnp.zeros((pairs,), jnp.int32).at[order].set(
        jnp.arange(pairs, dtype=jnp.int32) - (jnp.cumsum(sizes) - sizes)[experts[order]])
    row = ends[experts] - padded[experts] + rank
    rows = -(-(pairs + num_experts * (TILE_ROWS - 1)) // TILE_ROWS) * TILE_ROWS
    starts = jnp.arange(rows // TILE_ROWS, dtype=jnp.int32) * TILE_ROWS
    tile_expert = jnp.minimum(jnp.searchsorted(ends, starts, side="right"), num_experts - 1).astype(jnp.int32)
    return row, tile_expert, (ends[-1] // TILE_ROWS).reshape(1).astype(jnp.int32), rows


def experts_tiled(moe: Params, x: jax.Array, experts: jax.Array, weights: jax.Array,
                  interpret: bool | None = None) -> jax.Array:
    """Every token on its chosen experts as one grouped matrix product per projection (see the module docstring).

    ``x [T, D]``, ``experts/weights [T, k]``: ``[T, D]``. ``interpret`` defaults to True off GPUs."""
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    tokens, k = experts.shape
    num_experts = moe["gate_proj"].shape[0]
    row, tile_expert, used, rows = tile_layout(experts.reshape(-1).astype(jnp.int32), num_experts)
    token_of_row = jnp.full((rows,), tokens, jnp.int32).at[row].set(jnp.arange(tokens * k, dtype=jnp.int32) // k)
    xs = jnp.concatenate([x, jnp.zeros((1, x.shape[1]), x.dtype)])[token_of_row]
    hidden = _tiled_matmul(xs, (moe["gate_proj"], moe["up_proj"]), tile_expert, used, _silu_product, x.dtype,
                           interpret)
    out = _tiled_matmul(hidden, (moe["down_proj"],), tile_expert, used, _identity, jnp.float32, interpret)[row]
    out = out * weights.reshape(-1, 1).astype(jnp.float32)
    return out.reshape(tokens, k, -1).sum(axis=1).astype(x.dtype)
