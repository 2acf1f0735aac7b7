"""Generation with KV-cache patching and persistent patches applied at every decode step: a front-end of the
generation engine (``mtijax.engine``).

One target prompt is generated in ``R`` rows, one per seed (row ``r`` samples
with its own key ``key(seeds[r])``, so a run is reproducible whatever else is in the
batch). A :class:`Plan` says what is patched from the source (champion) prompt:

* ``kv``: after the target's prompt is processed, its cache is patched with
  the source's (:func:`mtijax.patching.kv.replace_kv`: ``whole`` or the
  original's ``last_min``, all or chosen layers): the engine's ``CacheEdit``.
* ``patches``: one :class:`SitePatch` per site, acting at two kinds of calls:

  - the prompt (``prompt``: a position rule; source values end-aligned, so the
    target's last prompt token gets the source's last prompt token's value):
    the engine's ``prompt_patches`` on the prefill slots;
  - every decode step (``decode``; the engine's ``step_patches``), the value chosen from
    ``last`` (the source's activation at its last prompt token),
    ``mean`` (its mean over the source prompt),
    ``trajectory`` (the source's own generation, run first with the same
    seeds and settings: step ``t`` of the target gets step ``t`` of the
    source, in lockstep), or
    ``hook``: the original's forward hooks, which overwrote the last ``window``
    positions of a call only when the call had at least ``window`` tokens; a
    decode step has one, so with ``window > 1`` they never fire (as the
    original ran). ``None`` leaves decode steps alone.

The source's values and cache come from a capture of the source prompt (laid out in whole prefill chunks)
under the same extra ``interventions`` as the target (their static patches, grafts and router hook), so
both runs are of one model.

How the first new token comes (``first_token``):

``recompute`` (default)
    The engine's own flow: the prefill holds the target's prompt but its last token, and call 0 feeds that
    token at its own position (after a ``whole`` replacement: the source's last position), attending to
    the (patched) cache; its logits give the first token. The KV replacement covers call 0's slot as the
    prompt's last, and the source's entry put there is dropped (call 0 writes its own). Without patches
    this is exactly plain generation; with a whole-cache replacement by a source ending in the same
    token, it is exactly the source's generation (tested). Call 0 is a *prompt* call: the prompt rule
    applies to it.
``refeed`` (the original's)
    The original fed ``generated_ids[:, -1:]`` after replacing the cache, so the
    last prompt token is fed a second time, at the next position
    (``n``, or ``n_source`` after a whole replacement) in a new slot; that call
    is a decode step.

Calls are numbered ``t = 0 .. N-1``; call ``t`` samples token ``t``. The
layer masks of the patches and of the KV replacement are data: pass ``sweep``
to run a batch of ``K`` mask sets through ``jax.vmap`` in one compiled
prefill and step (the engine's ``sweep_axes``; rows become ``[K, R]``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mtijax.config import ModelConfig
from mtijax.engine import loop
from mtijax.engine.interventions import CacheEdit, Interventions, StepPatch, check
from mtijax.engine.ladder import Ladder, default_ladder
from mtijax.engine.request import check_token_ids, lay_out, pad_prompts
from mtijax.engine.sampling import Plain, Sampling
from mtijax.errors import MtijaxError
from mtijax.interventions import Patch, layer_mask
from mtijax.models import cache as kv_cache
from mtijax.models.decoder import Params
from mtijax.models.fused import LAYOUT as FUSED, fuse_qkv
from mtijax.patching.capture import Capture, capture, check_site
from mtijax.patching.kv import POLICIES, replace_kv
from mtijax.patching.positions import PositionRule, parse_positions, span_bounds
from mtijax.patching.spec import MODES, PatchSpec, check_span, patch_spec, to_patch

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


@dataclasses.dataclass(frozen=True)
class KVEdit:
    """The plan's KV replacement as the engine's cache edit: ``fn(cache, (source cache, layer mask [L]), W)``,
    applied after the prefill (``W``: its slots). ``recompute``: call 0 writes the target's last prompt token
    at slot ``W``, so the replacement ends after slot ``W`` (given the position call 0 takes) and slot ``W``
    is emptied afterwards (call 0 writes it; its position, the one after the rest, is found by the engine)."""

    policy: str
    recompute: bool

    def __call__(self, cache: kv_cache.KVCache, data: tuple[kv_cache.KVCache, jax.Array],
                 width: jax.Array) -> kv_cache.KVCache:
        source, layers = data
        if not self.recompute:
            return replace_kv(cache, source, policy=self.policy, layers=layers, target_end=width)
        last = jnp.max(cache.positions, axis=1) + 1
        cache = cache._replace(positions=cache.positions.at[:, width].set(last))
        cache = replace_kv(cache, source, policy=self.policy, layers=layers, target_end=width + 1)
        return cache._replace(positions=cache.positions.at[:, width].set(-1))


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


def _check_extra(interventions: Interventions | None, plan: Plan) -> Interventions:
    """The extra interventions (empty if None); raises on the fields the plan and ``trace`` own."""
    extra = Interventions() if interventions is None else interventions
    if extra.prompt_patches or extra.cache_edit is not None or extra.trace:
        raise MtijaxError("extra interventions of patched generation take patches, step patches, grafts and a "
                          "router hook; give prompt patches and the KV replacement in the plan, traced sites as "
                          "trace=")
    both = sorted(set(extra.step_patches) & {p.site for p in plan.patches})
    if both:
        raise MtijaxError(f"site {both[0]!r} has a step patch and a plan patch; give one per site")
    return extra


def _source_values(source: Capture, site: str) -> tuple[jax.Array, jax.Array]:
    """``(last, mean)`` of ``site`` over the source prompt, each ``[L, 1, 1, ...]``."""
    values = source.activations[site]
    real = (source.positions >= 0).astype(values.dtype).reshape(1, *source.positions.shape,
                                                                *(1,) * (values.ndim - 3))
    mean = jnp.sum(values * real, axis=2, keepdims=True) / jnp.sum(real, axis=2, keepdims=True)
    return values[:, :, -1:], mean


def _weight(p: SitePatch) -> float:
    """The factor of a patch's layer mask: ``coef`` for ``add`` and ``interpolate``, 1 for ``replace``."""
    return 1.0 if p.mode == "replace" else p.coef


