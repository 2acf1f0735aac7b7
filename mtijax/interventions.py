"""Named activation sites: capture them, replace them, add to them.

Every block of a decoder passes its activations through named *sites*. A
forward call can ask for any subset of sites to be captured (returned stacked
over layers) and can carry a :class:`Patch` per site that replaces or adds to
the activation there. Patches are data scanned alongside the parameters, so
which layers are patched is a mask, not a Python branch: one compiled forward
serves every choice of layers, and a sweep over layers or strengths is a
``jax.vmap``.

Sites of a Gemma 3 block, in the order the block reaches them
(``B`` batch, ``S`` tokens in this call, ``D`` hidden, ``N``/``K`` query/kv
heads, ``H`` head_dim):

============  ==============  ================================================
site          shape           what it is
============  ==============  ================================================
resid_pre     [B, S, D]       residual stream entering the block
attn_q        [B, S, N, H]    q-projection output, before q-norm and RoPE
attn_k        [B, S, K, H]    k-projection output, before k-norm and RoPE
attn_v        [B, S, K, H]    v-projection output (cached as V; OLMoE clips it first if clip_qkv)
attn_z        [B, S, N, H]    per-head attention output, before o-projection
attn_out      [B, S, D]       o-projection output, before the post-attention norm
resid_mid     [B, S, D]       residual stream after the attention half
mlp_out       [B, S, D]       down-projection output, before the post-MLP norm
resid_post    [B, S, D]       residual stream leaving the block
============  ==============  ================================================

A patched ``attn_k``/``attn_v`` changes what is written to the KV cache.

OLMoE blocks have the same sites (its q/k norms act on the whole projection,
after ``attn_q``/``attn_k``) and, between ``resid_mid`` and ``mlp_out``, its
router: ``router_logits [B, S, E]`` (patchable), and the capture-only
``router_experts [B, S, k]`` (int32, chosen experts, best first) and
``router_weights [B, S, k]`` (their mixing weights).

Llama-line blocks (``mtijax.models.llama``) have Gemma 3's sites; their ``attn_q``/``attn_k``/``attn_v``
include Qwen 2's biases and come before Qwen 3's q/k norms. Each architecture's list, in block order, is
its record's ``sites`` (``mtijax.models.architectures``); :data:`SITES` and :data:`ROUTING` here are derived
from those lists.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
from flax import struct

from mtijax.errors import MtijaxError


@functools.cache
def _sites() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Every registered architecture's sites (in block order, each once) and its capture-only ones."""
    from mtijax.models.architectures import ARCHITECTURES  # the families import this module for Sites

    merged: list[str] = []
    for arch in ARCHITECTURES.values():  # each new name goes right after its predecessor in its block
        for i, name in enumerate(arch.sites):
            if name not in merged:
                merged.insert(merged.index(arch.sites[i - 1]) + 1 if i else 0, name)
    sites = tuple(merged)
    routing = tuple(dict.fromkeys(name for arch in ARCHITECTURES.values() for name in arch.capture_only))
    return tuple(n for n in sites if n not in routing), routing


def __getattr__(name: str) -> tuple[str, ...]:
    """``SITES``: the sites that can be captured and patched in some architecture; ``ROUTING``: the
    mixture-of-experts decisions, captured, never patched (patch ``router_logits`` to change them). Both are
    derived from the architecture records (``Architecture.sites``, ``Architecture.capture_only``), the one
    list of each family's sites."""
    if name == "SITES":
        return _sites()[0]
    if name == "ROUTING":
        return _sites()[1]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@struct.dataclass
class Patch:
    """A per-layer replacement of, or addition to, one site's activation.

    Attributes:
      value: ``[L, B, S, *site_shape]`` (or anything that broadcasts to it per layer).
      mask: ``[L]`` or ``[L, B, S]`` weights. With ``mode="replace"`` the site
        becomes ``(1 - m) * h + m * value`` (so 1 replaces, 0 leaves ``h``
        untouched, bit for bit, and fractions blend); with ``mode="add"`` it
        becomes ``h + m * value``.
      mode: ``"replace"`` or ``"add"`` (static: part of the compiled function).
    """

    value: jax.Array
    mask: jax.Array
    mode: str = struct.field(pytree_node=False, default="replace")


