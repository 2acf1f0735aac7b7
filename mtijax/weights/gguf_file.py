"""A GGUF file as a tensor source: metadata, config and dequantised tensors.

Every tensor type the ``gguf`` package can dequantize is supported (the
embedded Gemma 3 270M holds F32, Q8_0, Q5_0, Q4_K and Q6_K). Tensors are
dequantised one at a time from the memory-mapped file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np

from mtijax.config import ModelConfig, config_from_gguf
from mtijax.errors import MtijaxError
from mtijax.weights.names import TensorSlot

_SKIPPED_FIELDS = {"tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type",
                   "tokenizer.ggml.merges"}


class GGUFFile:
    """One GGUF file: ``metadata`` (without the vocabulary arrays), ``config()``, and tensors."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.location = str(self.path)
        self.format = "gguf"
        if not self.path.is_file():
            raise MtijaxError(f"{self.path}: GGUF file is missing")
        with open(self.path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise MtijaxError(f"{self.path}: not a GGUF file (a model is a Hugging Face directory or a .gguf file)")
        try:
            self.reader = gguf.GGUFReader(self.path)
        except Exception as e:  # the gguf package raises ValueError, IndexError, struct errors...
            raise MtijaxError(f"{self.path}: corrupt or truncated GGUF file ({type(e).__name__}: {e})") from None
        self.metadata: dict[str, Any] = {}
        for key, field in self.reader.fields.items():
            if key not in _SKIPPED_FIELDS and not key.startswith("GGUF."):
                self.metadata[key] = field.contents()
        self.tensors = {t.name: t for t in self.reader.tensors}

    def token(self, index: int) -> str:
        """The vocabulary entry ``index`` as text."""
        field = self.reader.fields["tokenizer.ggml.tokens"]
        return bytes(field.parts[field.data[index]]).decode("utf-8", errors="replace")

    def config(self) -> ModelConfig:
        """The model config from the metadata; the vocabulary size from the embedding."""
        embed = self.tensors.get("token_embd.weight")
        if embed is None:
            raise MtijaxError(f"{self.path}: tensor 'token_embd.weight' is missing")
        extra_eos = []
        if "tokenizer.ggml.tokens" in self.reader.fields:
            extra_eos = [i for i in range(min(256, int(embed.shape[1]))) if self.token(i) == "<end_of_turn>"]
        return config_from_gguf(self.metadata, int(embed.shape[1]), str(self.path), tuple(extra_eos))

    def _tensor(self, slot: TensorSlot):
        tensor = self.tensors.get(slot.name)
        if tensor is None:
            raise MtijaxError(f"tensor {slot.name!r} is missing from {self.path}")
        return tensor

    def shape(self, slot: TensorSlot) -> tuple[int, ...]:
        return tuple(int(d) for d in reversed(self._tensor(slot).shape.tolist()))

    def read(self, slot: TensorSlot) -> np.ndarray:
        tensor = self._tensor(slot)
        try:
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError:
            raise MtijaxError(f"{self.path}: tensor {slot.name!r} has type {tensor.tensor_type.name}, "
                              "which the gguf package cannot dequantize") from None
        values = values.reshape(self.shape(slot))
        return values - np.float32(1.0) if slot.norm_shift else values

    def describe(self, slot: TensorSlot) -> str:
        """``tensor 'name' in file``."""
        return f"tensor {slot.name!r} in {self.path}"