def _step_patch(p: SitePatch, source: Capture, target_length: int, source_length: int, first_token: str,
                trajectory: jax.Array | None, mask: jax.Array) -> StepPatch:
    """The engine's step patch of ``p``: call 0's value (a prompt call with ``recompute``, a decode step with
    ``refeed``), then the decode source's (call ``t`` gets ``later[min(t, T - 1)]``). ``mask``: ``[L]`` (or
    ``[K, L]`` for a sweep) layer weights."""
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
    first = jnp.broadcast_to(first, (first.shape[0], later.shape[1], *first.shape[2:])).astype(later.dtype)
    values = jnp.concatenate([first, later[:, :, 1:] if later.shape[2] > 1 else later], axis=2)
    on = jnp.asarray([first_on] + [later_on] * (values.shape[2] - 1), jnp.float32)
    return StepPatch(values, on, mask * _weight(p), "add" if p.mode == "add" else "replace")


def _prompt_patch(spec: PatchSpec, layers: jax.Array, positions: np.ndarray, width: int) -> Patch:
    """``spec`` over the target prompt at ``positions [1, W']`` (the prefill slots, then call 0's with
    ``recompute``), cut to the ``width`` prefill slots; ``layers [L]`` (or ``[K, L]``: a mask per variant)."""
    positions = jnp.asarray(positions)
    full = to_patch(spec, positions)

    def mask(m: jax.Array) -> jax.Array:
        return to_patch(spec.replace(layers=m), positions).mask[:, :, :width]

    return Patch(full.value[:, :, :width], mask(layers) if layers.ndim == 1 else jax.vmap(mask)(layers), full.mode)


def _first_logits_only(steps: Iterator[tuple[loop.State, loop.Record]]) -> Iterator[tuple[loop.State, loop.Record]]:
    """The engine's steps with every call's logits but call 0's dropped."""
    for index, (state, record) in enumerate(steps):
        yield state, (record if index == 0 else record._replace(logits=None))


