"""Drivers: what a model's hidden states present to the spiking units, as frames ``[S, width]`` float32.

* ``embeddings`` (the seed's input): the model's token embeddings of the
  prompt (as its first layer receives them, so Gemma's ``sqrt(D)`` scale
  included), mean-pooled into one frame held for every tick.
* ``SITE:L`` (e.g. ``resid_post:6``; ``resid:L`` is short for it): the
  activation captured at that site of layer ``L`` by ``mtijax.forward``,
  one frame per token, presented token by token over the ticks.

Every frame is L2-normalised unless ``normalise=False`` (the seed's fix for
its "blackhole"). A leading BOS token is fed to the model (Gemma needs it)
but never presented: frames come from the prompt's own tokens. Frames are
cast to float32 here, explicitly, whatever the model's dtype.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from mtijax.config import ModelConfig
from mtijax.errors import MtijaxError
from mtijax.interventions import SITES
from mtijax.models.decoder import family, forward


class DriverSpec(NamedTuple):
    """``site`` is ``"embeddings"`` or an activation site; ``layer`` is None for embeddings."""

    site: str
    layer: int | None


def parse_driver(spec: str, num_layers: int | None = None) -> DriverSpec:
    """``"embeddings"``, ``"resid:L"`` or ``"SITE:L"`` -> :class:`DriverSpec` (checked against ``num_layers``)."""
    if spec == "embeddings":
        return DriverSpec("embeddings", None)
    site, _, layer = spec.partition(":")
    site = "resid_post" if site == "resid" else site
    if site not in SITES or site == "router_logits":
        raise MtijaxError(f"unknown driver {spec!r}: use embeddings, resid:L or SITE:L with a site of "
                          f"{', '.join(s for s in SITES if s != 'router_logits')}")
    try:
        index = int(layer)
    except ValueError:
        raise MtijaxError(f"driver {spec!r} needs a layer number, e.g. {site}:0") from None
    if num_layers is not None and not 0 <= index < num_layers:
        raise MtijaxError(f"driver {spec!r}: layer {index} is out of range 0..{num_layers - 1}")
    return DriverSpec(site, index)


def l2_normalise(x: jax.Array) -> jax.Array:
    """Each row over its last axis divided by its L2 norm (an all-zero row stays zero)."""
    norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
    return jnp.where(norm > 0, x / jnp.where(norm > 0, norm, 1), x)


def _prompt_tokens(config: ModelConfig, token_ids: Sequence[int]) -> tuple[list[int], int]:
    """The ids to run and how many leading ids (a BOS) are not presented."""
    ids = [int(t) for t in token_ids]
    skip = 1 if ids and config.bos_token_id is not None and ids[0] == config.bos_token_id else 0
    if len(ids) <= skip:
        raise MtijaxError("a prompt has no tokens to present (empty, or only BOS)")
    bad = [t for t in ids if not 0 <= t < config.vocab_size]
    if bad:
        raise MtijaxError(f"token id {bad[0]} is out of range for a vocabulary of {config.vocab_size}")
    return ids, skip


def embedding_driver(config: ModelConfig, params: dict[str, Any], token_ids: Sequence[int], *,
                     normalise: bool = True) -> jax.Array:
    """The mean-pooled token embedding of a prompt, ``[1, D]`` float32 (L2-normalised unless told not to)."""
    ids, skip = _prompt_tokens(config, token_ids)
    rows = family(config).embed(config, params, jnp.asarray([ids[skip:]], jnp.int32))[0]
    frame = jnp.mean(rows.astype(jnp.float32), axis=0, keepdims=True)
    return l2_normalise(frame) if normalise else frame


@functools.partial(jax.jit, static_argnames=("config", "site"))
def _capture(config, params, tokens, site):
    return forward(config, params, tokens, capture=(site,)).captured[site]


def activation_driver(config: ModelConfig, params: dict[str, Any], token_ids: Sequence[int],
                      site: str = "resid_post", layer: int = 0, *, normalise: bool = True) -> jax.Array:
    """One frame per token ``[S, width]`` float32: ``site`` of ``layer`` (flattened over heads), L2-normalised."""
    parse_driver(f"{site}:{layer}", config.num_layers)
    ids, skip = _prompt_tokens(config, token_ids)
    captured = _capture(config, params, jnp.asarray([ids], jnp.int32), site)  # [L, 1, S, ...]
    frames = captured[layer, 0, skip:].reshape(len(ids) - skip, -1).astype(jnp.float32)
    return l2_normalise(frames) if normalise else frames


def make_driver(config: ModelConfig, params: dict[str, Any], token_ids: Sequence[int], spec: str | DriverSpec,
                *, normalise: bool = True) -> jax.Array:
    """The frames of one prompt for a driver spec string (see the module docstring)."""
    spec = parse_driver(spec, config.num_layers) if isinstance(spec, str) else spec
    if spec.site == "embeddings":
        return embedding_driver(config, params, token_ids, normalise=normalise)
    return activation_driver(config, params, token_ids, spec.site, spec.layer, normalise=normalise)
