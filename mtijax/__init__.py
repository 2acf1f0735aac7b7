"""mtijax: Gemma 3 and OLMoE as pure JAX functions of parameter pytrees, for research transforms.

The public API::

    model = mtijax.load("gemma3-270m")            # or a HF directory, or a .gguf file
    out = mtijax.forward(model.config, model.params, tokens, capture=("resid_post",))
    gen = mtijax.generate(model.config, model.params, [prompt_ids], 32)

Everything is a pure function of ``(config, params, ...)``; ``config`` is a
hashable static argument, ``params`` a plain pytree (see ``mtijax.models.gemma3``
and ``mtijax.models.olmoe``; ``family(config)`` is the module of an architecture,
with its ``block``, ``layer_spec`` and ``param_shapes``).
"""

from mtijax.api import Model, load, load_config
from mtijax.config import PRESETS, Gemma3Config, ModelConfig, OlmoeConfig, preset
from mtijax.errors import MtijaxError
from mtijax.generate import Generation, Sampling, generate, generate_stream
from mtijax.inject import InjectionSpec, inject
from mtijax.injection_study import run_study
from mtijax.interventions import SITES, Patch, layer_mask
from mtijax.models.cache import KVCache, init_cache
from mtijax.models.decoder import ForwardOutput, family, forward, forward_hidden, init_params
from mtijax.models.olmoe import load_balancing_loss, router_z_loss
from mtijax import snn  # spiking units driven by hidden states (seed 003)
from mtijax import fusion  # resonance fusion layers on a frozen model (seed 002)
from mtijax.streaming import LayerStore, StreamedModel  # layers streamed from disk (seeds 004, 000)
from mtijax import patching  # capture, patch specs, KV-cache and decode-step patching (seed 001)
from mtijax.patching import capture, generate_patched, patch_spec
from mtijax import sharding  # logical axes, rules, sharded load, sharded runs
from mtijax.sharding import shard

__all__ = [
    "Model", "load", "load_config", "PRESETS", "Gemma3Config", "OlmoeConfig", "ModelConfig", "preset", "MtijaxError",
    "Generation", "Sampling", "generate", "generate_stream", "SITES", "Patch", "layer_mask",
    "KVCache", "init_cache", "ForwardOutput", "forward", "forward_hidden", "family", "init_params",
    "load_balancing_loss", "router_z_loss", "InjectionSpec", "inject", "run_study",
    "snn", "StreamedModel", "LayerStore", "fusion", "patching", "capture", "patch_spec", "generate_patched",
    "sharding", "shard",
]

