"""Generation with KV-cache patching and persistent patches applied at every decode step.

One target prompt is generated in ``R`` rows, one per seed (row ``r`` samples
with its own key ``seeds[r]``, so a run is reproducible whatever else is in the
batch). A :class:`Plan` says what is patched from the source (champion) prompt:

* ``kv``: after the target's prompt is processed, its cache is patched with
  the source's (:func:`mtijax.patching.kv.replace_kv`: ``whole`` or the
  original's ``last_min``, all or chosen layers).
* ``patches``: one :class:`SitePatch` per site, acting at two kinds of calls:

  - the prompt (``prompt``: a position rule; source values end-aligned, so the
    target's last prompt token gets the source's last prompt token's value);
  - every decode step (``decode``), the value chosen from
    ``last`` (the source's activation at its last prompt token),
    ``mean`` (its mean over the source prompt),
    ``trajectory`` (the source's own generation, run first with the same
    seeds and settings: step ``t`` of the target gets step ``t`` of the
    source, in lockstep), or
    ``hook``: the original's forward hooks, which overwrote the last ``window``
    positions of a call only when the call had at least ``window`` tokens; a
    decode step has one, so with ``window > 1`` they never fire (as the
    original ran). ``None`` leaves decode steps alone.

How the first new token comes (``first_token``):

``recompute`` (default)
    The target's last prompt token is processed again, alone, at its own
    position and slot, attending to the (patched) cache; its logits give the
    first token. Without patches this is exactly plain generation; with a
    whole-cache replacement by a same-length source ending in the same token,
    it is exactly the source's generation (tested). This call is a *prompt*
    call: the prompt rule applies to it.
``refeed`` (the original's)
    The original fed ``generated_ids[:, -1:]`` after replacing the cache, so the
    last prompt token is fed a second time, at the next position
    (``n``, or ``n_source`` after a whole replacement) in a new slot; that call
    is a decode step.

Calls are numbered ``t = 0 .. N-1``; call ``t`` samples token ``t``. The
layer masks of the patches and of the KV replacement are data: pass ``sweep``
to run a batch of ``K`` mask sets through ``jax.vmap`` in one compiled
prefill and step (rows become ``[K, R]``).
"""

from __future__ import annotations

import dataclasses
from functools import lru_cache, partial
from typing import Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from mtijax.config import ModelConfig
from mtijax.errors import MtijaxError
from mtijax.engine.loop import STOP_CHECK_EVERY
from mtijax.generate import Sampling, check_token_ids, pad_prompts, sample, stop_tokens
from mtijax.interventions import Patch, layer_mask
from mtijax.models import cache as kv_cache
from mtijax.models.decoder import Params, forward_hidden, unembed
from mtijax.patching.capture import Capture, capture, check_site
from mtijax.patching.kv import POLICIES, replace_kv
from mtijax.patching.positions import PositionRule, parse_positions, span_bounds
from mtijax.patching.spec import MODES, check_span, patch_spec, site_shape, to_patch

