"""``describe(config)``: the JSON-friendly summary of a model that ``mtijax info`` prints."""

from __future__ import annotations

from typing import Any

from mtijax.models.architecture import ModelConfig
from mtijax.models.architectures import architecture


def _human(count: int) -> str:
    return f"{count / 1e6:.1f}M" if count < 1e9 else f"{count / 1e9:.2f}B"


def describe(config: ModelConfig) -> dict[str, Any]:
    """Shapes shared by every family, then the family's own lines (``Architecture.summary``), then the size."""
    summary = {
        "architecture": config.architecture,
        "layers": config.num_layers,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "heads": config.num_heads,
        "kv_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "vocab_size": config.vocab_size,
        **architecture(config).summary(config),
    }
    summary["parameters"] = config.num_params
    summary["params_human"] = _human(config.num_params)
    return summary
