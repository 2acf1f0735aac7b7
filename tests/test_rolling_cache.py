"""The rolling KV cache: sliding layers keep a ring of ``window`` slots, full-attention layers every slot.

References: the same calls over the full layout (every layer keeps every slot), a cache-free forward over each
row's whole unpadded sequence, and transformers' own greedy generation. Prompts and generations run past the
window, batches are left-padded, and prefill chunks are shorter and longer than the window.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mtijax.api import load
from mtijax.config import preset
from mtijax.engine.ladder import Ladder
from mtijax.engine.sampling import Plain, Sampling
from mtijax.generate import generate, start_run
from mtijax.models.cache import init_cache
from mtijax.models.decoder import family, forward
from tests.conftest import left_padded, random_prompts

forward_jit = jax.jit(forward, static_argnames=("config",))
LENGTHS = (11, 6)
"""Prompt lengths of the two rows: both past every tiny model's window (4 to 6), the second left-padded."""
STEPS = 9


def windows(config) -> np.ndarray:
    return family(config).layer_spec(config)["window"]


def run_cache(config, params, cache, sequences: list[list[int]], chunk: int) -> list[np.ndarray]:
    """Prefill the prompts (all but ``STEPS`` tokens of each sequence) in chunks of ``chunk`` slots, then feed
    the continuations one token a step; each call's logits of every row's newest token, ``[B, V]``."""
    prompts = [s[:len(s) - STEPS] for s in sequences]
    tokens, positions = map(jnp.asarray, left_padded(prompts))
    width = tokens.shape[1]
    logits = []
    for begin in range(0, width, chunk):
        out = forward_jit(config, params, tokens[:, begin:begin + chunk], positions[:, begin:begin + chunk],
                          cache=cache, write_index=begin)
        cache = out.cache
    logits.append(np.asarray(out.logits[:, -1]))
    for step in range(STEPS - 1):
        token = jnp.asarray([[s[len(p) + step]] for s, p in zip(sequences, prompts)], jnp.int32)
        position = jnp.asarray([[len(p) + step] for p in prompts], jnp.int32)
        out = forward_jit(config, params, token, position, cache=cache, write_index=width + step)
        cache = out.cache
        logits.append(np.asarray(out.logits[:, 0]))
    return logits


@pytest.mark.parametrize("chunk", [3, 11], ids=["chunks_shorter_than_the_window", "one_chunk_past_the_window"])
def test_rolling_cache_equals_the_full_cache_and_a_cache_free_forward(tiny, chunk):
    _, directory = tiny
    m = load(directory, progress=False)
    config, params = m.config, m.params
    sequences = random_prompts(7, [n + STEPS for n in LENGTHS])
    length = max(LENGTHS) + STEPS + 2
    rolling = init_cache(config.num_layers, 2, length, config.num_kv_heads, config.head_dim,
                         windows=windows(config))
    assert rolling.ring is not None and rolling.ring.length == config.sliding_window
    full = init_cache(config.num_layers, 2, length, config.num_kv_heads, config.head_dim)

    with_ring = run_cache(config, params, rolling, sequences, chunk)
    without = run_cache(config, params, full, sequences, chunk)
    for step, (a, b) in enumerate(zip(with_ring, without)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0, err_msg=f"call {step}")
    for row, sequence in enumerate(sequences):
        reference = np.asarray(forward_jit(config, params, jnp.asarray([sequence])).logits[0])
        first = len(sequence) - STEPS - 1
        np.testing.assert_allclose(np.stack([a[row] for a in with_ring]), reference[first:first + STEPS],
                                   atol=1e-4, rtol=0, err_msg=f"row {row}")


def test_greedy_generation_past_the_window_equals_transformers(tiny):
    hf, directory = tiny
    m = load(directory, progress=False)
    prompts = random_prompts(3, list(LENGTHS))
    ladder = Ladder(chunk=4, min_cache=16)
    _, steps = start_run(m.config, m.params, prompts, 12, policy=Plain(Sampling()), stop_ids=(), ladder=ladder)
    state, _ = next(steps)
    assert state.cache.ring.length == m.config.sliding_window  # the engine's cache rolls
    gen = generate(m.config, m.params, prompts, 12, stop_ids=(), ladder=ladder)
    for row, prompt in enumerate(prompts):
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                              pad_token_id=0)
        np.testing.assert_array_equal(np.asarray(gen.tokens[row]), out[0, len(prompt):].numpy())


def test_the_rolling_layout_of_gemma3_270m_at_32k_slots():
    """Fifteen sliding layers keep 512 slots; the three global layers keep all 32,768 (under a fifth of the
    bytes of the full layout)."""
    config = preset("gemma3-270m")
    shapes = jax.eval_shape(lambda: init_cache(config.num_layers, 1, 32768, config.num_kv_heads, config.head_dim,
                                               jnp.bfloat16, windows(config)))
    assert shapes.k.shape == (3, 1, 32768, 1, 256) and shapes.positions.shape == (1, 32768)
    assert shapes.ring.k.shape == (15, 1, 512, 1, 256) and shapes.ring.positions.shape == (1, 512)
    full = jax.eval_shape(lambda: init_cache(config.num_layers, 1, 32768, config.num_kv_heads, config.head_dim,
                                             jnp.bfloat16))
    size = lambda c: sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(c))
    assert size(full) / size(shapes) > 5


def test_rolling_false_keeps_the_engine_on_the_full_layout(tiny_gqa):
    m = load(tiny_gqa[1], progress=False)
    _, steps = start_run(m.config, m.params, random_prompts(3, [9]), 2, policy=Plain(Sampling()), stop_ids=(),
                         ladder=Ladder(chunk=4, min_cache=16, rolling=False))
    state, _ = next(steps)
    assert state.cache.ring is None and state.cache.k.shape[0] == m.config.num_layers


def test_a_cache_no_longer_than_the_window_keeps_the_full_layout():
    config = preset("gemma3-270m")
    cache = jax.eval_shape(lambda: init_cache(config.num_layers, 1, 512, config.num_kv_heads, config.head_dim,
                                              windows=windows(config)))
    assert cache.ring is None and cache.k.shape[0] == config.num_layers
