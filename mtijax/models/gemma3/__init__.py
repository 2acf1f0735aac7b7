"""Gemma 3 text decoder: its config and readers (``config.py``), its params and block (``model.py``) and its
checkpoint names (``names.py``), registered as :data:`ARCHITECTURE`."""

from mtijax.models.architecture import Architecture
from mtijax.models.gemma3 import config, names
from mtijax.models.gemma3.config import FULL, PRESETS, SLIDING, Gemma3Config, gemma3_layer_types
from mtijax.models.gemma3.model import block, embed, layer_spec, param_axes, param_shapes, unembed

ARCHITECTURE: Architecture[Gemma3Config] = Architecture(
    name="gemma3",
    config_type=Gemma3Config,
    sites=("resid_pre", "attn_q", "attn_k", "attn_v", "attn_z", "attn_out", "resid_mid", "mlp_out", "resid_post"),
    layer_spec=layer_spec,
    param_shapes=param_shapes,
    param_axes=param_axes,
    embed=embed,
    block=block,
    unembed=unembed,
    hf_model_types=("gemma3_text", "gemma3"),
    from_hf=config.from_hf,
    hf_tensors=names.hf_tensors,
    gguf_architectures=("gemma3",),
    from_gguf=config.from_gguf,
    gguf_tensors=names.gguf_tensors,
    presets=PRESETS,
    summary=config.summary,
)

SITES = ARCHITECTURE.sites
"""The activation sites a Gemma 3 block passes through, in order (see ``mtijax.interventions``)."""

__all__ = ["ARCHITECTURE", "SITES", "FULL", "SLIDING", "Gemma3Config", "gemma3_layer_types", "block", "embed",
           "layer_spec", "param_axes", "param_shapes", "unembed"]
