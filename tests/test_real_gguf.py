"""The embedded Gemma 3 270M GGUF agrees with transformers loading the same file (CPU, float32).

Both sides dequantise the same Q4_K_M tensors, so logits agree to about 1e-4
and greedy continuations token for token. The models are session fixtures
(loading each takes a minute on a loaded 2-core machine); the transformers
tokenizer and its greedy continuations are computed once per module. The
command-line tests run on the session's loaded model (``cli_model``), so the
weights are read once per session.
"""

from __future__ import annotations

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mtijax.api import Checkpoint
from mtijax.cli import main
from mtijax.generate import generate
from mtijax.models.decoder import forward
from mtijax.special_tokens import text_decoder
from mtijax.tokenizer import load_gguf_tokenizer
from mtijax.weights.default import default_model_path
from tests.conftest import left_padded

pytestmark = pytest.mark.slow

PROMPTS = ("The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, in a small village,")
NEW_TOKENS = 16
PICTURE = "Here is a picture: <start_of_image>"
"""A prompt whose most likely next token is ``<start_of_image>`` (p = 0.13, against 0.11 for the runner-up), so
greedy decoding picks it without suppression, whatever the sampler's random draws. (A new user's first try,
``Write a haiku about rivers`` sampled at temperature 0.7, has p = 0.15 of it at the first step; with 40 new
tokens it printed 22.)"""


@pytest.fixture(scope="module")
def hf_tokenizer(gguf_parsed_once):
    """transformers' own tokenizer read from the GGUF metadata (no mtijax code involved)."""
    from transformers import AutoTokenizer

    path = default_model_path()
    with gguf_parsed_once():
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="module")
def prompt_ids(real_model) -> list[list[int]]:
    return [real_model.tokenizer(p)["input_ids"] for p in PROMPTS]


@pytest.fixture(scope="module")
def hf_greedy(real_hf_model, prompt_ids) -> list[list[int]]:
    """transformers' greedy continuation of each prompt, never stopping early."""
    out = []
    with torch.no_grad():
        for ids in prompt_ids:
            tokens = real_hf_model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                            eos_token_id=None, pad_token_id=0)
            out.append(tokens[0, len(ids):].tolist())
    return out


def test_tokenizer_matches_transformers_gguf_tokenizer(real_model, hf_tokenizer, prompt_ids):
    """mtijax's (cached) tokenizer gives transformers' ids, BOS first."""
    assert prompt_ids == [hf_tokenizer(p)["input_ids"] for p in PROMPTS]
    assert all(ids[0] == real_model.config.bos_token_id for ids in prompt_ids)


def test_second_tokenizer_load_is_served_from_the_disk_cache(real_model, monkeypatch):
    """The model fixture converted the GGUF vocabulary once; loading the tokenizer again reads the saved
    conversion under ``$MTIJAX_CACHE/tokenizers``: no conversion runs and the GGUF file is not opened."""
    import mtijax.tokenizer as tokenizer_module
    from mtijax.weights.gguf_file import GGUFFile

    def refuse(*args, **kwargs):
        raise AssertionError("a cached tokenizer load converted or opened the GGUF file")

    for name in ("_convert_gemma_vocabulary", "_convert_gguf_vocabulary"):
        monkeypatch.setattr(tokenizer_module, name, refuse)
    monkeypatch.setattr(GGUFFile, "__init__", refuse)
    tokenizer = load_gguf_tokenizer(default_model_path())
    assert [tokenizer(p)["input_ids"] for p in PROMPTS] == [real_model.tokenizer(p)["input_ids"] for p in PROMPTS]


PARITY_TEXTS = (
    "  two leading spaces", "tabs\t\tand\n\n\nnewlines", "    indented code", "a   b    c", "trailing space ",
    "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n", "<table><tr><td>x</td></tr></table>",
    "naïve café, 日本語, Привет, مرحبا, 🦙🦙", "\u00a0nbsp\u200bzero-width\x7fdel", "1234567890 3.14159 1e-10",
    "x" * 40, "<bos><eos><unk><pad>", "[multimodal]", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "",
)


