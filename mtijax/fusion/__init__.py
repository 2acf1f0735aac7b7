"""Resonance fusion layers (seed 002): components grafted onto a frozen Gemma 3 / OLMoE, trained with optax.

::

    fusion = mtijax.fusion.for_model(model.config, "standard")          # or FusionConfig(...)
    variables = mtijax.fusion.init_fusion(fusion, model.config, jax.random.key(0))
    out = mtijax.fusion.fused_forward(model.config, model.params, fusion, variables, tokens)
    out.logits, out.metrics[6]["prime_entropy"]                         # [B, S, V], [B, S]

Components (Flax Linen modules over their own params): :class:`PrimeProjection`, :class:`QuaternionRotation`,
:class:`KuramotoSync`, :class:`PRSC`, :class:`SemanticMemory`, :class:`CoherenceGate`, composed by
:class:`FusionLayer`; :class:`QuaternionAttention` stands alone. Generation with stability monitoring:
:func:`generate_fused`. Training: :func:`fit` (or :func:`train` and :func:`train_step`), checkpoints with
orbax (:func:`save_checkpoint`, :func:`restore_checkpoint`) and safetensors export.
"""

from mtijax.fusion import quaternion
from mtijax.fusion.attention import QuaternionAttention
from mtijax.fusion.checkpoint import Checkpoint, export_safetensors, load_safetensors
from mtijax.fusion.checkpoint import restore as restore_checkpoint
from mtijax.fusion.checkpoint import save as save_checkpoint
from mtijax.fusion.config import COMPONENTS, PRESETS, FusionConfig, for_model, spread
from mtijax.fusion.decode import Decoding, FusedGeneration, StabilityTrace, generate_fused, stream_fused
from mtijax.fusion.gate import CoherenceGate
from mtijax.fusion.kuramoto import KuramotoSync, order_parameter
from mtijax.fusion.layer import FusionLayer, LayerCarry
from mtijax.fusion.memory import SemanticMemory
from mtijax.fusion.pipeline import Corpus, FitReport, fit, load_corpus
from mtijax.fusion.prime import PrimeProjection
from mtijax.fusion.prsc import PRSC
from mtijax.fusion.rotation import QuaternionRotation
from mtijax.fusion.stability import StabilityConfig
from mtijax.fusion.train import (TrainConfig, TrainState, init_train_state, perplexity, plot_history, train,
                                 train_step, variables_of)
from mtijax.fusion.wrapper import (FusedOutput, empty_carry, fused_forward, fused_hidden, init_fusion, param_count,
                                   summarize)

__all__ = [
    "quaternion", "QuaternionAttention", "Checkpoint", "export_safetensors", "load_safetensors",
    "restore_checkpoint", "save_checkpoint", "COMPONENTS", "PRESETS", "FusionConfig", "for_model", "spread", "Decoding",
    "FusedGeneration", "StabilityTrace", "generate_fused", "stream_fused", "CoherenceGate", "KuramotoSync",
    "order_parameter", "FusionLayer", "LayerCarry", "SemanticMemory", "Corpus", "FitReport", "fit", "load_corpus",
    "PrimeProjection", "PRSC", "QuaternionRotation", "StabilityConfig", "TrainConfig", "TrainState",
    "init_train_state", "perplexity", "plot_history", "train", "train_step", "variables_of", "FusedOutput",
    "empty_carry", "fused_forward", "fused_hidden", "init_fusion", "param_count", "summarize",
]
