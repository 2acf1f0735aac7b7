"""Attention over key segments (the cache, then this call's keys) is softmax attention over all their keys.

The segments' softmax is joined without joining their scores, so these tests hold it against a plain
numpy softmax over the concatenated keys: the same values, the same gradients, and the same answer for a
query that can see nothing (padding) as for one that sees every key. Both of attention's forms (matrix products,
or products summed in one fused reduction: the decode step's default) are held to the same reference.
"""

from __future__ import annotations

import jax
import pytest
import jax.numpy as jnp
import numpy as np

from mtijax.models.layers import NO_WINDOW, REDUCE_MAX_QUERIES, attention, attention_form

B, S, N, K, H = 2, 3, 4, 2, 8


def reference(q: np.ndarray, q_pos: np.ndarray, k: np.ndarray, v: np.ndarray, k_pos: np.ndarray, window: int,
              scale: float) -> np.ndarray:
    """Grouped-query attention written out in numpy over one key array ``k, v [B, T, K, H]``."""
    out = np.zeros(q.shape, np.float64)
    group = N // K
    for b in range(B):
        for s in range(S):
            visible = (k_pos[b] >= 0) & (k_pos[b] <= q_pos[b, s]) & (q_pos[b, s] - k_pos[b] < window)
            for n in range(N):
                scores = k[b, :, n // group] @ q[b, s, n] * scale
                scores = np.where(visible, scores, -1e30)
                weights = np.exp(scores - scores.max())
                out[b, s, n] = weights @ v[b, :, n // group] / weights.sum()
    return out


def setup(seed: int = 0):
    rng = np.random.default_rng(seed)
    cache_pos = np.array([[-1, -1, 0, 1, 2], [0, 1, 2, 3, 4]], np.int32)  # row 0 left-padded
    new_pos = np.array([[3, 4, -1], [5, 6, 7]], np.int32)  # row 0's last query is padding
    q = rng.normal(size=(B, S, N, H)).astype(np.float32)
    k_cache, v_cache = (rng.normal(size=(B, 5, K, H)).astype(np.float32) for _ in range(2))
    k_new, v_new = (rng.normal(size=(B, S, K, H)).astype(np.float32) for _ in range(2))
    return q, new_pos, (k_cache, v_cache, cache_pos), (k_new, v_new, new_pos)


@pytest.mark.parametrize("form", ["matmul", "reduce"])
def test_two_segments_equal_softmax_attention_over_their_concatenated_keys(form, monkeypatch):
    monkeypatch.setenv("MTIJAX_ATTENTION", form)
    q, q_pos, cache, new = setup()
    for window in (NO_WINDOW, 3):
        got = attention(jnp.asarray(q), jnp.asarray(q_pos), [tuple(map(jnp.asarray, cache)),
                                                            tuple(map(jnp.asarray, new))], jnp.int32(window), 0.3)
        k, v, k_pos = (np.concatenate([a, b], axis=1) for a, b in zip(cache, new))
        want = reference(q, q_pos, k, v, k_pos, window, 0.3)
        visible_rows = q_pos >= 0
        np.testing.assert_allclose(np.asarray(got)[visible_rows], want[visible_rows], rtol=1e-5, atol=1e-5)
        assert np.isfinite(np.asarray(got)).all()  # the padding query sees nothing and still gets numbers


def test_splitting_the_keys_into_segments_changes_neither_values_nor_gradients():
    q, q_pos, cache, new = setup(1)
    positions = [jnp.asarray(cache[2]), jnp.asarray(new[2])]

    def loss(q, keys, values, parts):
        segments = list(zip(keys, values, parts))
        return jnp.sum(jnp.sin(attention(q, jnp.asarray(q_pos), segments, jnp.int32(NO_WINDOW), 0.3)))

    split = ([jnp.asarray(cache[0]), jnp.asarray(new[0])], [jnp.asarray(cache[1]), jnp.asarray(new[1])])
    one = ([jnp.concatenate(split[0], axis=1)], [jnp.concatenate(split[1], axis=1)])
    grad = jax.value_and_grad(loss, argnums=(0, 1, 2))
    value_split, (dq_split, dk_split, dv_split) = grad(jnp.asarray(q), *split, positions)
    value_one, (dq_one, dk_one, dv_one) = grad(jnp.asarray(q), *one, [jnp.concatenate(positions, axis=1)])
    np.testing.assert_allclose(value_split, value_one, rtol=1e-5)
    np.testing.assert_allclose(dq_split, dq_one, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.concatenate(dk_split, axis=1), dk_one[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.concatenate(dv_split, axis=1), dv_one[0], rtol=1e-4, atol=1e-5)


def test_decode_steps_take_the_reduced_form_and_prefill_chunks_the_matrix_form(monkeypatch):
    monkeypatch.delenv("MTIJAX_ATTENTION", raising=False)
    assert attention_form(1) == attention_form(REDUCE_MAX_QUERIES) == "reduce"
    assert attention_form(REDUCE_MAX_QUERIES + 1) == attention_form(256 * 4) == "matmul"
    monkeypatch.setenv("MTIJAX_ATTENTION", "matmul")
    assert attention_form(1) == "matmul"


def test_an_unknown_attention_form_is_refused(monkeypatch):
    monkeypatch.setenv("MTIJAX_ATTENTION", "flash")
    with pytest.raises(ValueError, match="MTIJAX_ATTENTION must be one of matmul, reduce, got 'flash'"):
        attention_form(1)
