"""Decode-time weight layout: the q, k and v projections of every layer as one matrix.

At batch 1 a decode step is three small matrix-vector products per layer for
q, k and v; XLA runs them as three kernels that each reach a fraction of the
memory bandwidth. Concatenated, they are one product over the same bytes
(``experiments/probe_gemv.py``: 2.4x faster on an H100 for Gemma 3 12B shapes).
The block takes either layout by name (``layout="fused_qkv"``, a static argument
of ``forward`` and the block, never guessed from the dict), so the fused params
are an internal speed detail of generation: the documented params pytree, and
everything that captures, patches or blends weights, keeps
``q_proj``/``k_proj``/``v_proj``.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

Params = dict[str, Any]
LAYOUT = "fused_qkv"
"""The name of this layout, for ``forward(layout=...)`` and the block."""


def fuse_qkv(params: Params) -> Params:
    """``params`` with ``layers/attn/{q,k,v}_proj [L, D, *]`` replaced by ``layers/attn/qkv_proj [L, D, N*H + 2*K*H]``.

    ``params`` must be in the documented layout. Returns new dicts; the arrays that are not fused are the same
    objects.
    """
    attn = params["layers"]["attn"]
    fused = {name: value for name, value in attn.items() if name not in ("q_proj", "k_proj", "v_proj")}
    fused["qkv_proj"] = jnp.concatenate([attn["q_proj"], attn["k_proj"], attn["v_proj"]], axis=-1)
    return {**params, "layers": {**params["layers"], "attn": fused}}


def fuse_qkv_shapes(shapes: Params) -> Params:
    """The shapes of :func:`fuse_qkv`'s output from the documented ``param_shapes`` (tuples as leaves)."""
    attn = shapes["layers"]["attn"]
    fused = {name: shape for name, shape in attn.items() if name not in ("q_proj", "k_proj", "v_proj")}
    fused["qkv_proj"] = (*attn["q_proj"][:-1], sum(attn[name][-1] for name in ("q_proj", "k_proj", "v_proj")))
    return {**shapes, "layers": {**shapes["layers"], "attn": fused}}
