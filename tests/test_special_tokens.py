"""The suppression set: the tokens a text model never samples, and the tokens decoding hides.

transformers is the reference for the mechanism: suppressing ids in ``mtijax.generate`` gives the
continuation transformers' ``generate(suppress_tokens=...)`` gives. The set itself is read from the
real Gemma 3 vocabulary (the GGUF header) and from a hand-made tokenizer.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mtijax.api import load, open_checkpoint
from mtijax.config import PRESETS
from mtijax.generate import Sampling, generate, sample
from mtijax.special_tokens import AddedToken, suppress_ids, text_decoder, tokenizer_added_tokens
from tests.conftest import random_prompts


@pytest.mark.parametrize("sampling", [Sampling(), Sampling(0.7), Sampling(1.0, top_k=2), Sampling(1.0, top_p=0.9)],
                         ids=["greedy", "temperature", "top-k", "top-p"])
def test_suppressed_ids_are_never_sampled(sampling):
    """Row 0 puts almost all its mass on id 1, row 1 on id 0; both are suppressed, so every draw is 2 or 3."""
    logits = jnp.array([[0.0, 12.0, 1.0, 0.5], [12.0, 0.0, 0.5, 1.0]])
    drawn = np.stack([np.asarray(sample(logits, jax.random.key(seed), sampling, suppress_ids=[0, 1]))
                      for seed in range(32)])
    assert set(drawn.ravel().tolist()) <= {2, 3}
    assert set(np.asarray(sample(logits, jax.random.key(0), sampling)).tolist()) == {0, 1}, "the control"


def test_suppression_gives_transformers_suppress_tokens_continuation(tiny_gqa):
    """The ids greedy decoding picks first are suppressed: both libraries continue the same other way."""
    hf, directory = tiny_gqa
    model = load(directory, tokenizer=False, progress=False)
    prompt = random_prompts(4, [8])[0]
    free = generate(model.config, model.params, [prompt], 10, stop_ids=()).ids(0)
    banned = sorted(set(free[:3]))
    got = generate(model.config, model.params, [prompt], 10, stop_ids=(), suppress_ids=banned).ids(0)
    with torch.no_grad():
        expected = hf.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=None,
                               pad_token_id=0, suppress_tokens=banned)[0, len(prompt):].tolist()
    assert got == expected
    assert not set(got) & set(banned) and got != free


def test_transformers_suppresses_nothing_by_default(tiny_gqa):
    """Gemma 3's generation defaults in transformers name no suppressed or banned tokens, and mtijax's API
    suppresses nothing unless asked (``suppress_ids=None``); the command line passes ``Model.suppress_ids``."""
    hf, _ = tiny_gqa
    assert hf.generation_config.suppress_tokens is None and hf.generation_config.bad_words_ids is None
    assert hf.generation_config.begin_suppress_tokens is None


def test_gemma3_vocabulary_suppression_set():
    """From the embedded 270M's GGUF header: image markers, [multimodal], <unusedN>, pad, BOS, unk, mask and the
    turn opener are suppressed; the stop tokens, whitespace runs and byte pieces are not."""
    checkpoint = open_checkpoint()
    tokens = checkpoint.tensors.tokens
    chosen = set(checkpoint.suppress_ids())
    names = {tokens[i] for i in chosen}
    assert {"<start_of_image>", "<end_of_image>", "[multimodal]", "<pad>", "<bos>", "<unk>", "<mask>",
            "<start_of_turn>", "<unused0>", "<unused6241>"} <= names
    assert sum(t.startswith("<unused") for t in tokens) == sum(n.startswith("<unused") for n in names)
    assert not {"<eos>", "<end_of_turn>"} & names
    assert all(t.startswith(("<", "[")) and t.endswith((">", "]")) and " " not in t for t in names)
    assert tokens.index("\n\n") not in chosen and tokens.index("<0x0A>") not in chosen


def test_suppression_set_of_a_tokenizer_follows_the_rule():
    """A byte-level tokenizer with Gemma-like added tokens: the special ones and the markup ones are suppressed,
    the stop token and a whitespace run are not; an id outside the vocabulary is dropped."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "a": 3, "b": 4}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="a")),
                                        pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")
    tokenizer.add_tokens(["<unused0>", "<start_of_turn>"], special_tokens=True)   # 5, 6
    tokenizer.add_tokens(["<start_of_image>", "\n\n", "[multimodal]", "<image_soft_token>"])  # 7, 8, 9, 10
    config = dataclasses.replace(PRESETS["gemma3-270m"], vocab_size=10, pad_token_id=0, bos_token_id=2,
                                 eos_token_ids=(1,))
    assert suppress_ids(config, tokenizer_added_tokens(tokenizer)) == (0, 2, 5, 6, 7, 9)
    assert suppress_ids(config, tokenizer_added_tokens(tokenizer), stop_ids=[6]) == (0, 2, 5, 7, 9)
    assert suppress_ids(config) == (0, 2), "without a vocabulary: the config's pad and BOS"


def test_decoding_hides_special_tokens_unless_asked():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "b": 1}, unk_token="a")))
    tokenizer.add_tokens(["<start_of_image>"])  # 2, an added token not marked special
    ids = [0, 2, 1]
    assert text_decoder(tokenizer, hidden=[2])(ids) == "a b"
    assert text_decoder(tokenizer, hidden=[2], show_special=True)(ids) == "a <start_of_image> b"
    assert AddedToken(2, "<start_of_image>", False) in tokenizer_added_tokens(tokenizer)
