"""mtijax: Gemma 3 and OLMoE as pure JAX functions of parameter pytrees, for research transforms.

The public API::

    model = mtijax.load("gemma3-270m")            # or a HF directory, or a .gguf file
    out = mtijax.forward(model.config, model.params, tokens, capture=("resid_post",))
    gen = mtijax.generate(model.config, model.params, [prompt_ids], 32)

Everything is a pure function of ``(config, params, ...)``; ``config`` is a
hashable static argument, ``params`` a plain pytree (see ``mtijax.models.gemma3``,
``mtijax.models.olmoe`` and ``mtijax.models.llama``; ``family(config)`` is the architecture record of a
config, with its ``block``, ``layer_spec``, ``param_shapes``, ``param_axes`` and ``sites``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mtijax.api import Model, load, load_config
from mtijax.config import PRESETS, Gemma3Config, LlamaConfig, ModelConfig, OlmoeConfig, preset
from mtijax.errors import MtijaxError
from mtijax.generate import Generation, Sampling, generate, generate_stream
from mtijax.interventions import SITES, Patch, layer_mask
from mtijax.lazy_exports import lazy_exports
from mtijax.models.cache import KVCache, init_cache
from mtijax.models.decoder import ForwardOutput, family, forward, forward_hidden, init_params
from mtijax.models.olmoe import load_balancing_loss, router_z_loss

# The techniques load on first use (PEP 562), so that ``import mtijax`` does not import optax, orbax,
# matplotlib or pyarrow: name -> the module that defines it (a technique package is its own module).
_LAZY = {
    "injection": "mtijax.injection",  # seed 000: blend teacher tensors into a student, the divergence study
    "InjectionSpec": "mtijax.injection", "inject": "mtijax.injection", "run_study": "mtijax.injection",
    "snn": "mtijax.snn",  # spiking units driven by hidden states (seed 003)
    "fusion": "mtijax.fusion",  # resonance fusion layers on a frozen model (seed 002)
    "streaming": "mtijax.streaming",  # layers streamed from disk (seeds 004, 000)
    "LayerStore": "mtijax.streaming", "StreamedModel": "mtijax.streaming",
    "patching": "mtijax.patching",  # capture, patch specs, KV-cache and decode-step patching (seed 001)
    "capture": "mtijax.patching", "generate_patched": "mtijax.patching", "patch_spec": "mtijax.patching",
    "sharding": "mtijax.sharding", "shard": "mtijax.sharding",  # logical axes, rules, sharded load and runs
}

if TYPE_CHECKING:
    from mtijax import fusion, injection, patching, sharding, snn, streaming
    from mtijax.injection import InjectionSpec, inject, run_study
    from mtijax.patching import capture, generate_patched, patch_spec
    from mtijax.sharding import shard
    from mtijax.streaming import LayerStore, StreamedModel


__getattr__, __dir__ = lazy_exports(globals(), _LAZY)


__all__ = [
    "Model", "load", "load_config", "PRESETS", "Gemma3Config", "OlmoeConfig", "LlamaConfig", "ModelConfig", "preset", "MtijaxError",
    "Generation", "Sampling", "generate", "generate_stream", "SITES", "Patch", "layer_mask",
    "KVCache", "init_cache", "ForwardOutput", "forward", "forward_hidden", "family", "init_params",
    "load_balancing_loss", "router_z_loss", "injection", "InjectionSpec", "inject", "run_study",
    "snn", "streaming", "StreamedModel", "LayerStore", "fusion", "patching", "capture", "patch_spec",
    "generate_patched", "sharding", "shard",
]

