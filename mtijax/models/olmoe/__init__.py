"""OLMoE decoder (a mixture of experts in every layer): its config and readers (``config.py``), its params,
block and routing (``model.py``) and its checkpoint names (``names.py``), registered as :data:`ARCHITECTURE`."""

from mtijax.models.architecture import Architecture
from mtijax.models.olmoe import config, names
from mtijax.models.olmoe.config import PRESETS, OlmoeConfig
from mtijax.models.olmoe.model import (DISPATCHES, GROUPED_MAX_TOKENS, block, choose_dispatch, embed,
                                       experts_dense, experts_gathered, experts_grouped, layer_spec,
                                       load_balancing_loss, param_axes, param_shapes, route, router_z_loss, unembed)

ARCHITECTURE: Architecture[OlmoeConfig] = Architecture(
    name="olmoe",
    config_type=OlmoeConfig,
    sites=("resid_pre", "attn_q", "attn_k", "attn_v", "attn_z", "attn_out", "resid_mid", "router_logits",
           "router_experts", "router_weights", "mlp_out", "resid_post"),
    capture_only=("router_experts", "router_weights"),
    layer_spec=layer_spec,
    param_shapes=param_shapes,
    param_axes=param_axes,
    embed=embed,
    block=block,
    unembed=unembed,
    hf_model_types=("olmoe",),
    from_hf=config.from_hf,
    hf_tensors=names.hf_tensors,
    gguf_architectures=("olmoe",),
    from_gguf=config.from_gguf,
    gguf_tensors=names.gguf_tensors,
    presets=PRESETS,
    summary=config.summary,
)

SITES = ARCHITECTURE.sites
"""The activation sites an OLMoE block passes through, in order (see ``mtijax.interventions``)."""

__all__ = ["ARCHITECTURE", "SITES", "OlmoeConfig", "DISPATCHES", "GROUPED_MAX_TOKENS", "block", "choose_dispatch",
           "embed", "experts_dense", "experts_gathered", "experts_grouped", "layer_spec", "load_balancing_loss",
           "param_axes", "param_shapes", "route", "router_z_loss", "unembed"]