def test_tokenizer_encodes_and_decodes_as_transformers(real_model, hf_tokenizer):
    """The cached Gemma tokenizer against transformers' own conversion of the same GGUF vocabulary:
    whitespace runs, control and user-defined tokens, scripts and emoji; then decoding those ids, and
    byte pieces that are not valid UTF-8."""
    ours = real_model.tokenizer
    for text in PARITY_TEXTS:
        assert ours(text)["input_ids"] == hf_tokenizer(text)["input_ids"], text
    sequences = [hf_tokenizer(t)["input_ids"] for t in PARITY_TEXTS] + [[2, 238 + 0xE6, 238 + 0x97, 106, 238 + 0xFF]]
    for ids in sequences:
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == hf_tokenizer.decode(ids, skip_special_tokens=skip)
    pieces = ["<start_of_image>", "<unused7>", "<eos>", "▁the", "<0xE6>", "x"]
    assert ours.convert_tokens_to_ids(pieces) == hf_tokenizer.convert_tokens_to_ids(pieces)


def test_logits_and_next_token_match_transformers(real_model, real_hf_model, prompt_ids):
    """One left-padded batch of the three prompts: every real position's logits match transformers run on
    each prompt alone, and so does the top-1 next token."""
    tokens, positions = left_padded(prompt_ids)
    width = tokens.shape[1]
    logits = np.asarray(forward(real_model.config, real_model.params, jnp.asarray(tokens),
                                jnp.asarray(positions)).logits)
    for row, ids in enumerate(prompt_ids):
        with torch.no_grad():
            expected = real_hf_model(torch.tensor([ids])).logits[0].numpy()
        got = logits[row, width - len(ids):]
        np.testing.assert_allclose(got, expected, atol=1e-3, rtol=0, err_msg=PROMPTS[row])
        assert got[-1].argmax() == expected[-1].argmax()


def test_greedy_continuations_match_transformers(real_model, prompt_ids, hf_greedy):
    """16 greedy tokens for the three prompts generated as one batch equal transformers' per prompt."""
    got = generate(real_model.config, real_model.params, prompt_ids, NEW_TOKENS, stop_ids=())
    assert got.tokens.tolist() == hf_greedy
    assert all(len(set(ids)) > 3 for ids in hf_greedy), "the reference continuations should not be degenerate"


@pytest.fixture
def cli_model(real_model, monkeypatch):
    """The command line on the session's loaded model: it opens and checks the checkpoint as always, but its
    tokenizer and weights come from ``real_model`` (whose load is the same ``open_checkpoint`` ->
    ``Checkpoint.tokenizer`` -> ``Checkpoint.load``)."""
    monkeypatch.setattr(Checkpoint, "tokenizer", lambda self, progress=False: real_model.tokenizer)
    monkeypatch.setattr(Checkpoint, "load", lambda self, dtype="float32", *, tokenizer=None, progress=False:
                        dataclasses.replace(real_model, tokenizer=tokenizer))
    return real_model


def test_cli_generates_transformers_greedy_ids(cli_model, hf_tokenizer, prompt_ids, hf_greedy, capsys):
    """``mtijax generate "The capital of France is" --max-new-tokens 8 --json`` prints transformers' greedy
    ids (cut at an end-of-sequence token) and their text."""
    status = main(["generate", PROMPTS[0], "--max-new-tokens", "8", "--json"])
    out = json.loads(capsys.readouterr().out)
    expected = hf_greedy[0][:8]
    stops = [i for i, t in enumerate(expected) if t in cli_model.config.eos_token_ids]
    expected = expected[:stops[0]] if stops else expected
    assert status == 0
    assert out["prompt_ids"] == prompt_ids[0]
    assert out["ids"] == expected
    assert out["text"] == hf_tokenizer.decode(expected, skip_special_tokens=True)


def test_cli_suppresses_and_hides_special_tokens(cli_model, capsys):
    """Greedy after ``PICTURE``: with ``--sample-special`` the first token is ``<start_of_image>`` (hidden from
    the text, shown with ``--show-special``); by default no token of the suppression set is produced."""
    argv = ["generate", PICTURE, "--max-new-tokens", "6", "--json"]
    runs = {}
    for name, extra in (("default", []), ("sampled", ["--sample-special"])):
        assert main(argv + extra) == 0
        runs[name] = json.loads(capsys.readouterr().out)
    suppressed = set(cli_model.suppress_ids)
    image = cli_model.tokenizer.convert_tokens_to_ids("<start_of_image>")
    assert image in suppressed
    assert runs["sampled"]["ids"][0] == image
    assert runs["default"]["ids"] and not set(runs["default"]["ids"]) & suppressed
    assert "<start_of_image>" not in runs["sampled"]["text"]
    shown = text_decoder(cli_model.tokenizer, suppressed, show_special=True)
    assert shown(runs["sampled"]["ids"]).startswith("<start_of_image>")