@struct.dataclass
class RouterHook:
    """A replacement of a mixture-of-experts router's logits, with per-layer params and a state that persists
    from one forward call to the next (the spiking gate's membranes, ``mtijax.snn.gate``).

    Attributes:
      params: a pytree whose leaves are ``[L, ...]`` (layer ``l`` gets ``leaf[l]``).
      state: a pytree whose leaves are ``[L, B, ...]``: the state before this call; the forward returns the
        state after it (``ForwardOutput.router_state``), which the next incremental call takes.
      fn: ``fn(logits [B, S, E] float32, positions [B, S], params_l, state_l) -> (routing_logits [B, S, E],
        state_l)``, a static function (part of the compiled program). Padding (position -1) must leave the
        state alone.
      init: ``init(params, batch) -> state``, the state before any token (static).
    """

    params: Any
    state: Any
    fn: Callable = struct.field(pytree_node=False)
    init: Callable = struct.field(pytree_node=False)

    def start(self, batch: int) -> "RouterHook":
        """This hook with the state before any token, for ``batch`` rows."""
        return self.replace(state=self.init(self.params, batch))


def layer_mask(num_layers: int, layers: Iterable[int]) -> jax.Array:
    """A ``[L]`` float32 mask that is 1 at ``layers`` and 0 elsewhere."""
    chosen = list(layers)
    bad = [l for l in chosen if not 0 <= l < num_layers]
    if bad:
        raise MtijaxError(f"layer {bad[0]} is out of range: the model has layers 0..{num_layers - 1}")
    return jnp.zeros((num_layers,), jnp.float32).at[jnp.asarray(chosen, jnp.int32)].set(1.0)


def check_sites(names: Iterable[str], *, patching: bool = False, architecture: Any = None) -> tuple[str, ...]:
    """Validate site names (for capture, or for patches: ``patching``); returns them as a sorted tuple (a jit
    static). With ``architecture`` (a ``mtijax.models.architecture.Architecture``), the names must also be
    among that family's sites: the one check every front-end runs, against the record's one site list."""
    if isinstance(names, str):
        raise MtijaxError(f"sites must be a collection of names, got the string {names!r}")
    names = tuple(sorted(set(names)))
    if architecture is not None:
        capture_only = architecture.capture_only
        absent = [n for n in names if n not in architecture.sites]
        if absent:
            raise MtijaxError(f"{architecture.name} has no activation site {absent[0]!r}; its sites are "
                              f"{', '.join(architecture.sites)}")
    else:
        patchable, capture_only = _sites()
        unknown = [n for n in names if n not in patchable + capture_only]
        if unknown:
            raise MtijaxError(f"unknown activation site {unknown[0]!r}; sites are "
                              f"{', '.join(patchable + capture_only)}")
    routing = [n for n in names if n in capture_only]
    if patching and routing:
        raise MtijaxError(f"activation site {routing[0]!r} can be captured but not patched; patch router_logits")
    return names


def apply_patch(h: jax.Array, patch: Patch | None) -> jax.Array:
    """Apply one layer's slice of a patch (``value [B, S, ...]``, ``mask []`` or ``[B, S]``) to ``h``."""
    if patch is None:
        return h
    m = patch.mask.astype(jnp.float32)
    m = m.reshape(m.shape + (1,) * (h.ndim - m.ndim))
    value = jnp.broadcast_to(patch.value, h.shape).astype(jnp.float32)
    h32 = h.astype(jnp.float32)
    if patch.mode == "add":
        out = h32 + m * value
    elif patch.mode == "replace":
        out = (1.0 - m) * h32 + m * value
    else:
        raise MtijaxError(f"unknown patch mode {patch.mode!r} (replace or add)")
    return jnp.where(m == 0, h, out.astype(h.dtype))


class Sites:
    """What one block call does at its sites: patch with this layer's slice, then record if asked; and the
    router hook's layer slice ``(fn, params_l, state_l)``, if any, which :meth:`route` applies."""

    def __init__(self, capture: tuple[str, ...], patches: Mapping[str, Patch] | None,
                 router: tuple[Callable, Any, Any] | None = None):
        self.capture = capture
        self.patches = patches or {}
        self.captured: dict[str, jax.Array] = {}
        self.visited: set[str] = set()
        self.router = router
        self.router_state: Any = None if router is None else router[2]

    def route(self, logits: jax.Array, positions: jax.Array) -> jax.Array:
        """The logits a mixture-of-experts layer routes on: ``logits [B, S, E]`` through the router hook (and its
        new state kept in ``router_state``), or unchanged without one."""
        self.visited.add("router")
        if self.router is None:
            return logits
        fn, params, state = self.router
        routed, self.router_state = fn(logits.astype(jnp.float32), positions, params, state)
        return routed

    def __call__(self, name: str, h: jax.Array) -> jax.Array:
        h = apply_patch(h, self.patches.get(name))
        return self.record(name, h)

    def record(self, name: str, value: jax.Array) -> jax.Array:
        """Keep ``value`` if ``name`` is captured (no patching: for the routing decisions)."""
        self.visited.add(name)
        if name in self.capture:
            self.captured[name] = value
        return value
