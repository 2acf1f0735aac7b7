"""Vmapped sweeps spread over the ``data`` mesh axis: injection alphas and patch-spec batches.

A sweep's ``K`` variants share the params and the prompts, so data parallelism splits the variant axis:
each device of a ``data`` group runs ``K / data`` variants over its own (tensor- or expert-sharded) copy of
the params. The variants are placed by the ``sweep`` rule (``data`` by default,
:func:`mtijax.sharding.place.spread`) and the result is constrained to the same split, so every device
computes only its variants' rows. ``K`` not divisible by the ``data`` axis runs replicated.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from mtijax.config import ModelConfig
from mtijax.injection import InjectionSpec, inject
from mtijax.models.decoder import forward
from mtijax.patching import sweep as patch_sweep_one_device
from mtijax.patching.forward import UNBATCHED_NDIM
from mtijax.patching.spec import PatchSpec
from mtijax.sharding.place import activation_spec, spread
from mtijax.sharding.rules import Rules, check_mesh, resolve


def _sweep_sharding(mesh: Mesh, shape: tuple[int, ...], rules: Rules | None) -> NamedSharding:
    return NamedSharding(mesh, activation_spec(mesh, ("sweep",) + (None,) * (len(shape) - 1), shape, rules, "sweep"))


@partial(jax.jit, static_argnames=("config", "spec", "mesh", "rules"))
def _injection_logits(config, spec, student, teacher, alphas, tokens, positions, mesh, rules):
    rules = dict(rules)
    alphas = jax.lax.with_sharding_constraint(alphas, _sweep_sharding(mesh, alphas.shape, rules))

    def one(alpha):
        return forward(config, inject(student, teacher, spec, alpha), tokens, positions).logits[:, -1]

    logits = jax.vmap(one)(alphas)
    return jax.lax.with_sharding_constraint(logits, _sweep_sharding(mesh, logits.shape, rules))


def injection_logits(config: ModelConfig, spec: InjectionSpec, student: dict, teacher: dict, alphas: Any,
                     tokens: Any, positions: Any = None, *, mesh: Mesh, rules: Rules | None = None) -> jax.Array:
    """Final-position logits ``[A, B, V]`` of ``student`` injected by ``spec`` at each of ``alphas [A]``
    (``mtijax.injection``), over ``tokens [B, S]``: one compiled ``vmap`` with the alphas split over ``data``."""
    mesh = check_mesh(mesh)
    tokens = jnp.asarray(tokens, jnp.int32)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    alphas = spread(jnp.asarray(alphas, jnp.float32), mesh, rules)
    return _injection_logits(config, spec, student, teacher, alphas, tokens, jnp.asarray(positions, jnp.int32),
                             mesh, tuple(sorted(resolve(rules).items())))


def spread_specs(specs: Sequence[PatchSpec], mesh: Mesh, rules: Rules | None = None) -> list[PatchSpec]:
    """``specs`` with their batched fields (``layers [K, L]``, ``span [K, 2]``, ``coef [K]``) split over ``data``."""
    out = []
    for spec in specs:
        batched = {name: spread(jnp.asarray(getattr(spec, name)), mesh, rules)
                   for name, ndim in UNBATCHED_NDIM.items() if np.ndim(getattr(spec, name)) == ndim + 1}
        out.append(spec.replace(**batched))
    return out


def patch_sweep(config: ModelConfig, params: dict, tokens: Any, specs: Sequence[PatchSpec], positions: Any = None,
                *, mesh: Mesh, rules: Rules | None = None, final_only: bool = True) -> jax.Array:
    """``mtijax.patching.sweep`` with the specs' batch axis split over ``data`` (:func:`spread_specs`): logits
    ``[K, B, V]`` (``final_only``) or ``[K, B, S, V]``, their leading axis split the same way (XLA carries the
    split of the masks through the vmapped forward)."""
    return patch_sweep_one_device(config, params, tokens, spread_specs(specs, check_mesh(mesh), rules), positions,
                                  final_only=final_only)
