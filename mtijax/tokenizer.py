"""Tokenizers from a Hugging Face directory or from GGUF metadata, the latter cached on disk.

Converting a GGUF vocabulary to a ``transformers`` tokenizer takes seconds
for Gemma 3's 262k tokens, so the converted tokenizer is saved under
``$MTIJAX_CACHE`` (default ``~/.cache/mtijax``) in ``tokenizers/<key>``, keyed
by the GGUF file's name, size and modification time, and loaded from there
afterwards.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from mtijax.errors import MtijaxError
from mtijax.weights.gguf_file import GGUFFile

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def cache_root() -> Path:
    """Where mtijax keeps converted tokenizers."""
    return Path(os.environ.get("MTIJAX_CACHE", Path.home() / ".cache" / "mtijax"))


def _gguf_key(path: Path) -> str:
    stat = path.stat()
    ident = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    return f"{path.stem}-{hashlib.sha256(ident.encode()).hexdigest()[:16]}"


def load_hf_tokenizer(directory: str | Path):
    """The tokenizer saved in a model directory, or None if it has none."""
    directory = Path(directory)
    if not any((directory / f).is_file() for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)


def _convert_gguf_vocabulary(gguf: GGUFFile):
    """Build a ``transformers`` fast tokenizer from GGUF metadata, read with the ``gguf`` package.

    transformers' own ``from_pretrained(gguf_file=...)`` reads the metadata
    with a reader that needs torch, which is only a test dependency here; we
    read the same fields ourselves and hand them to transformers' converter.
    """
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer

    fields = gguf.reader.fields
    value = lambda key: fields[key].contents() if key in fields else None
    groups = {group: {name: value(f"tokenizer.{key}") for key, name in renames.items()
                      if f"tokenizer.{key}" in fields}
              for group, renames in GGUF_TOKENIZER_MAPPING.items()}
    vocabulary, config = groups["tokenizer"], groups["tokenizer_config"]
    if "tokens" not in vocabulary:
        raise MtijaxError(f"{gguf.path}: no tokenizer in the GGUF metadata; pass --token-ids instead of a prompt")
    if vocabulary.get("tokenizer_type") == "llama":  # llama.cpp adds BOS to sentencepiece vocabularies by default
        config.setdefault("add_bos_token", True)
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        token_id = value(f"tokenizer.ggml.{key}")
        config[name] = vocabulary["tokens"][token_id] if token_id is not None else None
    backend, extra = convert_gguf_tokenizer(value("general.architecture"), vocabulary)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **config, **extra)


def load_gguf_tokenizer(gguf: str | Path | GGUFFile):
    """The tokenizer in a GGUF file's metadata (a path, or an open :class:`GGUFFile`), converted once and
    cached on disk."""
    from transformers import AutoTokenizer

    path = gguf.path if isinstance(gguf, GGUFFile) else Path(gguf)
    cached = cache_root() / "tokenizers" / _gguf_key(path)
    if (cached / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(str(cached), local_files_only=True)
    gguf = gguf if isinstance(gguf, GGUFFile) else GGUFFile(path)
    try:
        tokenizer = _convert_gguf_vocabulary(gguf)
    except MtijaxError:
        raise
    except Exception as e:  # transformers raises many kinds for an unreadable vocabulary
        raise MtijaxError(f"{path}: cannot read the tokenizer from GGUF metadata ({type(e).__name__}: {e})") from None
    cached.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=cached.parent))
    tokenizer.save_pretrained(str(staging))
    try:
        staging.rename(cached)
    except OSError:  # another process cached it first
        shutil.rmtree(staging, ignore_errors=True)
    return tokenizer