def bucketed(length: int) -> int:
    """Temporary: the old loop's rounding to 16 (replaced by the engine's layout)."""
    return -(-length // 16) * 16


DECODE_SOURCES = ("last", "mean", "trajectory", "hook")
FIRST_TOKEN = ("recompute", "refeed")
KV_KEY = "kv"
"""Key of the KV-replacement layer masks in ``sweep``."""


@dataclasses.dataclass(frozen=True)
class SitePatch:
    """A patch at one site during generation (see the module docstring).

    Attributes:
      site: activation site (``attn_v``, ``resid_pre``, ...).
      layers: patched layers.
      prompt: position rule over the target prompt (end-aligned source values), or None.
      decode: ``last``, ``mean``, ``trajectory``, ``hook`` or None.
      mode, coef: ``replace``, ``add`` (``h + coef * value``) or ``interpolate`` (``(1 - coef) h + coef value``).
      window: the ``hook`` rule's window (the original's 16).
    """

    site: str
    layers: tuple[int, ...]
    prompt: PositionRule | None = None
    decode: str | None = "last"
    mode: str = "replace"
    coef: float = 1.0
    window: int = 16


@dataclasses.dataclass(frozen=True)
class KVPatch:
    """Replace the target's prompt cache with the source's (``policy``: ``whole`` or ``last_min``; ``layers``:
    None for every layer)."""

    policy: str = "last_min"
    layers: tuple[int, ...] | None = None


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything patched in one generation: site patches, a KV replacement, and the first-token rule."""

    patches: tuple[SitePatch, ...] = ()
    kv: KVPatch | None = None
    first_token: str = "recompute"


@dataclasses.dataclass
class PatchedGeneration:
    """Generated tokens of every row (``rows`` = ``[R]``, or ``[K, R]`` for a sweep).

    Attributes:
      tokens: ``[*rows, N]`` int32; after a stop token a row holds the pad id.
      lengths: ``[*rows]`` tokens generated, the stop token included. stopped: ``[*rows]`` bool.
      first_logits: ``[V]`` (``[K, V]`` for a sweep) float32 logits of call 0, the next-token distribution
        right after patching (the same in every row: all rows share the prompt).
      trace: site -> ``[len(layers), *rows, N, *site_shape]``: the site at every call (``trace_layers[site]``).
      seeds: the seed of each row.
    """

    tokens: np.ndarray
    lengths: np.ndarray
    stopped: np.ndarray
    first_logits: np.ndarray
    trace: dict[str, np.ndarray]
    trace_layers: dict[str, tuple[int, ...]]
    seeds: tuple[int, ...]

    def ids(self, *row: int, keep_stop: bool = False) -> list[int]:
        """The generated ids of a row (``ids(r)``, or ``ids(k, r)`` for a sweep), without its stop token."""
        ids = self.tokens[row][: self.lengths[row]].tolist()
        return ids[:-1] if self.stopped[row] and not keep_stop else ids


@struct.dataclass
class StepPatch:
    """One site's patch at decode calls: ``first`` for call 0 and ``later[:, :, min(t, T - 1)]`` for call t.

    ``first [L, Bv, 1, ...]``, ``later [L, Bv, T, ...]`` (``Bv`` 1 or the rows), ``first_on``/``later_on``
    float32 0 or 1, ``coef`` float32, ``mode`` static (``replace``, ``add``, ``interpolate``).
    """

    first: jax.Array
    later: jax.Array
    first_on: jax.Array
    later_on: jax.Array
    coef: jax.Array
    mode: str = struct.field(pytree_node=False, default="replace")


class State(NamedTuple):
    """The decode loop's state (donated to each step). Call ``step`` feeds ``token [R]`` at ``position [R]``
    into cache slot ``slot``; ``first_logits [V]`` holds row 0's logits of call 0 once it has run."""

    cache: kv_cache.KVCache
    token: jax.Array
    position: jax.Array
    slot: jax.Array
    done: jax.Array
    out: jax.Array
    count: jax.Array
    step: jax.Array
    keys: jax.Array
    trace: dict[str, jax.Array]
    first_logits: jax.Array


def _call_patches(step_patches: Mapping[str, StepPatch], masks: Mapping[str, jax.Array], step: jax.Array
                  ) -> dict[str, Patch]:
    """This call's patches: ``first`` at call 0, ``later[:, :, min(step, T - 1)]`` after (data, not branches)."""
    patches = {}
    for site, sp in step_patches.items():
        later = jax.lax.dynamic_slice_in_dim(sp.later, jnp.minimum(step, sp.later.shape[2] - 1), 1, axis=2)
        value = jnp.where(step == 0, sp.first, later)
        on = jnp.where(step == 0, sp.first_on, sp.later_on)
        weight = masks[site] * on * (1.0 if sp.mode == "replace" else sp.coef)
        patches[site] = Patch(value, weight, "add" if sp.mode == "add" else "replace")
    return patches


def _step(config, params, state: State, stops, step_patches, masks, *, sampling: Sampling, trace: tuple) -> State:
    """Call ``state.step``: feed ``state.token`` at ``state.position`` into slot ``state.slot``, sample each row's
    next token, record the traced sites."""
    patches = _call_patches(step_patches, masks, state.step)
    sites = tuple(site for site, _ in trace)
    x, cache, captured = forward_hidden(config, params, state.token[:, None], state.position[:, None],
                                        cache=state.cache, write_index=state.slot, patches=patches, capture=sites,
                                        unroll=True)
    logits = unembed(config, params, x[:, -1])
    split = jax.vmap(jax.random.split)(state.keys)
    drawn = jax.vmap(lambda row, key: sample(row[None], key, sampling)[0])(logits, split[:, 1])
    token = jnp.where(state.done, config.pad_token_id, drawn)
    traced = {site: jax.lax.dynamic_update_slice_in_dim(
        state.trace[site], captured[site][jnp.asarray(layers)].astype(state.trace[site].dtype), state.step, axis=2)
        for site, layers in trace}
    return State(cache, token, state.position + 1, state.slot + 1, state.done | jnp.isin(token, stops),
                 state.out.at[:, state.step].set(token), state.count + (~state.done).astype(jnp.int32),
                 state.step + 1, split[:, 0], traced, jnp.where(state.step == 0, logits[0], state.first_logits))


def _start(config, params, tokens, positions, keys, prompt_specs, source_cache, masks, kv_mask, *, kv_policy,
           source_end, refeed, max_new_tokens, cache_length, trace) -> State:
    """Prefill the target prompt (prompt patches) and patch its cache; call 0 is the first step."""
    rows, width = tokens.shape
    cache = kv_cache.init_cache(config.num_layers, rows, cache_length, config.num_kv_heads, config.head_dim,
                                params["embed"].dtype)
    patches = {site: to_patch(spec.replace(layers=masks[site]), positions) for site, spec in prompt_specs.items()}
    _, cache, _ = forward_hidden(config, params, tokens, positions, cache=cache, write_index=0, patches=patches,
                                 unroll=True)
    if kv_policy is not None:
        cache = replace_kv(cache, source_cache, policy=kv_policy, layers=kv_mask, target_end=width,
                           source_end=source_end)
    last = cache.positions[:, width - 1]
    if not refeed:  # call 0 rewrites the last prompt slot: it must not also attend to the old entry there
        cache = cache._replace(positions=cache.positions.at[:, width - 1].set(-1))
    shapes = {site: (len(layers), rows, max_new_tokens, *site_shape(config, site)) for site, layers in trace}
    return State(cache, tokens[:, -1], last + 1 if refeed else last, jnp.int32(width if refeed else width - 1),
                 jnp.zeros((rows,), bool), jnp.full((rows, max_new_tokens), config.pad_token_id, jnp.int32),
                 jnp.zeros((rows,), jnp.int32), jnp.int32(0), keys,
                 {site: jnp.zeros(shape, params["embed"].dtype) for site, shape in shapes.items()},
                 jnp.zeros((config.vocab_size,), jnp.float32))


@lru_cache(maxsize=None)
def _compiled(kind: str, config: ModelConfig, swept: bool, **static):
    """The jitted (and, for a sweep, vmapped over the masks) prefill or step, for one set of static settings."""
    if kind == "start":  # params, tokens, positions, keys, prompt_specs, source_cache, masks, kv_mask
        fn = partial(_start, config, **static)
        return jax.jit(jax.vmap(fn, in_axes=(None,) * 6 + (0, 0)) if swept else fn)
    fn = partial(_step, config, **static)  # params, state, stops, step_patches, masks
    return jax.jit(jax.vmap(fn, in_axes=(None, 0, None, None, 0)) if swept else fn, donate_argnums=(1,))


def _check_plan(config: ModelConfig, plan: Plan) -> None:
    if plan.first_token not in FIRST_TOKEN:
        raise MtijaxError(f"unknown first-token rule {plan.first_token!r}; rules are {', '.join(FIRST_TOKEN)}")
    sites = [p.site for p in plan.patches]
    for p in plan.patches:
        check_site(config, p.site, patching=True)
        layer_mask(config.num_layers, p.layers)
        if p.decode is not None and p.decode not in DECODE_SOURCES:
            raise MtijaxError(f"unknown decode source {p.decode!r}; sources are {', '.join(DECODE_SOURCES)}")
        if p.mode not in MODES:
            raise MtijaxError(f"unknown patch mode {p.mode!r}; modes are {', '.join(MODES)}")
        if p.prompt is not None:
            parse_positions(p.prompt)
        if sites.count(p.site) > 1:
            raise MtijaxError(f"two patches at site {p.site!r}: give one per site (it may hold several layers)")
    if plan.kv is not None:
        if plan.kv.policy not in POLICIES:
            raise MtijaxError(f"unknown KV policy {plan.kv.policy!r}; policies are {', '.join(POLICIES)}")
        if plan.kv.layers is not None:
            layer_mask(config.num_layers, plan.kv.layers)


def _source_values(source: Capture, site: str) -> tuple[jax.Array, jax.Array]:
    """``(last, mean)`` of ``site`` over the source prompt, each ``[L, 1, 1, ...]``."""
    values = source.activations[site]
    real = (source.positions >= 0).astype(values.dtype).reshape(1, *source.positions.shape,
                                                                *(1,) * (values.ndim - 3))
    mean = jnp.sum(values * real, axis=2, keepdims=True) / jnp.sum(real, axis=2, keepdims=True)
    return values[:, :, -1:], mean


def _step_patch(p: SitePatch, source: Capture, target_length: int, source_length: int, first_token: str,
                trajectory: jax.Array | None) -> StepPatch:
    last, mean = _source_values(source, p.site)
    if p.decode == "trajectory":
        later, later_on = trajectory, 1.0
    elif p.decode == "hook":  # the original's rule: write the last `window` positions when the call has that many
        call_length = 1
        later, later_on = last, float(min(call_length, source_length) >= p.window)
    else:
        later, later_on = {"last": last, "mean": mean, None: jnp.zeros_like(last)}[p.decode], float(
            p.decode is not None)
    if first_token == "refeed":
        first, first_on = later[:, :, :1], later_on
    elif p.prompt is None:
        first, first_on = jnp.zeros_like(last), 0.0
    else:
        lo, hi = span_bounds(parse_positions(p.prompt), target_length)
        first, first_on = last, float(lo <= target_length - 1 < hi)
    return StepPatch(first, later, jnp.float32(first_on), jnp.float32(later_on), jnp.float32(p.coef), p.mode)


def _rows_keys(seeds: Sequence[int]) -> jax.Array:
    return jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.int32))