def generate_patched(config: ModelConfig, params: Params, target: Sequence[int], source: Sequence[int] | None = None,
                     plan: Plan = Plan(), *, seeds: Sequence[int] = (0,), max_new_tokens: int = 32,
                     sampling: Sampling = Sampling(), stop_ids: Sequence[int] | None = None,
                     trace: Mapping[str, Sequence[int]] | None = None,
                     trajectory: PatchedGeneration | None = None,
                     sweep: Mapping[str, jax.Array] | None = None,
                     interventions: Interventions | None = None, ladder: Ladder | None = None) -> PatchedGeneration:
    """Generate ``max_new_tokens`` from ``target`` in one row per seed, patched from ``source`` by ``plan``.

    Args:
      target, source: prompt token ids (the source is needed when the plan patches anything).
      trace: site -> layers to record at every call (``PatchedGeneration.trace``), e.g. ``attn_v`` for R_V.
      trajectory: the source's own traced generation for ``decode="trajectory"`` (same seeds and
        ``max_new_tokens``); made here when not given.
      sweep: site (or ``"kv"``) -> ``[K, L]`` layer masks replacing the plan's layers, run as a ``jax.vmap``.
      interventions: more of the engine's interventions, composed with the plan: static patches, step
        patches (at sites the plan does not patch), grafts (``mtijax.fusion.decode.grafts``) and a router hook.
        They act on the target's generation, the source's capture and the trajectory run alike.
      ladder: the engine's compile ladder (default: ``mtijax.engine.ladder.default_ladder``).
    """
    _check_plan(config, plan)
    extra = _check_extra(interventions, plan)
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
    trace_spec = tuple(sorted((site, tuple(sorted(set(int(l) for l in layers))))
                              for site, layers in (trace or {}).items()))
    for site, layers in trace_spec:
        check_site(config, site)
        layer_mask(config.num_layers, layers)
    ladder = ladder or default_ladder(rolling=plan.kv is None)  # a KV edit keeps the full layout
    recompute = plan.first_token == "recompute"

    source_capture, min_width = None, 0
    if needs_source:
        s_tokens, s_positions, _ = pad_prompts([list(source)], config.pad_token_id, ladder.prefill_width(len(source)))
        sites = sorted({p.site for p in plan.patches})
        source_capture = capture(config, params, s_tokens, s_positions, sites=sites,
                                 interventions=Interventions(extra.patches, grafts=extra.grafts, router=extra.router))
        if plan.kv is not None and plan.kv.policy == "whole":
            min_width = s_tokens.shape[1] - int(recompute)  # the source's prompt area fits the target's
            if plan.kv.layers is not None and len(plan.kv.layers) < config.num_layers and len(source) != len(target):
                raise MtijaxError("whole-cache replacement of some layers only needs prompts of the same length; "
                                  "use policy last_min")
    if any(p.decode == "trajectory" for p in plan.patches) and trajectory is None:
        trace_sites = {p.site: p.layers for p in plan.patches if p.decode == "trajectory"}
        trajectory = generate_patched(config, params, source, None, Plan(first_token=plan.first_token), seeds=seeds,
                                      max_new_tokens=max_new_tokens, sampling=sampling, stop_ids=stop_ids,
                                      trace=trace_sites, interventions=interventions, ladder=ladder)

    request = lay_out(config, [list(target)] * len(seeds), max_new_tokens, ladder, stop_ids, refeed=not recompute,
                      min_width=min_width, edits_cache=plan.kv is not None)
    if plan.kv is not None:  # call 0's position: the one after the patched cache's (found on the device)
        request = request._replace(first_position=np.full_like(request.first_position, -1))
    prompt_positions = request.positions[:1]
    if recompute:
        prompt_positions = np.concatenate([prompt_positions, [[len(target) - 1]]], axis=1)

    masks = {p.site: layer_mask(config.num_layers, p.layers) for p in plan.patches}
    kv_mask = layer_mask(config.num_layers, plan.kv.layers) if plan.kv and plan.kv.layers is not None else \
        jnp.ones((config.num_layers,), jnp.float32)
    swept = {} if sweep is None else _sweep_masks(config, sweep, plan)
    masks.update({site: m for site, m in swept.items() if site != KV_KEY})
    kv_mask = swept.get(KV_KEY, kv_mask)

    prompt_patches, step_patches = {}, {}
    for p in plan.patches:
        if p.prompt is not None:
            spec = patch_spec(config, p.site, p.layers, source_capture, positions=p.prompt, mode=p.mode,
                              coef=p.coef, align="end")
            check_span(spec, prompt_positions)
            prompt_patches[p.site] = _prompt_patch(spec, masks[p.site], prompt_positions, request.width)
        table = None
        if p.decode == "trajectory":
            table = _trajectory_table(config, trajectory, p, seeds, max_new_tokens)
        step_patches[p.site] = _step_patch(p, source_capture, len(target), len(source), plan.first_token, table,
                                           masks[p.site])
    edit = None if plan.kv is None else CacheEdit((source_capture.cache, kv_mask), KVEdit(plan.kv.policy, recompute))
    combined = extra.replace(prompt_patches=prompt_patches, step_patches={**extra.step_patches, **step_patches},
                             cache_edit=edit, trace=trace_spec)
    check(combined, config)

    keys = jax.vmap(jax.random.key)(jnp.asarray(seeds + (0,) * (request.rows - len(seeds)), jnp.int32))
    steps = loop.run(config, fuse_qkv(params), request, policy=Plain(sampling), interventions=combined, keys=keys,
                     record_logits=True, layout=FUSED, sweep_axes=_sweep_axes(combined, swept) if swept else None)
    run = loop.collect(_first_logits_only(steps), request, config.pad_token_id)
    return PatchedGeneration(run.tokens, run.lengths, run.stopped, run.records[0].logits[..., 0, :],
                             _traces(run.records, trace_spec, max_new_tokens, bool(swept)), dict(trace_spec), seeds)


