"""Loading a model by name or path: config, params and tokenizer together.

Loading goes in two steps, so that a command can check everything that needs only the config and
the tokenizer before it reads a weight: :func:`open_checkpoint` reads the config and the tensor
headers (``config.json`` and the safetensors headers, or the GGUF header: well under a second for
Gemma 3 270M), and :meth:`Checkpoint.load` reads the weights. :func:`load` does both.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

from mtijax import progress as status
from mtijax.config import PRESETS, ModelConfig, read_hf_config
from mtijax.errors import MtijaxError
from mtijax.special_tokens import gguf_added_tokens, suppress_ids, tokenizer_added_tokens
from mtijax.tokenizer import load_gguf_tokenizer, load_hf_tokenizer
from mtijax.weights.default import DEFAULT_MODEL, default_model_path
from mtijax.weights.gguf_file import GGUFFile
from mtijax.weights.loader import load_params
from mtijax.weights.sources import HFDirectory


@dataclasses.dataclass(frozen=True)
class Model:
    """A loaded model.

    Attributes:
      config: the hashable config (a static argument of every jitted function).
      params: the params pytree (see ``mtijax.models.gemma3``).
      tokenizer: ``tokenizer(text)["input_ids"]`` and ``tokenizer.decode(ids)``: a ``transformers`` tokenizer,
        or :class:`mtijax.tokenizer.GemmaTokenizer` for a Gemma GGUF file; None for checkpoints without one.
      source: the file or directory the weights came from.
      suppress_ids: the ids a text model should never sample (``mtijax.special_tokens``); pass them to
        ``generate(..., suppress_ids=model.suppress_ids)``. Override with ``dataclasses.replace``.
    """

    config: ModelConfig
    params: dict[str, Any]
    tokenizer: Any
    source: str
    suppress_ids: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A model opened without reading its weights.

    Attributes:
      path: the file or directory.
      config: its config.
      tensors: the tensor source (:class:`HFDirectory` or :class:`GGUFFile`), headers read and checked.
    """

    path: Path
    config: ModelConfig
    tensors: HFDirectory | GGUFFile

    @property
    def context_source(self) -> str:
        """Where the config's context length comes from, for error messages."""
        if isinstance(self.tensors, GGUFFile):
            return f"{self.config.architecture}.context_length in {self.path}"
        return f"max_position_embeddings in {self.path / 'config.json'}"

    def tokenizer(self, progress: bool = False) -> Any:
        """The checkpoint's tokenizer, or None if it has none. A GGUF vocabulary is converted on first use and
        cached (see ``mtijax.tokenizer``); ``progress`` shows a status line meanwhile."""
        if isinstance(self.tensors, GGUFFile):
            if not self.tensors.tokens:
                return None
            with status.status("reading the tokenizer (the first run converts the GGUF vocabulary, then caches it)",
                               enabled=progress):
                return load_gguf_tokenizer(self.tensors)
        with status.status("reading the tokenizer", enabled=progress):
            return load_hf_tokenizer(self.path)

    def suppress_ids(self, tokenizer: Any = None, stop_ids: Sequence[int] | None = None) -> tuple[int, ...]:
        """The suppression set (``mtijax.special_tokens``), from ``tokenizer``'s added tokens when given, else
        from the GGUF vocabulary, else from the config's pad and BOS ids alone."""
        if tokenizer is not None:
            added = tokenizer_added_tokens(tokenizer)
        elif isinstance(self.tensors, GGUFFile):
            added = gguf_added_tokens(self.tensors)
        else:
            added = []
        return suppress_ids(self.config, added, stop_ids)

    def load(self, dtype: str = "float32", *, tokenizer: Any = None, progress: bool = False, mesh: Any = None,
             rules: Any = None) -> Model:
        """Read the weights (``progress``: a bar over the tensors on stderr) into a :class:`Model` carrying
        ``tokenizer`` (already loaded, or None); with a ``mesh``, each device's block straight onto it
        (``mtijax.sharding.load``)."""
        if mesh is not None:
            from mtijax.sharding.load import load_params as load_sharded

            params = load_sharded(self.config, self.tensors, dtype, mesh, rules, progress)
        else:
            params = load_params(self.config, self.tensors, dtype, progress)
        return Model(self.config, params, tokenizer, str(self.path), self.suppress_ids(tokenizer))


def resolve(name_or_path: str | Path | None) -> Path:
    """The file or directory a model name or path refers to (None means the embedded default)."""
    if name_or_path is None or str(name_or_path) == DEFAULT_MODEL:
        return default_model_path()
    path = Path(name_or_path)
    if path.is_dir() or path.is_file():
        return path
    if str(name_or_path) in PRESETS:
        raise MtijaxError(f"{name_or_path} is a preset without embedded weights; pass a model directory or a "
                          f".gguf file (only {DEFAULT_MODEL} is embedded)")
    raise MtijaxError(f"no such model: {name_or_path} (not a directory, a file, or {DEFAULT_MODEL})")


def open_checkpoint(name_or_path: str | Path | None = None) -> Checkpoint:
    """Open a model (as :func:`load` takes it) without reading its weights: config and checked tensor headers."""
    path = resolve(name_or_path)
    if path.is_dir():
        config = read_hf_config(path)
        return Checkpoint(path, config, HFDirectory(path))
    source = GGUFFile(path)
    return Checkpoint(path, source.config(), source)


def load_config(name_or_path: str | Path | None) -> tuple[ModelConfig, Path | None]:
    """The config of a model (a preset name needs no weights), and the path it came from."""
    if name_or_path is not None and str(name_or_path) in PRESETS and str(name_or_path) != DEFAULT_MODEL:
        return PRESETS[str(name_or_path)], None
    path = resolve(name_or_path)
    return (read_hf_config(path) if path.is_dir() else GGUFFile(path).config()), path


def load(name_or_path: str | Path | None = None, dtype: str = "float32", *, tokenizer: bool = True,
         progress: bool = True, mesh: Any = None, rules: Any = None) -> Model:
    """Load a model: a Hugging Face directory, a ``.gguf`` file, or ``"gemma3-270m"`` (the default).

    Args:
      dtype: ``"float32"`` (default) or ``"bfloat16"``; GGUF tensors are dequantised to it.
      tokenizer: also load the tokenizer (GGUF: converted once, then cached).
      progress: show a progress bar while reading tensors, and a status line while reading the tokenizer.
      mesh: a ``jax.sharding.Mesh``: read each device's block of every parameter straight from the file onto it,
        placed by ``rules`` (``mtijax.sharding``); never a whole sharded parameter in host memory.
    """
    checkpoint = open_checkpoint(name_or_path)
    tok = checkpoint.tokenizer(progress) if tokenizer else None
    return checkpoint.load(dtype, tokenizer=tok, progress=progress, mesh=mesh, rules=rules)
