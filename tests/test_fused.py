"""The fused q/k/v layout that decoding uses computes what the documented layout computes.

``fuse_qkv`` concatenates each layer's q, k and v projections into one
matrix; the block then runs one product instead of three. The oracle is
``transformers`` on the same checkpoint.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import mtijax
from mtijax.models.fused import LAYOUT, fuse_qkv
from tests.conftest import random_prompts, write_checkpoint
from tests.olmoe_fixtures import make_olmoe_model

SITES = ("attn_q", "attn_k", "attn_v")


@pytest.fixture(scope="module", params=["gemma3", "olmoe"])
def checkpoint(request, tiny_gqa, tmp_path_factory):
    """(transformers model, mtijax model) of a tiny grouped-query Gemma 3 or OLMoE checkpoint."""
    if request.param == "gemma3":
        hf, directory = tiny_gqa
    else:
        hf = make_olmoe_model("e8_top1_gqa")
        directory = write_checkpoint(hf, tmp_path_factory.mktemp("olmoe-fused"))
    return hf, mtijax.load(directory, progress=False)


def test_fused_params_give_transformers_logits_and_the_same_activations(checkpoint):
    hf, model = checkpoint
    tokens = np.array(random_prompts(41, [10, 10]))
    fused = fuse_qkv(model.params)
    out = mtijax.forward(model.config, fused, jnp.asarray(tokens), capture=SITES, layout=LAYOUT)
    with torch.no_grad():
        reference = hf(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(np.asarray(out.logits), reference, atol=1e-4, rtol=1e-4)
    plain = mtijax.forward(model.config, model.params, jnp.asarray(tokens), capture=SITES)
    for site in SITES:
        np.testing.assert_allclose(np.asarray(out.captured[site]), np.asarray(plain.captured[site]),
                                   atol=1e-5, rtol=1e-5)


def test_fuse_qkv_builds_new_dicts_and_keeps_other_arrays(checkpoint):
    _, model = checkpoint
    attn = model.params["layers"]["attn"]
    fused = fuse_qkv(model.params)
    assert set(attn) >= {"q_proj", "k_proj", "v_proj"}, "the input params are left as they were"
    assert "qkv_proj" in fused["layers"]["attn"] and "q_proj" not in fused["layers"]["attn"]
    assert fused["layers"]["attn"]["o_proj"] is attn["o_proj"]
    assert fused["embed"] is model.params["embed"]
    width = sum(attn[name].shape[-1] for name in ("q_proj", "k_proj", "v_proj"))
    assert fused["layers"]["attn"]["qkv_proj"].shape == (*attn["q_proj"].shape[:-1], width)