def generate_patched(config: ModelConfig, params: Params, target: Sequence[int], source: Sequence[int] | None = None,
                     plan: Plan = Plan(), *, seeds: Sequence[int] = (0,), max_new_tokens: int = 32,
                     sampling: Sampling = Sampling(), stop_ids: Sequence[int] | None = None,
                     trace: Mapping[str, Sequence[int]] | None = None,
                     trajectory: PatchedGeneration | None = None,
                     sweep: Mapping[str, jax.Array] | None = None) -> PatchedGeneration:
    """Generate ``max_new_tokens`` from ``target`` in one row per seed, patched from ``source`` by ``plan``.

    Args:
      target, source: prompt token ids (the source is needed when the plan patches anything).
      trace: site -> layers to record at every call (``PatchedGeneration.trace``), e.g. ``attn_v`` for R_V.
      trajectory: the source's own traced generation for ``decode="trajectory"`` (same seeds and
        ``max_new_tokens``); made here when not given.
      sweep: site (or ``"kv"``) -> ``[K, L]`` layer masks replacing the plan's layers, run as a ``jax.vmap``.
    """
    _check_plan(config, plan)
    if max_new_tokens < 1:
        raise MtijaxError(f"max-new-tokens must be >= 1, got {max_new_tokens}")
    seeds = tuple(int(s) for s in seeds)
    if not seeds:
        raise MtijaxError("give at least one seed (one row per seed)")
    needs_source = bool(plan.patches) or plan.kv is not None
    if needs_source and not source:
        raise MtijaxError("this plan patches from a source prompt; give one")
    check_token_ids(config, [*target, *(source or ())])
    if len(target) < 1:
        raise MtijaxError("the target prompt needs at least one token")
    rows = len(seeds)
    target_width = bucketed(len(target))
    if plan.kv is not None and plan.kv.policy == "whole":
        target_width = max(target_width, bucketed(len(source)))
    tokens = np.full((rows, target_width), config.pad_token_id, np.int32)
    positions = np.full((rows, target_width), -1, np.int32)
    tokens[:, target_width - len(target):] = list(target)
    positions[:, target_width - len(target):] = np.arange(len(target))
    refeed = plan.first_token == "refeed"
    cache_length = bucketed(target_width + max_new_tokens + 1)
    stops = jnp.asarray(stop_tokens(config, stop_ids))

    source_capture, source_end, source_cache = None, 0, None
    if needs_source:
        s_tokens, s_positions, _ = pad_prompts([list(source)], config.pad_token_id, bucketed(len(source)))
        sites = sorted({p.site for p in plan.patches})
        source_capture = capture(config, params, s_tokens, s_positions, sites=sites)
        source_end, source_cache = s_tokens.shape[1], source_capture.cache
        if plan.kv is not None and plan.kv.policy == "whole" and plan.kv.layers is not None and \
                len(plan.kv.layers) < config.num_layers and len(source) != len(target):
            raise MtijaxError("whole-cache replacement of some layers only needs prompts of the same length; use "
                              "policy last_min")
    if any(p.decode == "trajectory" for p in plan.patches) and trajectory is None:
        trace_sites = {p.site: p.layers for p in plan.patches if p.decode == "trajectory"}
        trajectory = generate_patched(config, params, source, None, Plan(first_token=plan.first_token), seeds=seeds,
                                      max_new_tokens=max_new_tokens, sampling=sampling, stop_ids=stop_ids,
                                      trace=trace_sites)

    prompt_specs, step_patches, masks = {}, {}, {}
    for p in plan.patches:
        masks[p.site] = layer_mask(config.num_layers, p.layers)
        if p.prompt is not None:
            spec = patch_spec(config, p.site, p.layers, source_capture, positions=p.prompt, mode=p.mode,
                              coef=p.coef, align="end")
            check_span(spec, positions[:1])
            prompt_specs[p.site] = spec
        table = None
        if p.decode == "trajectory":
            table = _trajectory_table(config, trajectory, p, seeds, max_new_tokens)
        step_patches[p.site] = _step_patch(p, source_capture, len(target), len(source), plan.first_token, table)
    kv_mask = layer_mask(config.num_layers, plan.kv.layers) if plan.kv and plan.kv.layers is not None else \
        jnp.ones((config.num_layers,), jnp.float32)
    trace_spec = tuple(sorted((site, tuple(sorted(set(int(l) for l in layers))))
                              for site, layers in (trace or {}).items()))
    for site, layers in trace_spec:
        check_site(config, site)
        layer_mask(config.num_layers, layers)

    swept = sweep is not None
    if swept:
        masks, kv_mask = _sweep_masks(config, masks, kv_mask, sweep, plan)
    start = _compiled("start", config, swept, kv_policy=plan.kv.policy if plan.kv else None, source_end=source_end,
                      refeed=refeed, max_new_tokens=max_new_tokens, cache_length=cache_length, trace=trace_spec)
    step = _compiled("step", config, swept, sampling=sampling, trace=trace_spec)
    state = start(params, jnp.asarray(tokens), jnp.asarray(positions), _rows_keys(seeds), prompt_specs, source_cache,
                  masks, kv_mask)
    for index in range(max_new_tokens):
        if index and index % STOP_CHECK_EVERY == 0 and bool(np.asarray(state.done).all()):
            break
        state = step(params, state, stops, step_patches, masks)
    return PatchedGeneration(np.asarray(state.out), np.asarray(state.count), np.asarray(state.done),
                             np.asarray(state.first_logits), {site: np.asarray(v) for site, v in state.trace.items()},
                             dict(trace_spec), seeds)


