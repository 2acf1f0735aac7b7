"""The fused model as one linen module: the base decoder and the fusion layers as its submodules.

``Fused(config, fusion_config)`` has two children: ``model``, the base model's module
(``mtijax.models.module(config)``, whose params are the documented params pytree), and ``layers``, one
:class:`~mtijax.fusion.layer.FusionLayer` per fused position, named by it. Its variables are therefore the
variables of ``mtijax.fusion.wrapper`` with the base params beside them::

    {"params": {"model": <documented base params>, "layers": {"6": {...}, "12": {...}}},
     "memory": {"layers": {"6": {"smf": {...}}}}}            # only for layers with an SMF bank

(:func:`fused_variables` builds them), and ``Fused(...).apply(variables, tokens, ...)`` computes what
``mtijax.fusion.fused_forward`` computes, through the same residual transforms. With ``store_memory`` apply
with ``mutable=["memory"]``. Training keeps using ``fused_forward`` with the base params closed over, so
``jax.grad`` sees only the fusion params; this module is for callers that want the whole fused model as one
Flax module.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtijax.config import ModelConfig
from mtijax.fusion.config import FusionConfig, check_against_model
from mtijax.fusion.layer import FusionLayer, LayerCarry
from mtijax.fusion.wrapper import Carry, FusedOutput, Variables, empty_carry
from mtijax.interventions import Patch, RouterHook
from mtijax.models.cache import KVCache
from mtijax.models.modules import module


def fused_variables(params: Mapping[str, Any], variables: Variables) -> Variables:
    """:class:`Fused`'s variables from the base ``params`` and the fusion ``variables`` of ``init_fusion`` or a
    checkpoint (both only referenced, not copied)."""
    out: Variables = {"params": {"model": params, **variables["params"]}}
    if variables.get("memory"):
        out["memory"] = variables["memory"]
    return out


class FusionLayers(nn.Module):
    """One :class:`FusionLayer` per position of ``fusion_config``, each a child named by its base layer."""

    fusion_config: FusionConfig

    @nn.compact
    def __call__(self, position: int, h: jax.Array, positions: jax.Array, carry: LayerCarry,
                 store_memory: bool = False) -> tuple[jax.Array, dict[str, jax.Array], LayerCarry, Any]:
        """The layer at ``position`` on ``h [B, S, D]``: ``(h', metrics, carry', memory)``, ``memory`` its memory
        collection after the call (None without an SMF bank)."""
        layer = FusionLayer(self.fusion_config, name=str(position))
        out, metrics, new_carry = layer(h, positions, carry, store_memory)
        return out, metrics, new_carry, layer.variables.get("memory")


class Fused(nn.Module):
    """The base model with fusion layers after the blocks ``fusion_config.positions`` (see the module docstring)."""

    config: ModelConfig
    fusion_config: FusionConfig

    def setup(self) -> None:
        check_against_model(self.fusion_config, self.config)
        self.model = module(self.config)
        self.layers = FusionLayers(self.fusion_config)

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None, *, cache: KVCache | None = None,
                 write_index: jax.Array | int = 0, carry: Carry | None = None, store_memory: bool = False,
                 patches: Mapping[str, Patch] | None = None, capture: tuple[str, ...] = (),
                 router: RouterHook | None = None, unroll: int | bool = 1, head: bool = True) -> FusedOutput:
        """``fused_forward`` (``head=False``: ``fused_hidden``, the last residual stream in ``logits``) with the
        same arguments after ``variables``."""
        b, s = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        carry = empty_carry(self.fusion_config, b) if carry is None else carry
        records: dict[int, tuple] = {}

        def graft(position: int):
            def transform(h, token_positions):
                out, metrics, new_carry, memory = self.layers(position, h, token_positions, carry[position],
                                                              store_memory)
                records[position] = (metrics, new_carry, memory)
                return out
            return transform

        run = self.model if head else self.model.hidden
        out = run(tokens, positions, cache=cache, write_index=write_index, patches=patches, capture=capture,
                  router=router, unroll=unroll, transforms={p: graft(p) for p in self.fusion_config.positions})
        fused = self.fusion_config.positions
        memory = {"layers": {str(p): records[p][2] for p in fused if records[p][2] is not None}}
        return FusedOutput(out[0], out.cache, {p: records[p][0] for p in fused}, {p: records[p][1] for p in fused},
                           memory if memory["layers"] else {}, out.captured, out.router_state)
