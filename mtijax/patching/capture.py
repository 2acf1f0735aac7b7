"""Capture a run: every named activation and the KV cache, in one jitted forward.

:func:`capture` returns a :class:`Capture` pytree::

    logits       [B, S, V]            float32, every position (or only the kept ones, see below)
    activations  {site: [L', B, S', *site_shape]}
    layers       the L' layers kept (sorted; all by default)
    positions    [B, S'] token positions of the kept slots (-1 on padding)
    cache        KVCache of every layer over the S slots (keys normed and rotated, as attention reads them)

Sites are those of ``mtijax.interventions`` (``resid_pre``, ``attn_q``/``k``/``v``,
``attn_z``, ``attn_out``, ``resid_mid``, ``mlp_out``, ``resid_post``, and OLMoE's
``router_logits``, ``router_experts``, ``router_weights``). ``layers`` and
``keep`` keep memory small: the other layers are never stored (a buffer is
carried through the layer scan) and the other positions are dropped inside the
block. The cache always holds every layer and slot: it is what KV patching needs.
"""

from __future__ import annotations

from functools import partial
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from mtijax.config import ModelConfig
from mtijax.engine.interventions import Graft, Interventions
from mtijax.errors import MtijaxError
from mtijax.generate import check_token_ids
from mtijax.interventions import check_sites
from mtijax.models import cache as kv
from mtijax.models.decoder import Params, family, forward
from mtijax.patching.positions import parse_positions, span_bounds


@struct.dataclass
class Capture:
    """A captured run (see the module docstring). ``layers`` is static."""

    logits: jax.Array
    activations: dict[str, jax.Array]
    positions: jax.Array
    cache: kv.KVCache
    layers: tuple[int, ...] = struct.field(pytree_node=False, default=())

    def layer(self, site: str, layer: int) -> jax.Array:
        """``[B, S', *site_shape]``: ``site`` at ``layer``."""
        self._check(site, [layer])
        return self.activations[site][self.layers.index(layer)]

    def full_layers(self, site: str, num_layers: int, needed: Sequence[int]) -> tuple[jax.Array, jax.Array]:
        """``(values [L, B, S', ...], positions [B, S'])``: ``site`` placed at its layer index, zeros at layers
        not captured; raises if a layer in ``needed`` was not captured."""
        self._check(site, needed)
        values = self.activations[site]
        if self.layers != tuple(range(num_layers)):
            values = jnp.zeros((num_layers, *values.shape[1:]), values.dtype).at[jnp.asarray(self.layers)].set(values)
        return values, self.positions

    def _check(self, site: str, layers: Sequence[int]) -> None:
        if site not in self.activations:
            held = ", ".join(sorted(self.activations))
            raise MtijaxError(f"the source capture has no site {site!r}; it holds {held}")
        missing = [l for l in layers if l not in self.layers]
        if missing:
            raise MtijaxError(f"the source capture has no layer {missing[0]} (it kept layers {list(self.layers)})")


def site_names(config: ModelConfig) -> tuple[str, ...]:
    """Every activation site of ``config``'s architecture, in block order."""
    return family(config).sites


def check_site(config: ModelConfig, site: str, *, patching: bool = False) -> None:
    """Raise a one-line error if ``config``'s architecture has no such site (or it cannot be patched)."""
    check_sites((site,), patching=patching, architecture=family(config))


def keep_slots(positions: np.ndarray, rule) -> np.ndarray:
    """``[B, S']`` slot indices of the tokens a position rule (see ``mtijax.patching.spec``) keeps in each row
    (``S'`` is the same for every row: ranges are clipped to the shortest prompt)."""
    positions = np.asarray(positions)
    span = parse_positions(rule)
    lengths = (positions >= 0).sum(-1)
    width = positions.shape[1]
    bounds = [span_bounds(span, int(n)) for n in lengths]
    count = min(hi - lo for lo, hi in bounds)
    if count < 1 or any(lo < 0 or hi > n for (lo, hi), n in zip(bounds, lengths)):
        raise MtijaxError(f"position rule {rule!r} reaches outside a prompt of {int(lengths.min())} tokens")
    return np.stack([np.arange(lo, lo + count) + width - n for (lo, _), n in zip(bounds, lengths)]).astype(np.int32)


def _graft_transform(graft: Graft, batch: int):
    """``graft`` as a residual transform of one whole call, from its initial carry."""
    return lambda h, positions: graft.module(graft.variables, h, positions, graft.module.init_carry(batch))[0]


@partial(jax.jit, static_argnames=("config", "sites", "layers"))
def _capture(config, params, tokens, positions, slots, sites, layers, interventions):
    transforms = {layer: _graft_transform(graft, tokens.shape[0]) for layer, graft in interventions.grafts.items()}
    out = forward(config, params, tokens, positions, keep_kv=True, capture=sites, capture_layers=layers,
                  capture_slots=slots, patches=interventions.patches, transforms=transforms,
                  router=None if interventions.router is None else interventions.router.replace(state=None))
    logits = out.logits if slots is None else jax.vmap(lambda row, index: row[index])(out.logits, slots)
    kept = positions if slots is None else jax.vmap(lambda row, index: row[index])(positions, slots)
    return out.captured, logits, kept, out.cache


def capture(config: ModelConfig, params: Params, tokens: jax.Array, positions: jax.Array | None = None, *,
            sites: Sequence[str] | None = None, layers: Sequence[int] | None = None, keep=None,
            interventions: Interventions | None = None) -> Capture:
    """Run ``tokens [B, S]`` (left-padded, ``positions`` -1 on padding; default ``0..S-1``) and capture it.

    Args:
      sites: sites to keep (default: every site of the architecture).
      layers: layers to keep (default: all).
      keep: a position rule (``"last"``, ``("last", 16)``, ``(start, stop)``; see ``mtijax.patching.spec``) for
        the token positions to keep, per row (default: all slots).
      interventions: capture the run of the model these change: their static ``patches``, ``grafts`` (each
        from its initial carry) and ``router`` hook (from its initial state) act on the call;
        the fields that only mean something during generation (prompt and step patches, a cache edit, a
        trace) must be empty.
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim != 2:
        raise MtijaxError(f"tokens must be [batch, length], got shape {tuple(tokens.shape)}")
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    positions = jnp.asarray(positions, jnp.int32)
    check_token_ids(config, tokens)
    sites = tuple(site_names(config)) if sites is None else tuple(sites)
    for site in sites:
        check_site(config, site)
    layers = tuple(range(config.num_layers)) if layers is None else tuple(sorted(set(int(l) for l in layers)))
    slots = None if keep is None else jnp.asarray(keep_slots(np.asarray(positions), keep))
    interventions = Interventions() if interventions is None else interventions
    if interventions.prompt_patches or interventions.step_patches or interventions.cache_edit or interventions.trace:
        raise MtijaxError("a capture takes static patches, grafts and a router hook only: prompt patches, step "
                          "patches, a cache edit and a trace are for generation")
    captured, logits, kept, cache = _capture(config, params, tokens, positions, slots, tuple(sorted(sites)),
                                             None if layers == tuple(range(config.num_layers)) else layers,
                                             interventions)
    return Capture(logits, captured, kept, cache, layers)
