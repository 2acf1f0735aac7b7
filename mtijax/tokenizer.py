"""Tokenizers from a Hugging Face directory or from GGUF metadata, the latter converted once and cached on disk.

A converted GGUF vocabulary is saved under ``$MTIJAX_CACHE`` (default
``~/.cache/mtijax``) in ``tokenizers/<key>``, keyed by the GGUF file's path,
size and modification time and the cache's format, and loaded from there
afterwards; a cached load never opens the GGUF file.

Gemma 3's vocabulary (262k sentencepiece pieces) is cached as a sentencepiece
model, because that is what loads fast: ``transformers``' own conversion is a
BPE of 515k merges, and building it takes seconds on every load. The cached
model follows the rules of ``transformers``' GGUF converter for Gemma, so the
ids are the same (tested against it): whitespace-only pieces are spelled with
``▁`` as the other pieces are, pieces are ranked by their index in the file
(Gemma's order of merges, which its scores do not follow), and the control and
user-defined tokens are split off whole before the rest of the text is
encoded. :class:`GemmaTokenizer` offers what mtijax uses of a ``transformers``
tokenizer: ``tokenizer(text)["input_ids"]``, ``encode`` and
``decode(ids, skip_special_tokens=...)``. Every other GGUF vocabulary (OLMoE's
byte-level BPE) is converted by ``transformers`` and cached as its
``tokenizer.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

from mtijax.errors import MtijaxError
from mtijax.weights.gguf_file import GGUFFile

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
SPM_MODEL = "gemma.spm"
SPM_TOKENS = "gemma_tokens.json"
CACHE_FORMAT = 2  # part of the cache key: a conversion cached in another layout is not read
# gguf / sentencepiece token types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = 1, 2, 3, 4, 6


def cache_root() -> Path:
    """Where mtijax keeps converted tokenizers."""
    return Path(os.environ.get("MTIJAX_CACHE", Path.home() / ".cache" / "mtijax"))


def _gguf_key(path: Path) -> str:
    stat = path.stat()
    ident = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{CACHE_FORMAT}"
    return f"{path.stem}-{hashlib.sha256(ident.encode()).hexdigest()[:16]}"


def load_hf_tokenizer(directory: str | Path):
    """The tokenizer saved in a model directory, or None if it has none."""
    directory = Path(directory)
    if not any((directory / f).is_file() for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)


class GemmaTokenizer:
    """A Gemma sentencepiece vocabulary with its added tokens, encoding and decoding as ``transformers``'
    GGUF conversion does.

    Args:
      model: the serialized sentencepiece model (every piece; the added tokens as control pieces).
      added: the added tokens (control and user-defined), ``{text: id}``; they are matched whole in the raw
        text, left to right and the longest at each place, before the text between them is encoded.
      special: ids of the special (control) tokens, which ``skip_special_tokens`` drops.
      bos_token_id, eos_token_id, pad_token_id: as the GGUF metadata gives them.
      add_bos: prepend ``bos_token_id`` when ``add_special_tokens`` (the GGUF's ``add_bos_token``).
    """

    def __init__(self, model: bytes, added: dict[str, int], special: Sequence[int], bos_token_id: int | None,
                 eos_token_id: int | None, pad_token_id: int | None, add_bos: bool):
        import sentencepiece

        self._sp = sentencepiece.SentencePieceProcessor()
        self._sp.LoadFromSerializedProto(model)
        self._added = added
        self._added_text = {i: text for text, i in added.items()}
        self._special = frozenset(special)
        lengths: dict[str, set[int]] = {}
        for text in added:
            lengths.setdefault(text[0], set()).add(len(text))
        self._lengths = {first: sorted(n, reverse=True) for first, n in lengths.items()}
        self._starts = re.compile("[" + "".join(map(re.escape, lengths)) + "]") if added else None
        self.bos_token_id, self.eos_token_id, self.pad_token_id = bos_token_id, eos_token_id, pad_token_id
        self.add_bos = add_bos

    def _added_tokens(self, text: str):
        """``(start, end, id)`` of each added token in ``text``, left to right, the longest at each place (as
        ``transformers`` matches them). Found from an index of first characters, which builds in no time,
        unlike one regular expression over the 6k added tokens."""
        position = 0
        while self._starts is not None and (match := self._starts.search(text, position)):
            start = match.start()
            for length in self._lengths[text[start]]:
                token = self._added.get(text[start:start + length])
                if token is not None:
                    yield start, start + length, token
                    position = start + length
                    break
            else:
                position = start + 1

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def added_tokens(self) -> list[tuple[int, str, bool]]:
        """``(id, text, special)`` of every added token, by id."""
        return sorted((i, text, i in self._special) for text, i in self._added.items())

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """The ids of ``text``, with BOS first when ``add_special_tokens`` and the vocabulary adds it."""
        ids = [self.bos_token_id] if add_special_tokens and self.add_bos and self.bos_token_id is not None else []
        start = 0
        for begin, end, token in self._added_tokens(text):
            if begin > start:
                ids += self._sp.encode(text[start:begin])
            ids.append(token)
            start = end
        if start < len(text):
            ids += self._sp.encode(text[start:])
        return ids

    def __call__(self, text: str | Sequence[str], add_special_tokens: bool = True) -> dict[str, Any]:
        """``{"input_ids", "attention_mask"}`` of one text (lists of ints) or of several (lists of lists)."""
        if isinstance(text, str):
            ids = self.encode(text, add_special_tokens)
            return {"input_ids": ids, "attention_mask": [1] * len(ids)}
        rows = [self.encode(t, add_special_tokens) for t in text]
        return {"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]}

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        """The piece of each id, as the vocabulary spells it (``▁`` for a space)."""
        return [self._added_text.get(int(i)) or self._sp.id_to_piece(int(i)) for i in ids]

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | list[int]:
        """The id of each piece or added token (``convert_ids_to_tokens`` inverted); one id for one string.
        A piece the vocabulary lacks is the unknown token's id, as sentencepiece gives it."""
        if isinstance(tokens, str):
            return self._added[tokens] if tokens in self._added else self._sp.piece_to_id(tokens)
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """The text of ``ids``: ``▁`` becomes a space, consecutive byte pieces become their UTF-8 text (or one
        U+FFFD per byte when they are not valid UTF-8), added tokens are their own text; special tokens are
        dropped when ``skip_special_tokens``."""
        ids = [int(i) for i in ids if not (skip_special_tokens and int(i) in self._special)]
        out, pending = [], bytearray()
        for i in ids:
            if i not in self._added_text and self._sp.is_byte(i):
                pending.append(int(self._sp.id_to_piece(i)[3:5], 16))
                continue
            if pending:
                out.append(_utf8_or_replacement(pending))
                pending = bytearray()
            out.append(self._added_text[i] if i in self._added_text else self._sp.id_to_piece(i).replace("▁", " "))
        if pending:
            out.append(_utf8_or_replacement(pending))
        return "".join(out)


def _utf8_or_replacement(data: bytearray) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "\ufffd" * len(data)


def _gguf_strings(gguf: GGUFFile, key: str) -> list[str]:
    field = gguf.reader.fields[key]
    return [bytes(field.parts[i]).decode("utf-8") for i in field.data]


def _gguf_ints(gguf: GGUFFile, key: str) -> list[int]:
    field = gguf.reader.fields[key]
    return [int(field.parts[i][0]) for i in field.data]


def _is_gemma_sentencepiece(gguf: GGUFFile) -> bool:
    meta = gguf.metadata
    return (str(meta.get("general.architecture", "")).startswith("gemma")
            and meta.get("tokenizer.ggml.model") == "llama" and not meta.get("tokenizer.ggml.add_space_prefix", False)
            and "tokenizer.ggml.tokens" in gguf.reader.fields and "tokenizer.ggml.token_type" in gguf.reader.fields)


def _convert_gemma_vocabulary(gguf: GGUFFile) -> tuple[bytes, dict[str, Any]]:
    """The sentencepiece model and the token table (``{"added", "special", "bos", "eos", "pad", "add_bos"}``)
    of a Gemma GGUF vocabulary; see the module docstring for the rules."""
    from sentencepiece import sentencepiece_model_pb2 as spm

    tokens = _gguf_strings(gguf, "tokenizer.ggml.tokens")
    types = _gguf_ints(gguf, "tokenizer.ggml.token_type")
    tokens = ["▁" * len(t) if " " in t and not t.strip() else t for t in tokens]
    meta = gguf.metadata
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    special = [i for i, kind in enumerate(types) if kind == CONTROL]
    added = {tokens[i]: i for i, kind in enumerate(types)
             if kind == CONTROL or (kind == USER_DEFINED and set(tokens[i]) != {"▁"})}
    proto = spm.ModelProto()
    proto.trainer_spec.model_type = spm.TrainerSpec.BPE
    proto.trainer_spec.byte_fallback = True
    proto.trainer_spec.unk_id = -1 if unk is None else int(unk)
    for name in ("bos_id", "eos_id", "pad_id"):
        setattr(proto.trainer_spec, name, -1)
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = False
    proto.normalizer_spec.remove_extra_whitespaces = False
    proto.normalizer_spec.escape_whitespaces = True
    kinds = {BYTE: spm.ModelProto.SentencePiece.BYTE}
    for i, (token, kind) in enumerate(zip(tokens, types)):
        piece = proto.pieces.add()
        piece.piece, piece.score = token, -float(i)
        piece.type = (spm.ModelProto.SentencePiece.UNKNOWN if i == unk else spm.ModelProto.SentencePiece.CONTROL
                      if token in added else kinds.get(kind, spm.ModelProto.SentencePiece.NORMAL))
    table = {"added": added, "special": special, "add_bos": bool(meta.get("tokenizer.ggml.add_bos_token", True))}
    for name, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("pad", "padding_token_id")):
        value = meta.get(f"tokenizer.ggml.{key}")
        table[name] = None if value is None else int(value)
    return proto.SerializeToString(), table