def _trajectory_table(config: ModelConfig, trajectory: PatchedGeneration, p: SitePatch, seeds: tuple[int, ...],
                      max_new_tokens: int) -> jax.Array:
    """The source's traced generation as ``[L, R, N, ...]`` (zeros at layers not traced)."""
    if trajectory.seeds != seeds or trajectory.tokens.shape[-1] != max_new_tokens:
        raise MtijaxError("the trajectory must come from the source run with the same seeds and max-new-tokens")
    layers = trajectory.trace_layers.get(p.site, ())
    missing = [l for l in p.layers if l not in layers]
    if missing:
        raise MtijaxError(f"the trajectory has no {p.site} at layer {missing[0]}")
    values = jnp.asarray(trajectory.trace[p.site])
    return jnp.zeros((config.num_layers, *values.shape[1:]), values.dtype).at[jnp.asarray(layers)].set(values)


def _sweep_masks(config: ModelConfig, masks: dict, kv_mask: jax.Array, sweep: Mapping[str, jax.Array], plan: Plan):
    unknown = [k for k in sweep if k != KV_KEY and k not in masks]
    if unknown:
        raise MtijaxError(f"sweep over {unknown[0]!r}, which the plan does not patch")
    if KV_KEY in sweep and plan.kv is None:
        raise MtijaxError("sweep over kv layers needs a plan with a KV replacement")
    sizes = {np.shape(v)[0] for v in sweep.values()}
    if len(sizes) != 1 or any(np.ndim(v) != 2 or np.shape(v)[1] != config.num_layers for v in sweep.values()):
        raise MtijaxError(f"sweep masks must all be [K, {config.num_layers}] with the same K")
    k = sizes.pop()
    masks = {site: jnp.asarray(sweep[site], jnp.float32) if site in sweep else jnp.broadcast_to(m, (k, len(m)))
             for site, m in masks.items()}
    kv_mask = jnp.asarray(sweep[KV_KEY], jnp.float32) if KV_KEY in sweep else jnp.broadcast_to(kv_mask,
                                                                                              (k, len(kv_mask)))
    return masks, kv_mask
