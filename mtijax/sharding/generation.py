"""Generation over sharded params: the engine's own loop, with its KV cache split over batch rows and kv heads.

``mtijax.generate`` and ``mtijax.generate_stream`` come here when the params are placed on a mesh of more
than one device (``mtijax.shard`` or ``mtijax.load(..., mesh=)``). The engine runs unchanged
(``mtijax.engine.loop.run``) with a :class:`~mtijax.engine.loop.Resident` stack whose prefill chunk and
decode step are the engine's functions with the cache constrained on the way in and out
(``jax.lax.with_sharding_constraint``): keys and values ``[L, B, T, K, H]`` by
``("layers", "batch", "length", "kv_heads", "head_dim")`` and slot positions ``[B, T]`` by
``("batch", "length")``, so with the default rules the cache's rows are split over ``data`` and its kv heads
over ``model`` (each replicated where the mesh axis does not divide it: a batch bucket of 1, a single kv
head). XLA partitions everything between from the params' shardings and these.

Sharded generation runs the documented params layout, not ``fused_qkv`` (see ``mtijax.sharding.axes``).
"""

from __future__ import annotations

import functools
from typing import Any, Iterator, Sequence

import jax
from jax.sharding import Mesh, NamedSharding

from mtijax.config import ModelConfig
from mtijax.engine import loop
from mtijax.engine.interventions import Interventions, check
from mtijax.engine.ladder import Ladder, default_ladder
from mtijax.engine.request import Request, lay_out
from mtijax.engine.sampling import Policy, suppress_mask
from mtijax.errors import MtijaxError
from mtijax.models.cache import KVCache
from mtijax.sharding.place import activation_spec, mesh_of
from mtijax.sharding.rules import Rules, resolve

LAYOUT = "params"
"""The params layout sharded generation runs."""
KV_AXES = ("layers", "batch", "length", "kv_heads", "head_dim")
"""Logical axes of the cache's keys and values ``[L, B, T, K, H]``."""
POSITION_AXES = ("batch", "length")
"""Logical axes of the cache's slot positions ``[B, T]``."""


def cache_shardings(mesh: Mesh, cache: KVCache, rules: Rules | None = None) -> KVCache:
    """The ``NamedSharding`` of each array of ``cache`` (or of a cache of the same shapes) on ``mesh``."""
    def place(axes, array):
        return NamedSharding(mesh, activation_spec(mesh, axes, tuple(array.shape), rules, "KV cache"))

    return KVCache(place(KV_AXES, cache.k), place(KV_AXES, cache.v), place(POSITION_AXES, cache.positions))


def constrain_cache(mesh: Mesh, cache: KVCache, rules: Rules | None = None) -> KVCache:
    """``cache`` with its sharding constrained by :func:`cache_shardings` (inside a jitted function)."""
    return KVCache(*(jax.lax.with_sharding_constraint(a, s)
                     for a, s in zip(cache, cache_shardings(mesh, cache, rules))))


@functools.lru_cache(maxsize=None)
def engine_functions(mesh: Mesh, rules: tuple[tuple[str, Any], ...]) -> tuple[Any, Any]:
    """The engine's prefill chunk and decode step, jitted as the engine jits them, with the cache constrained
    to its sharding on ``mesh`` on entry and exit (``rules``: the resolved rules as sorted items)."""
    rules_map = dict(rules)

    def chunk(config, layout, params, cache, carry, router_state, tokens, positions, start, interventions):
        cache, carry, router_state = loop.prefill_chunk(config, layout, params, constrain_cache(mesh, cache, rules_map),
                                                        carry, router_state, tokens, positions, start, interventions)
        return constrain_cache(mesh, cache, rules_map), carry, router_state

    def step(config, layout, policy, record_logits, params, state, interventions, stops, suppress):
        state = state._replace(cache=constrain_cache(mesh, state.cache, rules_map))
        state, record = loop.decode_step(config, layout, policy, record_logits, params, state, interventions, stops,
                                         suppress)
        return state._replace(cache=constrain_cache(mesh, state.cache, rules_map)), record

    return (jax.jit(chunk, static_argnums=(0, 1), donate_argnums=(3,)),
            jax.jit(step, static_argnums=(0, 1, 2, 3), donate_argnums=(5,)))


def start_run(config: ModelConfig, params: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
              policy: Policy, seed: int = 0, stop_ids: Sequence[int] | None = None,
              suppress_ids: Sequence[int] | None = None, interventions: Interventions | None = None,
              ladder: Ladder | None = None, record_logits: bool = False, rules: Rules | None = None,
              ) -> tuple[Request, Iterator[tuple[loop.State, loop.Record]]]:
    """``mtijax.generate.start_run`` for params on a mesh (see the module docstring): ``(request, steps)``."""
    mesh = mesh_of(params)
    if mesh is None:
        raise MtijaxError("sharded generation needs params placed on a mesh of several devices (mtijax.shard)")
    interventions = Interventions() if interventions is None else interventions
    check(interventions, config)
    request = lay_out(config, prompts, max_new_tokens, ladder or default_ladder(rolling=False), stop_ids,
                      edits_cache=interventions.cache_edit is not None)
    chunk_fn, step_fn = engine_functions(mesh, tuple(sorted(resolve(rules).items(), key=lambda kv: kv[0])))
    steps = loop.run(config, params, request, policy=policy, interventions=interventions,
                     seed=seed, suppress=suppress_mask(config.vocab_size, suppress_ids),
                     record_logits=record_logits, layout=LAYOUT,
                     stack=loop.Resident(config, LAYOUT, params, chunk_fn, step_fn))
    return request, steps
