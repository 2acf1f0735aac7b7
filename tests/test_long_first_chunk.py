"""The long first prefill call (``Ladder.long_chunk``): a long prompt's first slots in one call, whose tokens attend
to each other only and whose keys and values are written into the cache afterwards.

The first request of a signature runs short chunks while the long call compiles in the background; once it is
built, later requests take it. References: the same request in short chunks only (logits), transformers' greedy
generation, and, with every technique at once, the teacher-forced full forward.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtijax.api import load
from mtijax.engine import loop, settle_compiles
from mtijax.engine.ladder import Ladder
from mtijax.engine.sampling import Plain, Sampling
from mtijax.errors import MtijaxError
from mtijax.generate import generate, start_run
from tests.conftest import random_prompts
from tests.test_composition import GEMMA, NEW, OLMOE, PROMPT, Composed

SHORT = Ladder(chunk=2, min_cache=16)
LONG = Ladder(chunk=2, min_cache=16, long_chunk=8)
LENGTHS = (11, 6)
"""Prompt lengths: a prefill 10 slots wide, so one long call of 8 slots and one chunk of 2, past every tiny
model's window (4 to 6)."""


@pytest.fixture
def long_calls(monkeypatch) -> list[int]:
    """The widths of the long first calls that runs make (each run's, appended as it makes it)."""
    calls: list[int] = []
    original = loop.Resident.prefill_first

    def counted(self, cache, carry, router_state, tokens, *rest):
        calls.append(tokens.shape[1])
        return original(self, cache, carry, router_state, tokens, *rest)

    monkeypatch.setattr(loop.Resident, "prefill_first", counted)
    return calls


def logits_of(config, params, prompts, new, ladder, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """``(tokens [B, new], logits [new, B, V])`` of a greedy run."""
    request, steps = start_run(config, params, prompts, new, policy=Plain(Sampling()), stop_ids=(), ladder=ladder,
                               record_logits=True, **kwargs)
    records = [record for _, record in steps]
    tokens = np.stack([np.asarray(r.token)[:request.batch] for r in records], axis=1)
    return tokens, np.stack([np.asarray(r.logits)[:request.batch] for r in records])


def test_the_long_call_serves_once_built_and_equals_short_chunks_and_transformers(tiny, long_calls):
    hf, directory = tiny
    m = load(directory, progress=False)
    prompts = random_prompts(5, list(LENGTHS))
    want_tokens, want_logits = logits_of(m.config, m.params, prompts, 9, SHORT)
    first_tokens, _ = logits_of(m.config, m.params, prompts, 9, LONG)
    assert long_calls == [], "the first request must not wait for the long call's compile"
    settle_compiles()
    tokens, logits = logits_of(m.config, m.params, prompts, 9, LONG)
    assert long_calls == [8]
    np.testing.assert_allclose(logits, want_logits, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(tokens, want_tokens)
    np.testing.assert_array_equal(first_tokens, want_tokens)
    for row, prompt in enumerate(prompts):
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=9, do_sample=False, eos_token_id=None,
                              pad_token_id=0)
        np.testing.assert_array_equal(tokens[row], out[0, len(prompt):].numpy())


@pytest.mark.parametrize("config,chosen", [(GEMMA, ("inject", "patch", "step_patch", "fusion")),
                                           (OLMOE, ("patch", "gate"))], ids=["gemma3", "olmoe_gate"])
def test_every_technique_through_the_long_call_equals_the_teacher_forced_forward(long_calls, config, chosen):
    """``PROMPT``'s prefill is 6 slots: one long call of 4 and one chunk of 2 (the gate's membranes carry from
    the long call into the chunk and on into decoding)."""
    composed = Composed(config, chosen)
    ladder = Ladder(chunk=2, min_cache=16, long_chunk=4)
    generate(config, composed.params, [PROMPT], NEW, stop_ids=(), interventions=composed.interventions(),
             ladder=ladder)
    settle_compiles()
    gen = generate(config, composed.params, [PROMPT], NEW, stop_ids=(), interventions=composed.interventions(),
                   ladder=ladder)
    assert long_calls == [4]
    text = PROMPT + gen.ids(0)
    np.testing.assert_array_equal(gen.ids(0), composed.teacher_forced_argmax(text[:-1])[len(PROMPT) - 1:])


def test_short_prompts_and_wide_batches_take_short_chunks_only():
    assert LONG.first_chunk(rows=1, width=6) is None
    assert LONG.first_chunk(rows=4, width=16) is None
    assert LONG.first_chunk(rows=2, width=10) == 8


@pytest.mark.parametrize("long_chunk", [2, 5, 1])
def test_a_long_chunk_that_is_not_a_larger_multiple_of_the_chunk_is_refused(long_chunk):
    with pytest.raises(MtijaxError, match="long prefill chunk must be a multiple of the chunk"):
        Ladder(chunk=2, long_chunk=long_chunk)
