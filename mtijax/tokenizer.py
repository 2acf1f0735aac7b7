"""Tokenizers from a Hugging Face directory or from GGUF metadata, the latter cached on disk.

Converting a GGUF vocabulary to a ``transformers`` tokenizer takes about 20 s
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


def load_gguf_tokenizer(path: str | Path):
    """The tokenizer in a GGUF file's metadata, converted once and cached on disk."""
    from transformers import AutoTokenizer

    path = Path(path)
    cached = cache_root() / "tokenizers" / _gguf_key(path)
    if (cached / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(str(cached), local_files_only=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
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
