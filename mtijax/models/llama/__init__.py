"""The Llama line (Llama 3, Mistral, Qwen 2, Qwen 3): its config and reader (``config.py``), its params and block
(``model.py``) and its checkpoint names (``names.py``), registered as :data:`ARCHITECTURE`.

GGUF files of this family are claimed (so the loader can say they are not supported yet) but not read.
"""

from mtijax.models.architecture import Architecture
from mtijax.models.llama import config, names
from mtijax.models.llama.config import PRESETS, LlamaConfig
from mtijax.models.llama.model import (block, embed, inv_freq, layer_spec, llama3_inv_freq, param_axes,
                                       param_shapes, unembed)

ARCHITECTURE: Architecture[LlamaConfig] = Architecture(
    name="llama",
    config_type=LlamaConfig,
    sites=("resid_pre", "attn_q", "attn_k", "attn_v", "attn_z", "attn_out", "resid_mid", "mlp_out", "resid_post"),
    layer_spec=layer_spec,
    param_shapes=param_shapes,
    param_axes=param_axes,
    embed=embed,
    block=block,
    unembed=unembed,
    hf_model_types=("llama", "mistral", "qwen2", "qwen3"),
    from_hf=config.from_hf,
    hf_tensors=names.hf_tensors,
    gguf_architectures=("llama", "mistral", "qwen2", "qwen3"),
    presets=PRESETS,
    summary=config.summary,
)

SITES = ARCHITECTURE.sites
"""The activation sites a Llama-line block passes through, in order (see ``mtijax.interventions``)."""

__all__ = ["ARCHITECTURE", "SITES", "LlamaConfig", "block", "embed", "inv_freq", "layer_spec", "llama3_inv_freq",
           "param_axes", "param_shapes", "unembed"]
