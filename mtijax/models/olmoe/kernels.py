"""OLMoE's chosen experts read in place: a Pallas kernel for the ``gathered`` dispatch of a few tokens.

:func:`~mtijax.models.olmoe.model.experts_gathered` gathers each token-expert pair's expert matrices into a new
array before its matrix-vector products (read, write, read: three times the bytes the products need). These two
kernels read the chosen expert's rows where they are: program ``(p, j)`` loads pair ``p``'s expert id, then
streams ``[rows, cols]`` tiles of that expert's matrices for output block ``j``, accumulating in float32.

- :func:`gate_up`: ``silu(x_p @ gate[e_p]) * (x_p @ up[e_p])``, ``[P, F]``;
- :func:`down`: ``h_p @ down[e_p]``, ``[P, D]``.

On GPUs they lower through Triton; elsewhere ``interpret=True`` runs the same kernels as JAX operations (the
tests check them that way against the gathered dispatch). Every dimension a tile spans must be a power of two
(:func:`fits`).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

Params = dict[str, Any]
ROWS = 128
"""Input rows a program reads per loop iteration (the reduction tile)."""
COLS = 64
"""Output columns per program."""


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def fits(hidden: int, intermediate: int) -> bool:
    """Whether the kernels take a layer of this hidden and expert width (Triton tiles are powers of two)."""
    return _power_of_two(hidden) and _power_of_two(intermediate)


def _tiles(rows: int, cols: int) -> tuple[int, int]:
    return min(ROWS, rows), min(COLS, cols)


def _gate_up_kernel(experts_ref, x_ref, gate_ref, up_ref, out_ref, *, rows: int, tile: tuple[int, int]):
    p, j = pl.program_id(0), pl.program_id(1)
    e = experts_ref[p]
    tr, tc = tile
    cols = pl.ds(j * tc, tc)

    def step(i, acc):
        g, u = acc
        span = pl.ds(i * tr, tr)
        x = x_ref[p, span].astype(jnp.float32)[:, None]
        return (g + jnp.sum(x * gate_ref[e, span, cols].astype(jnp.float32), axis=0),
                u + jnp.sum(x * up_ref[e, span, cols].astype(jnp.float32), axis=0))

    zero = jnp.zeros((tc,), jnp.float32)
    g, u = jax.lax.fori_loop(0, rows // tr, step, (zero, zero))
    out_ref[p, cols] = (jax.nn.silu(g) * u).astype(out_ref.dtype)


def _down_kernel(experts_ref, h_ref, down_ref, out_ref, *, rows: int, tile: tuple[int, int]):
    p, j = pl.program_id(0), pl.program_id(1)
    e = experts_ref[p]
    tr, tc = tile
    cols = pl.ds(j * tc, tc)

    def step(i, acc):
        span = pl.ds(i * tr, tr)
        h = h_ref[p, span].astype(jnp.float32)[:, None]
        return acc + jnp.sum(h * down_ref[e, span, cols].astype(jnp.float32), axis=0)

    out_ref[p, cols] = jax.lax.fori_loop(0, rows // tr, step, jnp.zeros((tc,), jnp.float32)).astype(out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("interpret",))
def gate_up(x: jax.Array, gate: jax.Array, up: jax.Array, experts: jax.Array, interpret: bool = False) -> jax.Array:
    """``silu(x[p] @ gate[experts[p]]) * (x[p] @ up[experts[p]])`` for ``x [P, D]``, ``gate/up [E, D, F]``,
    ``experts [P]``: ``[P, F]`` in ``x``'s dtype."""
    pairs, hidden = x.shape
    width = gate.shape[-1]
    tile = _tiles(hidden, width)
    return pl.pallas_call(functools.partial(_gate_up_kernel, rows=hidden, tile=tile),
                          out_shape=jax.ShapeDtypeStruct((pairs, width), x.dtype),
                          grid=(pairs, width // tile[1]), interpret=interpret)(experts, x, gate, up)


@functools.partial(jax.jit, static_argnames=("interpret",))
def down(h: jax.Array, weights: jax.Array, experts: jax.Array, interpret: bool = False) -> jax.Array:
    """``h[p] @ weights[experts[p]]`` for ``h [P, F]``, ``weights [E, F, D]``, ``experts [P]``: ``[P, D]`` float32."""
    pairs, width = h.shape
    hidden = weights.shape[-1]
    tile = _tiles(width, hidden)
    return pl.pallas_call(functools.partial(_down_kernel, rows=width, tile=tile),
                          out_shape=jax.ShapeDtypeStruct((pairs, hidden), jnp.float32),
                          grid=(pairs, hidden // tile[1]), interpret=interpret)(experts, h, weights)


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
