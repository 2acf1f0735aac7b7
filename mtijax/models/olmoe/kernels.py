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
from typing import Any, Callable

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
