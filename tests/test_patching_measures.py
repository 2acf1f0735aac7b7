"""The measures of a behaviour transfer on hand-made inputs with known answers.

The participation ratio is also checked against the original's own formula
(``torch.linalg.svd`` of the window, ``(sum S^2)^2 / sum S^4``) on a random window.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mtijax.api import load
from mtijax.errors import MtijaxError
from mtijax.patching import MARKERS, behavior_score, capture, efficiency, participation_ratio, prompt_r_v, r_v
from mtijax.patching.measures import is_repetitive, markers_found, next_token_kl, window_r_v
from tests.conftest import random_prompts


def test_the_original_markers():
    assert len(MARKERS) == 21 and len(set(MARKERS)) == 21
    assert {"itself", "fixed point", "answer is", "answerer"} <= set(MARKERS)


@pytest.mark.parametrize("text, expected", [
    ("The history of Rome is long.", 0),
    ("It returns to itself.", 3),                          # return, itself, self (inside itself)
    ("ITSELF itself Itself", 2),                            # case-insensitive, each marker once
    ("The fixed point is the answer is the solution", 3),   # multi-word markers
    ("The answerer", 1),                                    # "answer is" does not occur
    ("Selfish loops: recursively, eigenvalues.", 4),        # substrings: self, loop, recursive, eigen
])
def test_behavior_score_counts_each_marker_once_as_a_substring(text, expected):
    assert behavior_score(text) == expected


def test_repetition_bonus_follows_the_original_rule():
    """+5 when more than 10 words and fewer than 60% distinct (split on whitespace, case-sensitive)."""
    loop = "one of these " * 4  # 12 words, 3 distinct
    assert is_repetitive(loop) and behavior_score(loop) == 5
    assert not is_repetitive("a b " * 5)  # 10 words: not more than 10
    assert is_repetitive("a b " * 5 + "c")  # 11 words, 3 distinct
    six = "a b c d e f g h i j a b c d e"  # 15 words, 10 distinct: 66% >= 60%
    assert not is_repetitive(six)
    assert not is_repetitive("a A b B c C d D e e f f")  # 10 of 12 distinct as written (6 if lower-cased)
    assert behavior_score("self " * 12) == 1 + 5


def test_whole_words_and_custom_markers():
    text = "It returns to itself, self-aware; the loop's end."
    assert markers_found(text) == ["itself", "self", "loop", "return"]
    assert markers_found(text, whole_words=True) == ["itself", "self", "loop"]
    assert behavior_score(text, ("aware", "end", "rome")) == 2
    assert behavior_score(text, ("aware", "end", "rome"), whole_words=True) == 2


def test_efficiency_and_its_undefined_case():
    assert efficiency(3, 1, 5) == 0.5
    assert efficiency(5, 1, 5) == 1.0
    assert efficiency(0, 1, 5) == -0.25
    assert efficiency(3, 2, 2) is None
    assert efficiency(1, 4, 2) == 1.5  # champion below baseline: a defined ratio of two negative gaps


def test_participation_ratio_of_windows_with_known_spectra():
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((16, 16)))  # orthonormal rows
    rank_one = np.outer(rng.standard_normal(16), rng.standard_normal(32))
    assert participation_ratio(rank_one) == pytest.approx(1.0)
    equal = 3.0 * np.eye(16)[:4]  # 4 orthogonal rows of equal norm
    assert participation_ratio(equal) == pytest.approx(4.0)
    # singular values 3 and 1: (9 + 1)^2 / (81 + 1)
    rotation = np.array([[np.cos(0.3), -np.sin(0.3)], [np.sin(0.3), np.cos(0.3)]])
    assert participation_ratio(rotation @ np.diag([3.0, 1.0]) @ q[:2]) == pytest.approx(100 / 82)
    assert np.isnan(participation_ratio(np.zeros((16, 8))))


def test_centring_is_optional():
    """Identical rows: rank one uncentred, nothing left once the mean is removed (undefined)."""
    rows = np.tile(np.arange(1.0, 9.0), (16, 1))
    assert participation_ratio(rows) == pytest.approx(1.0)
    assert np.isnan(participation_ratio(rows, centre=True))
    shifted = np.eye(16)[:, :8] + 5.0
    assert participation_ratio(shifted, centre=True) != pytest.approx(participation_ratio(shifted))


def test_participation_ratio_matches_the_originals_torch_formula():
    window = np.random.default_rng(1).standard_normal((16, 64)).astype(np.float32)
    s = torch.linalg.svd(torch.tensor(window))[1]
    eig = s**2
    original = float((eig.sum() ** 2) / (eig**2).sum())
    assert participation_ratio(window) == pytest.approx(original, rel=1e-5)


def test_r_v_is_late_over_early():
    early, late = 2.0 * np.eye(16)[:4], np.outer(np.ones(16), np.ones(8))
    assert r_v(early, late) == pytest.approx(1 / 4)
    trace_early = np.concatenate([np.zeros((3, 16)), np.eye(16)[:8]])
    trace_late = np.concatenate([np.zeros((3, 16)), np.eye(16)[:4], np.eye(16)[:4]])
    assert window_r_v(trace_early, trace_late, 11, window=8) == pytest.approx(4 / 8)
    assert np.isnan(window_r_v(trace_early, trace_late, 5, window=8))


def test_prompt_r_v_reads_the_value_projections_of_the_last_window(tiny_gqa):
    m = load(tiny_gqa[1], progress=False)
    prompt = random_prompts(61, [20])[0]
    values = np.asarray(capture(m.config, m.params, jnp.asarray([prompt]), sites=("attn_v",)).activations["attn_v"])
    expected = participation_ratio(values[3, 0, -16:].reshape(16, -1)) / participation_ratio(
        values[1, 0, -16:].reshape(16, -1))
    assert prompt_r_v(m.config, m.params, prompt, layers=(1, 3)) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(MtijaxError, match="at least 11 layers"):
        prompt_r_v(m.config, m.params, prompt)
    with pytest.raises(MtijaxError, match="needs at least 16 prompt tokens"):
        prompt_r_v(m.config, m.params, prompt[:9], layers=(1, 3))


def test_next_token_kl_against_numpy():
    rng = np.random.default_rng(2)
    p_logits, q_logits = rng.standard_normal((2, 50)).astype(np.float32)
    p = np.exp(p_logits - p_logits.max())
    p /= p.sum()
    q = np.exp(q_logits - q_logits.max())
    q /= q.sum()
    assert next_token_kl(q_logits, p_logits) == pytest.approx(np.sum(p * np.log(p / q)), rel=1e-4)
    assert next_token_kl(p_logits, p_logits) == pytest.approx(0.0, abs=1e-6)


def test_seed_layers_scale_by_relative_depth():
    from mtijax.patching.study import scale_layer

    assert [scale_layer(l, 18) for l in (0, 5, 18, 27, 31)] == [0, 3, 10, 15, 17]
    assert [scale_layer(l, 32) for l in (5, 18, 27)] == [5, 18, 27]


def test_study_strategies_as_ran_and_as_described():
    """As ran: the original's hooks (never firing at decode steps); as described: applied at every decode step.
    Both with the original's last_min KV surgery and re-fed last token."""
    from mtijax.patching.study import Settings, strategy_plan

    ran = strategy_plan("kv+resid+v", "as_ran", 15, 10, Settings())
    assert [(p.site, p.layers, p.decode, p.window) for p in ran.patches] == [
        ("resid_pre", (10,), "hook", 16), ("attn_v", (15,), "hook", 16)]
    assert ran.kv.policy == "last_min" and ran.kv.layers is None and ran.first_token == "refeed"
    described = strategy_plan("kv+v", "as_described", 15, 10, Settings(decode="mean"))
    assert [(p.site, p.decode) for p in described.patches] == [("attn_v", "mean")]
    assert strategy_plan("kv", "as_described", 15, 10, Settings()).patches == ()
    assert strategy_plan("v", "as_ran", 15, 10, Settings()).kv is None
