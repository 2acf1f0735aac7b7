"""Gemma 3 forward and greedy generation agree with Hugging Face transformers (CPU, float32)."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import torch

from mtijax.api import load
from mtijax.cli import main
from mtijax.generate import generate
from mtijax.models.decoder import forward
from tests.conftest import random_prompts


def test_logits_match_transformers(tiny):
    hf, directory = tiny
    model = load(directory, progress=False)
    tokens = np.array(random_prompts(1, [17, 17]))  # longer than every sliding window
    with torch.no_grad():
        expected = hf(torch.tensor(tokens)).logits.numpy()
    got = np.asarray(forward(model.config, model.params, jnp.asarray(tokens)).logits)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_greedy_tokens_match_transformers(tiny):
    hf, directory = tiny
    model = load(directory, progress=False)
    prompt = random_prompts(2, [9])[0]
    with torch.no_grad():
        expected = hf.generate(torch.tensor([prompt]), max_new_tokens=14, do_sample=False,
                               eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    got = generate(model.config, model.params, [prompt], 14, stop_ids=()).tokens[0].tolist()
    assert got == expected
    assert len(set(expected)) > 2, "the reference continuation should not be degenerate"


def test_cli_greedy_tokens_match_transformers(tiny_gqa, capsys):
    hf, directory = tiny_gqa
    prompt = random_prompts(3, [7])[0]
    with torch.no_grad():
        expected = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                               eos_token_id=1, pad_token_id=0)[0, len(prompt):].tolist()
    expected = expected[: expected.index(1)] if 1 in expected else expected
    status = main(["generate", "--model", str(directory), "--token-ids", ",".join(map(str, prompt)),
                   "--max-new-tokens", "12", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert status == 0
    assert out["prompt_ids"] == prompt
    assert out["ids"] == expected
