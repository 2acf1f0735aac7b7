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

from __future__ import annotations

from typing import TYPE_CHECKING

from mtijax.lazy_exports import lazy_exports

# Names load on first use, so importing the package (the CLI does) imports no optax or pyarrow.
_EXPORTS = {
    "quaternion": "mtijax.fusion.quaternion",
    "QuaternionAttention": "mtijax.fusion.attention",
    "Checkpoint": "mtijax.fusion.checkpoint",
    "export_safetensors": "mtijax.fusion.checkpoint",
    "load_safetensors": "mtijax.fusion.checkpoint",
    "restore_checkpoint": "mtijax.fusion.checkpoint:restore",
    "save_checkpoint": "mtijax.fusion.checkpoint:save",
    "COMPONENTS": "mtijax.fusion.config",
    "PRESETS": "mtijax.fusion.config",
    "FusionConfig": "mtijax.fusion.config",
    "for_model": "mtijax.fusion.config",
    "spread": "mtijax.fusion.config",
    "Decoding": "mtijax.fusion.decode",
    "FusedGeneration": "mtijax.fusion.decode",
    "StabilityTrace": "mtijax.fusion.decode",
    "generate_fused": "mtijax.fusion.decode",
    "stream_fused": "mtijax.fusion.decode",
    "CoherenceGate": "mtijax.fusion.gate",
    "KuramotoSync": "mtijax.fusion.kuramoto",
    "order_parameter": "mtijax.fusion.kuramoto",
    "FusionLayer": "mtijax.fusion.layer",
    "LayerCarry": "mtijax.fusion.layer",
    "SemanticMemory": "mtijax.fusion.memory",
    "Corpus": "mtijax.fusion.pipeline",
    "FitReport": "mtijax.fusion.pipeline",
    "fit": "mtijax.fusion.pipeline",
    "load_corpus": "mtijax.fusion.pipeline",
    "PrimeProjection": "mtijax.fusion.prime",
    "PRSC": "mtijax.fusion.prsc",
    "QuaternionRotation": "mtijax.fusion.rotation",
    "StabilityConfig": "mtijax.fusion.stability",
    "TrainConfig": "mtijax.fusion.training",
    "TrainState": "mtijax.fusion.training",
    "init_train_state": "mtijax.fusion.training",
    "perplexity": "mtijax.fusion.training",
    "plot_history": "mtijax.fusion.training",
    "train": "mtijax.fusion.training",
    "train_step": "mtijax.fusion.training",
    "variables_of": "mtijax.fusion.training",
    "FusedOutput": "mtijax.fusion.wrapper",
    "empty_carry": "mtijax.fusion.wrapper",
    "fused_forward": "mtijax.fusion.wrapper",
    "fused_hidden": "mtijax.fusion.wrapper",
    "init_fusion": "mtijax.fusion.wrapper",
    "param_count": "mtijax.fusion.wrapper",
    "summarize": "mtijax.fusion.wrapper",
}

if TYPE_CHECKING:
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
    from mtijax.fusion.training import (TrainConfig, TrainState, init_train_state, perplexity, plot_history, train,
                                     train_step, variables_of)
    from mtijax.fusion.wrapper import (FusedOutput, empty_carry, fused_forward, fused_hidden, init_fusion, param_count,
                                       summarize)

__getattr__, __dir__ = lazy_exports(globals(), _EXPORTS)

__all__ = [
    "quaternion", "QuaternionAttention", "Checkpoint", "export_safetensors", "load_safetensors",
    "restore_checkpoint", "save_checkpoint", "COMPONENTS", "PRESETS", "FusionConfig", "for_model", "spread", "Decoding",
    "FusedGeneration", "StabilityTrace", "generate_fused", "stream_fused", "CoherenceGate", "KuramotoSync",
    "order_parameter", "FusionLayer", "LayerCarry", "SemanticMemory", "Corpus", "FitReport", "fit", "load_corpus",
    "PrimeProjection", "PRSC", "QuaternionRotation", "StabilityConfig", "TrainConfig", "TrainState",
    "init_train_state", "perplexity", "plot_history", "train", "train_step", "variables_of", "FusedOutput",
    "empty_carry", "fused_forward", "fused_hidden", "init_fusion", "param_count", "summarize",
]
