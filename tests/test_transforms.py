"""Residual transforms: functions grafted onto the residual stream between blocks (``forward(transforms=...)``).

The oracle is a PyTorch forward hook on the ``transformers`` model that does
the same thing to the output of the same decoder layer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mtijax.api import load
from mtijax.errors import MtijaxError
from mtijax.models.cache import init_cache
from mtijax.models.decoder import forward
from tests.conftest import random_prompts


@pytest.fixture(scope="module")
def model(tiny_gqa):
    return load(tiny_gqa[1], progress=False)


@pytest.fixture(scope="module")
def tokens():
    return jnp.asarray(random_prompts(31, [11, 11]))


def test_identity_transforms_change_nothing(model, tokens):
    """Splitting the layer scan at transformed layers leaves logits, captures and the cache equal (up to float32
    rounding: XLA compiles the pieces separately)."""
    c = model.config
    cache = init_cache(c.num_layers, 2, 16, c.num_kv_heads, c.head_dim)
    plain = forward(model.config, model.params, tokens, cache=cache, capture=("resid_post", "attn_v"))
    identity = {0: lambda h, p: h, 2: lambda h, p: h, model.config.num_layers - 1: lambda h, p: h}
    split = forward(model.config, model.params, tokens, cache=cache, capture=("resid_post", "attn_v"),
                    transforms=identity)
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(split)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_transform_acts_between_blocks_like_a_hook_on_transformers(tiny_gqa, model, tokens):
    """Adding a position-dependent vector after block 1 gives the logits of transformers with a forward hook
    adding the same vector to decoder layer 1's output."""
    hf = tiny_gqa[0]
    d = model.config.hidden_size
    direction = np.random.default_rng(0).standard_normal(d).astype(np.float32)

    def push(h, positions):
        return h + 0.5 * positions[..., None].astype(h.dtype) * jnp.asarray(direction)

    ours = forward(model.config, model.params, tokens, transforms={1: push}).logits

    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        steps = torch.arange(hidden.shape[1], dtype=hidden.dtype)[None, :, None]
        pushed = hidden + 0.5 * steps * torch.from_numpy(direction)
        return (pushed, *output[1:]) if isinstance(output, tuple) else pushed

    handle = hf.model.layers[1].register_forward_hook(hook)
    try:
        with torch.no_grad():
            reference = hf(torch.tensor(np.asarray(tokens))).logits.numpy()
    finally:
        handle.remove()
    np.testing.assert_allclose(np.asarray(ours), reference, atol=1e-4, rtol=1e-4)


def test_gradient_reaches_parameters_the_transform_closes_over(model, tokens):
    """A transform's own parameters get gradients through the rest of the model; a zero scale gets a non-zero one."""
    def loss(scale):
        out = forward(model.config, model.params, tokens, transforms={0: lambda h, p: h * (1 + scale)})
        return jnp.mean(out.logits ** 2)

    grad = jax.grad(loss)(jnp.float32(0.0))
    assert np.isfinite(grad) and grad != 0


@pytest.mark.parametrize("layer", [-1, 4, 99])
def test_transform_outside_the_model_is_an_error(model, tokens, layer):
    with pytest.raises(MtijaxError, match=f"transform at layer {layer} is out of range"):
        forward(model.config, model.params, tokens, transforms={layer: lambda h, p: h})