def _traces(records: Sequence[loop.Record], trace: tuple[tuple[str, tuple[int, ...]], ...], max_new_tokens: int,
            swept: bool) -> dict[str, np.ndarray]:
    """The engine's per-call traces as ``site -> [len(layers), *rows, N, ...]`` (zeros at calls not run, after
    every row stopped)."""
    lead = int(swept)
    out = {}
    for site, _ in trace:
        calls = np.stack([r.trace[site] for r in records], axis=lead + 2)
        shape = list(calls.shape)
        shape[lead + 2] = max_new_tokens
        full = np.zeros(shape, calls.dtype)
        full[(slice(None),) * (lead + 2) + (slice(0, len(records)),)] = calls
        out[site] = np.moveaxis(full, 0, 1) if swept else full
    return out


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


def _sweep_masks(config: ModelConfig, sweep: Mapping[str, jax.Array], plan: Plan) -> dict[str, jax.Array]:
    """The checked sweep: key -> ``[K, L]`` float32 masks."""
    sites = {p.site for p in plan.patches}
    unknown = [k for k in sweep if k != KV_KEY and k not in sites]
    if unknown:
        raise MtijaxError(f"sweep over {unknown[0]!r}, which the plan does not patch")
    if KV_KEY in sweep and plan.kv is None:
        raise MtijaxError("sweep over kv layers needs a plan with a KV replacement")
    sizes = {np.shape(v)[0] for v in sweep.values() if np.ndim(v)}
    if len(sizes) != 1 or any(np.ndim(v) != 2 or np.shape(v)[1] != config.num_layers for v in sweep.values()):
        raise MtijaxError(f"sweep masks must all be [K, {config.num_layers}] with the same K")
    return {key: jnp.asarray(v, jnp.float32) for key, v in sweep.items()}


def _sweep_axes(interventions: Interventions, swept: Mapping[str, jax.Array]) -> Any:
    """The engine's ``sweep_axes``: the swept layer masks (prompt and step patches, the KV edit's) on axis 0,
    everything else shared."""
    axes = jax.tree.map(lambda _: None, interventions)

    def on_mask(patches: dict) -> dict:
        return {site: a.replace(mask=0) if site in swept else a for site, a in patches.items()}

    axes = axes.replace(prompt_patches=on_mask(axes.prompt_patches), step_patches=on_mask(axes.step_patches))
    if KV_KEY in swept:
        axes = axes.replace(cache_edit=axes.cache_edit.replace(data=(None, 0)))
    return axes