def _gemma_tokenizer(directory: Path) -> GemmaTokenizer:
    """The cached Gemma tokenizer in ``directory``."""
    table = json.loads((directory / SPM_TOKENS).read_text())
    return GemmaTokenizer((directory / SPM_MODEL).read_bytes(), table["added"], table["special"], table["bos"],
                          table["eos"], table["pad"], table["add_bos"])


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


def _convert(gguf: GGUFFile) -> tuple[Any, Callable[[Path], None]]:
    """The tokenizer of ``gguf``'s vocabulary, and how to write it into a cache directory."""
    if _is_gemma_sentencepiece(gguf):
        model, table = _convert_gemma_vocabulary(gguf)

        def write(directory: Path) -> None:
            (directory / SPM_MODEL).write_bytes(model)
            (directory / SPM_TOKENS).write_text(json.dumps(table))
        return GemmaTokenizer(model, table["added"], table["special"], table["bos"], table["eos"], table["pad"],
                              table["add_bos"]), write
    tokenizer = _convert_gguf_vocabulary(gguf)
    return tokenizer, lambda directory: tokenizer.save_pretrained(str(directory))


def load_gguf_tokenizer(gguf: str | Path | GGUFFile):
    """The tokenizer in a GGUF file's metadata (a path, or an open :class:`GGUFFile`), converted once and
    cached on disk: a :class:`GemmaTokenizer` for Gemma's vocabulary, else a ``transformers`` tokenizer."""
    path = gguf.path if isinstance(gguf, GGUFFile) else Path(gguf)
    cached = cache_root() / "tokenizers" / _gguf_key(path)
    if (cached / SPM_TOKENS).is_file():
        return _gemma_tokenizer(cached)
    if (cached / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(cached), local_files_only=True)
    gguf = gguf if isinstance(gguf, GGUFFile) else GGUFFile(path)
    try:
        tokenizer, write = _convert(gguf)
    except MtijaxError:
        raise
    except Exception as e:  # transformers and sentencepiece raise many kinds for an unreadable vocabulary
        raise MtijaxError(f"{path}: cannot read the tokenizer from GGUF metadata ({type(e).__name__}: {e})") from None
    cached.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=cached.parent))
    write(staging)
    try:
        staging.rename(cached)
    except OSError:  # another process cached it first
        shutil.rmtree(staging, ignore_errors=True)
    return tokenizer
