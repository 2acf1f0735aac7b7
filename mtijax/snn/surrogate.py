"""Surrogate gradients for the spike nonlinearity (as snnTorch and spyx train spiking networks).

A spike is the Heaviside step ``H(x) = 1 if x >= 0 else 0`` of a margin ``x``
(membrane minus threshold). Its true derivative is zero almost everywhere, so
nothing upstream of a spike can learn. A surrogate keeps the forward value
exactly the step and replaces the derivative in the backward pass (a
``jax.custom_jvp``, so ``jax.grad``, ``jax.jvp``, ``jit`` and ``vmap`` all see it):

* ``"fast_sigmoid"`` (snnTorch's ``fast_sigmoid``, spyx's ``superspike``):
  ``dH/dx = 1 / (1 + slope * |x|)^2``, default slope 25;
* ``"arctan"`` (snnTorch's ``atan``): ``dH/dx = (slope / 2) / (1 + (pi / 2 * slope * x)^2)``,
  the derivative of ``1/2 + arctan(pi / 2 * slope * x) / pi``, default slope 2.

``None`` is the plain step, whose gradient is zero. spyx's ``arctan`` uses
``1 / (1 + slope * x^2)`` instead; the snnTorch form is the one here.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from mtijax.errors import MtijaxError

DEFAULT_SLOPES = {"fast_sigmoid": 25.0, "arctan": 2.0}
"""The surrogates by name, with their default slopes (snnTorch's)."""


def surrogate_derivative(name: str, x: jax.Array, slope: float) -> jax.Array:
    """The surrogate's ``dH/dx`` at ``x`` (float32, the formulas in the module docstring)."""
    x = jnp.asarray(x, jnp.float32)
    k = jnp.float32(slope)
    if name == "fast_sigmoid":
        return 1 / (1 + k * jnp.abs(x)) ** 2
    if name == "arctan":
        return (k / 2) / (1 + (jnp.float32(math.pi / 2) * k * x) ** 2)
    raise MtijaxError(f"unknown surrogate {name!r}: use one of {', '.join(DEFAULT_SLOPES)}, or None")


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def _step(x: jax.Array, name: str, slope: float) -> jax.Array:
    return (x >= 0).astype(jnp.float32)


@_step.defjvp
def _step_jvp(name: str, slope: float, primals, tangents):
    (x,), (dx,) = primals, tangents
    return _step(x, name, slope), surrogate_derivative(name, x, slope) * dx


@dataclasses.dataclass(frozen=True)
class Surrogate:
    """A spike function: forward the exact step ``H(x)``, backward the named surrogate (hashable, so static).

    Attributes:
      name: ``"fast_sigmoid"`` or ``"arctan"``.
      slope: the sharpness ``k`` of the formula in the module docstring.
    """

    name: str
    slope: float

    def __call__(self, x: jax.Array) -> jax.Array:
        """``H(x)`` float32, same shape as ``x``, with the surrogate derivative."""
        return _step(jnp.asarray(x, jnp.float32), self.name, self.slope)

    def gradient_only(self, x: jax.Array) -> jax.Array:
        """Exactly 0 in value, the surrogate derivative of ``H(x)`` in gradient (the straight-through trick).

        Adding ``c * gradient_only(x)`` to an exact boolean update gives it
        the gradient of ``c * H(x)`` without changing a single bit of the value.
        """
        s = self(x)
        return s - jax.lax.stop_gradient(s)


def make_surrogate(name: str | None, slope: float | None = None) -> Surrogate | None:
    """The :class:`Surrogate` for ``name`` (``None`` for the plain step), with ``slope`` or the default one."""
    if name is None:
        if slope is not None:
            raise MtijaxError("a slope needs a surrogate: pass surrogate='fast_sigmoid' or 'arctan' with it")
        return None
    if name not in DEFAULT_SLOPES:
        raise MtijaxError(f"unknown surrogate {name!r}: use one of {', '.join(DEFAULT_SLOPES)}, or None")
    slope = DEFAULT_SLOPES[name] if slope is None else slope
    if not isinstance(slope, (int, float)) or isinstance(slope, bool) or not slope > 0 or not math.isfinite(slope):
        raise MtijaxError(f"the surrogate's slope must be a positive number, got {slope!r}")
    return Surrogate(name, float(slope))


def heaviside(x: jax.Array, surrogate: Surrogate | None = None) -> jax.Array:
    """``H(x) = [x >= 0]`` float32; differentiable through ``surrogate`` when one is given, else gradient 0."""
    if surrogate is None:
        return (jnp.asarray(x) >= 0).astype(jnp.float32)
    return surrogate(x)
