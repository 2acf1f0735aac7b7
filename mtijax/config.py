"""Model configs, re-exported from where they live, for the modules that import them from here.

Each family's config dataclass, presets and file parsers live in its folder (``mtijax/models/<family>/config.py``);
the dispatch from a file to a family is ``mtijax.weights.configs``; ``describe`` is ``mtijax.models.summary``.
"""

from mtijax.models.architecture import ModelConfig
from mtijax.models.architectures import PRESETS, preset
from mtijax.models.gemma3.config import FULL, HF_TEXT_DEFAULTS, SLIDING, Gemma3Config, gemma3_layer_types
from mtijax.models.llama.config import LlamaConfig
from mtijax.models.olmoe.config import HF_OLMOE_DEFAULTS, OlmoeConfig
from mtijax.models.summary import describe
from mtijax.weights.configs import config_from_gguf, config_from_hf, read_hf_config

__all__ = ["ModelConfig", "PRESETS", "preset", "FULL", "SLIDING", "HF_TEXT_DEFAULTS", "HF_OLMOE_DEFAULTS",
           "Gemma3Config", "OlmoeConfig", "LlamaConfig", "gemma3_layer_types", "describe", "config_from_hf",
           "read_hf_config", "config_from_gguf"]
