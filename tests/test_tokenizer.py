"""GGUF tokenizers: a Gemma vocabulary is converted once and then served from the disk cache, with the ids and
text of ``transformers``' own GGUF conversion (the oracle).

The vocabulary here is a small Gemma-style sentencepiece table written into a GGUF file of metadata only:
control tokens, byte pieces, single characters, merged pieces, a whitespace-only user-defined piece stored
with real spaces (as llama.cpp writes Gemma's), and a user-defined ``<b>`` tag. The real 262k vocabulary is
checked against ``transformers`` in ``tests/test_real_gguf.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import pytest

import mtijax.tokenizer as tokenizer_module
from mtijax.tokenizer import GemmaTokenizer, load_gguf_tokenizer
from mtijax.weights.gguf_file import GGUFFile

CONTROL, USER_DEFINED, NORMAL, BYTE = 3, 4, 1, 6
SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
PIECES = ["▁", *"abcdehlortw", "▁a", "ab", "ab▁", "▁ab", "he", "ll", "hell", "hello", "▁w", "or", "wor", "world",
          "▁hello", "▁world", "\n"]
TEXTS = ["hello world", "abab ab  ab", "  hello", "hello\n\nworld", "<start_of_turn>hello<end_of_turn>",
         "<b>bold</b> world", "zq ab", "ünï", "a   b", " ", "", "<bos>ab<unk>"]


def write_vocabulary(path: Path) -> Path:
    """A GGUF file holding only a Gemma 3 tokenizer: specials, 256 byte pieces, the pieces above, the
    user-defined ``"  "`` and ``<b>``. The pieces merge in the order they are listed (transformers ranks
    Gemma's merges by index); their scores run the other way, so that ranking by score would be caught."""
    tokens = [*SPECIAL, *(f"<0x{b:02X}>" for b in range(256)), *PIECES, "  ", "<b>"]
    types = [CONTROL] * len(SPECIAL) + [BYTE] * 256 + [NORMAL] * len(PIECES) + [USER_DEFINED] * 2
    writer = gguf.GGUFWriter(path, "gemma3")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([-1000.0 if t != NORMAL else float(i) for i, t in enumerate(types)])
    writer.add_token_types(types)
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_space_prefix(False)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def vocabulary(tmp_path, monkeypatch) -> Path:
    """The small vocabulary's GGUF file, with an empty ``$MTIJAX_CACHE`` of this test's own."""
    monkeypatch.setenv("MTIJAX_CACHE", str(tmp_path / "cache"))
    return write_vocabulary(tmp_path / "vocabulary.gguf")


@pytest.fixture
def conversions(monkeypatch) -> list[str]:
    """Every conversion of a GGUF vocabulary from here on, by the path of the file converted."""
    calls = []
    original = tokenizer_module._convert_gemma_vocabulary

    def counting(gguf_file):
        calls.append(str(gguf_file.path))
        return original(gguf_file)

    monkeypatch.setattr(tokenizer_module, "_convert_gemma_vocabulary", counting)
    return calls


@pytest.fixture(scope="module")
def transformers_tokenizer(tmp_path_factory):
    """``transformers``' conversion of the small vocabulary (its GGUF converter; no mtijax cache involved)."""
    path = write_vocabulary(tmp_path_factory.mktemp("oracle") / "vocabulary.gguf")
    return tokenizer_module._convert_gguf_vocabulary(GGUFFile(path))


def test_the_first_load_converts_and_later_loads_read_only_the_cache(vocabulary, conversions, monkeypatch):
    first = load_gguf_tokenizer(vocabulary)
    assert conversions == [str(vocabulary)] and isinstance(first, GemmaTokenizer)
    (cached,) = (Path(os.environ["MTIJAX_CACHE"]) / "tokenizers").iterdir()
    assert sorted(p.name for p in cached.iterdir()) == [tokenizer_module.SPM_MODEL, tokenizer_module.SPM_TOKENS]

    def no_gguf(*args, **kwargs):
        raise AssertionError("a cached load opened the GGUF file")

    monkeypatch.setattr(GGUFFile, "__init__", no_gguf)
    second = load_gguf_tokenizer(vocabulary)
    assert conversions == [str(vocabulary)]
    assert [second(t)["input_ids"] for t in TEXTS] == [first(t)["input_ids"] for t in TEXTS]


def test_a_changed_gguf_file_is_converted_again(vocabulary, conversions):
    load_gguf_tokenizer(vocabulary)
    stat = vocabulary.stat()
    os.utime(vocabulary, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    load_gguf_tokenizer(vocabulary)
    assert conversions == [str(vocabulary)] * 2


def test_ids_are_those_of_the_transformers_conversion(vocabulary, transformers_tokenizer):
    ours = load_gguf_tokenizer(vocabulary)
    for text in TEXTS:
        for special in (True, False):
            assert ours(text, add_special_tokens=special)["input_ids"] == \
                transformers_tokenizer(text, add_special_tokens=special)["input_ids"], (text, special)
    assert ours(TEXTS[:2])["input_ids"] == transformers_tokenizer(TEXTS[:2])["input_ids"]


def test_text_is_that_of_the_transformers_conversion(vocabulary, transformers_tokenizer):
    """Pieces, spaces, added tokens, and byte pieces: valid UTF-8, and an invalid run (one U+FFFD a byte)."""
    ours = load_gguf_tokenizer(vocabulary)
    sequences = [transformers_tokenizer(t)["input_ids"] for t in TEXTS]
    sequences += [[2, 6 + 0xC3, 6 + 0xBC, 270, 6 + 0xC3, 4, 6 + 0xFF, 6 + 0x41, 1], [6 + 0x80, 6 + 0x80, 2]]
    for ids in sequences:
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == \
                transformers_tokenizer.decode(ids, skip_special_tokens=skip), (ids, skip)
