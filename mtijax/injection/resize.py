"""Resizing a tensor to another shape: linear (bilinear for matrices), nearest, or truncate-or-zero-pad.

Every axis whose size differs is resized independently (separably), so a
matrix gets bilinear interpolation and a vector linear interpolation. The
conventions are PyTorch's ``torch.nn.functional.interpolate``:

* ``linear`` with ``align_corners=False`` (the default, and what seed 000's
  original code used): output index ``i`` samples source coordinate
  ``(i + 0.5) * in / out - 0.5``, clamped at 0; with ``align_corners=True``
  it samples ``i * (in - 1) / (out - 1)``.
* ``nearest``: source index ``floor(i * in / out)`` (PyTorch's ``nearest``).
* ``pad``: keep the leading ``min(in, out)`` entries, fill the rest with zeros.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mtijax.errors import MtijaxError

METHODS = ("bilinear", "nearest", "pad")


def _linear_axis(x: jax.Array, axis: int, size: int, align_corners: bool) -> jax.Array:
    n = x.shape[axis]
    i = jnp.arange(size, dtype=jnp.float32)
    if align_corners:
        src = i * ((n - 1) / (size - 1)) if size > 1 else jnp.zeros_like(i)
    else:
        src = jnp.maximum((i + 0.5) * (n / size) - 0.5, 0.0)
    lo = jnp.minimum(jnp.floor(src).astype(jnp.int32), n - 1)
    hi = jnp.minimum(lo + 1, n - 1)
    frac = (src - lo).reshape((-1,) + (1,) * (x.ndim - axis - 1))
    x32 = x.astype(jnp.float32)
    out = jnp.take(x32, lo, axis=axis) * (1 - frac) + jnp.take(x32, hi, axis=axis) * frac
    return out.astype(x.dtype)


def _nearest_axis(x: jax.Array, axis: int, size: int) -> jax.Array:
    n = x.shape[axis]
    src = jnp.minimum(jnp.floor(jnp.arange(size) * (n / size)).astype(jnp.int32), n - 1)
    return jnp.take(x, src, axis=axis)


def _pad_axis(x: jax.Array, axis: int, size: int) -> jax.Array:
    n = x.shape[axis]
    if size <= n:
        return jax.lax.slice_in_dim(x, 0, size, axis=axis)
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - n)
    return jnp.pad(x, widths)


def resize(x: jax.Array, shape: tuple[int, ...], method: str = "bilinear", align_corners: bool = False) -> jax.Array:
    """``x`` resized to ``shape`` (same rank) by ``method``; a same-shape resize returns ``x`` itself."""
    if method not in METHODS:
        raise MtijaxError(f"unknown resize method {method!r}; methods are {', '.join(METHODS)}")
    if x.ndim != len(shape):
        raise MtijaxError(f"cannot resize a rank-{x.ndim} tensor {list(x.shape)} to rank {len(shape)} {list(shape)}")
    for axis, size in enumerate(shape):
        if x.shape[axis] == size:
            continue
        if method == "bilinear":
            x = _linear_axis(x, axis, size, align_corners)
        elif method == "nearest":
            x = _nearest_axis(x, axis, size)
        else:
            x = _pad_axis(x, axis, size)
    return x
