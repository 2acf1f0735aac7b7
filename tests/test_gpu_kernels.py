"""GPU-only: OLMoE's expert kernels compiled through Triton compute what the gathered and dense dispatches compute.

The CPU suite runs the same kernels interpreted (``tests/test_olmoe.py``); here they run as the GPU runs them, and
these tests are skipped on every other backend. Everything is float32 with full-precision XLA matmuls (GPUs
default to TF32), so the two dispatches differ only by their summation order. The widths span several kernel tiles
(hidden 512 = 4 row tiles of 128, intermediate 256 = 4 column tiles of 64).

On the device: ``python -m pytest tests/test_gpu_kernels.py -v`` (its output is committed under
``experiments/results/``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtijax
from mtijax.models.olmoe import kernels, model as olmoe
from tests.conftest import random_prompts

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="the kernels compile through Triton on GPUs")

CONFIG = mtijax.OlmoeConfig(vocab_size=1024, hidden_size=512, intermediate_size=256, num_layers=2, num_heads=8,
                            num_kv_heads=4, num_experts=16, num_experts_per_tok=2)


@pytest.fixture(autouse=True)
def full_precision():
    with jax.default_matmul_precision("highest"):
        yield


@pytest.fixture(scope="module")
def params():
    return mtijax.init_params(CONFIG, jax.random.key(0), jnp.float32)


def test_a_few_tokens_take_the_in_place_kernels_on_the_gpu():
    assert olmoe.choose_dispatch(CONFIG, 1) == "in_place"
    assert olmoe.choose_dispatch(CONFIG, 4) == "in_place"  # 8 pairs < 16 experts


@pytest.mark.parametrize("tokens", [1, 3, 7])
def test_the_compiled_kernels_equal_the_gathered_dispatch(params, tokens):
    moe = jax.tree.map(lambda a: a[1], params["layers"]["moe"])
    x = jax.random.normal(jax.random.key(tokens), (tokens, CONFIG.hidden_size), jnp.float32)
    experts, weights = olmoe.route(CONFIG, x @ moe["router"])
    want = jax.jit(olmoe.experts_gathered)(moe, x, experts, weights)
    got = jax.jit(lambda *a: kernels.experts_gathered_in_place(*a, interpret=False))(moe, x, experts, weights)
    scale = float(jnp.max(jnp.abs(want)))
    assert scale > 0
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5 * scale, rtol=0)


@pytest.mark.parametrize("tokens", [8, 45, 300])
def test_the_compiled_tiled_product_equals_the_dense_dispatch(params, tokens):
    """The many-token dispatch: 16 to 600 pairs over 16 experts, so some experts' groups span several tiles and
    others are empty."""
    assert olmoe.choose_dispatch(CONFIG, tokens) == "tiled"
    moe = jax.tree.map(lambda a: a[0], params["layers"]["moe"])
    x = jax.random.normal(jax.random.key(tokens), (tokens, CONFIG.hidden_size), jnp.float32)
    experts, weights = olmoe.route(CONFIG, x @ moe["router"])
    want = jax.jit(olmoe.experts_dense)(moe, x, experts, weights)
    got = jax.jit(lambda *a: kernels.experts_tiled(*a, interpret=False))(moe, x, experts, weights)
    scale = float(jnp.max(jnp.abs(want)))
    assert scale > 0
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5 * scale, rtol=0)


def test_greedy_tokens_are_the_same_with_and_without_the_kernels(params, monkeypatch):
    """``MTIJAX_PALLAS=0`` is read when a step is traced, so every program is compiled afresh for each setting."""
    prompts = random_prompts(0, [9, 5], CONFIG.vocab_size)
    runs = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("MTIJAX_PALLAS", flag)
        jax.clear_caches()
        runs[flag] = mtijax.generate(CONFIG, params, prompts, 16, stop_ids=()).tokens
    np.testing.assert_array_equal(runs["1"], runs["0"])
