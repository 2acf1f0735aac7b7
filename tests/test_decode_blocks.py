"""Decode blocks: several decode calls in one dispatched program (``MTIJAX_DECODE_BLOCK``).

A block is a while loop over the engine's one decode step, so the reference for every block size is the same
run dispatched one call at a time (block 1, the CPU's default): the same tokens, stops, policy records and
traces, for every technique. Block sizes 2 and 3 with 7 new tokens leave a last block that runs fewer calls,
and a stop token in the middle of a block.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

import mtijax
from mtijax.api import load
from mtijax.engine import loop
from mtijax.errors import MtijaxError
from mtijax.fusion import Decoding, generate_fused
from mtijax.fusion.stability import StabilityConfig
from mtijax.engine.sampling import Plain
from mtijax.generate import Sampling, generate, generate_stream, start_run
from mtijax.patching import generate_patched
from tests.conftest import random_prompts
from tests.test_composition import NEW, OLMOE, PROMPT, TECHNIQUES, Composed, fusion_of
from tests.test_generation import decode_step_compiles, random_tiny_model

BLOCKS = (2, 3)


@pytest.fixture(scope="module")
def model(tiny_gqa):
    return load(tiny_gqa[1], progress=False)


def in_blocks(monkeypatch, size: int) -> None:
    monkeypatch.setenv("MTIJAX_DECODE_BLOCK", str(size))


@pytest.mark.parametrize("size", BLOCKS)
@pytest.mark.parametrize("sampling", [Sampling(), Sampling(temperature=1.5, top_k=20)], ids=["greedy", "sampled"])
def test_blocks_give_the_tokens_and_stops_of_one_call_per_dispatch(model, monkeypatch, size, sampling):
    """Rows of different prompt lengths, 7 new tokens (not a whole number of blocks) and a stop token that row 0
    produces inside a block: tokens, lengths and stops equal the call-by-call run's, in ``generate`` and in
    ``generate_stream``."""
    prompts = random_prompts(32, [5, 12])
    free = generate(model.config, model.params, prompts, 7, sampling=sampling, seed=4, stop_ids=())
    row0 = free.tokens[0].tolist()
    k = next(i for i in range(2, 7) if i % size and row0[i] not in row0[:i] and row0[i] not in free.tokens[1])
    reference = generate(model.config, model.params, prompts, 7, sampling=sampling, seed=4, stop_ids=(row0[k],))
    assert reference.lengths.tolist() == [k + 1, 7]

    in_blocks(monkeypatch, size)
    for stops, want in (((), free), ((row0[k],), reference)):
        got = generate(model.config, model.params, prompts, 7, sampling=sampling, seed=4, stop_ids=stops)
        np.testing.assert_array_equal(got.tokens, want.tokens)
        np.testing.assert_array_equal(got.lengths, want.lengths)
        np.testing.assert_array_equal(got.stopped, want.stopped)
        streamed = np.stack(list(generate_stream(model.config, model.params, prompts, 7, sampling=sampling, seed=4,
                                                 stop_ids=stops)), axis=1)
        np.testing.assert_array_equal(streamed, want.tokens[:, :streamed.shape[1]])


def test_a_run_whose_rows_all_stop_ends_after_the_block_that_stops_them(model, monkeypatch):
    """The only row stops in block 0: the run yields that block's calls and no more (block 1, queued before block
    0's records were read, is the only work done past the stop)."""
    prompt = random_prompts(12, [8])
    free = generate(model.config, model.params, prompt, 12, stop_ids=()).tokens[0].tolist()
    k = next(i for i in range(3) if free[i] not in free[:i])
    in_blocks(monkeypatch, 3)
    _, steps = start_run(model.config, model.params, prompt, 12, policy=Plain(), stop_ids=(free[k],))
    records = [record for _, record in steps]
    assert len(records) == 3  # block 0 of the four that 12 tokens would take
    assert [int(r.token[0]) for r in records[:k + 1]] == free[:k + 1]
    assert not any(bool(r.emit[0]) for r in records[k + 1:])


@pytest.mark.parametrize("size", BLOCKS)
def test_every_technique_at_once_in_blocks_equals_the_teacher_forced_full_forward(monkeypatch, size):
    """Injection, static and per-step patches, fusion and the spiking gate together, decoded in blocks (the step
    patches index by the call inside the block, the gate's membranes and the fusion carries ride in the scanned
    state): the greedy tokens are the argmax of one full forward with the same interventions."""
    composed = Composed(OLMOE, TECHNIQUES)
    in_blocks(monkeypatch, size)
    gen = mtijax.generate(OLMOE, composed.params, [PROMPT], NEW, stop_ids=(), interventions=composed.interventions())
    text = PROMPT + gen.ids(0)
    np.testing.assert_array_equal(gen.ids(0), composed.teacher_forced_argmax(text[:-1])[len(PROMPT) - 1:])


def test_stability_aware_generation_in_blocks_keeps_its_trace_and_its_stop(monkeypatch):
    """Fusion's policy (auto-temperature, stop on instability) reads the same trace in blocks, and a threshold
    that stops the row inside a block stops it at the same call."""
    fusion, variables = fusion_of(OLMOE)
    params = mtijax.init_params(OLMOE, jax.random.key(0), scale=0.6)

    def run(threshold: float | None):
        decoding = Decoding(Sampling(0.9, top_k=3), auto_temperature=True, stop_on_instability=threshold is not None,
                            stability=StabilityConfig(lyapunov_threshold=threshold or 1.0))
        return generate_fused(OLMOE, params, fusion, variables, [PROMPT], 7, decoding=decoding, seed=2, stop_ids=())

    free = run(None)
    lyapunov = free.trace.lyapunov[0]
    crossing = next(k for k in range(1, 7) if lyapunov[k] > max(lyapunov[:k].max(), 0.0))
    threshold = float((lyapunov[crossing] + max(lyapunov[:crossing].max(), 0.0)) / 2)
    stopped = run(threshold)
    assert stopped.lengths[0] == crossing
    in_blocks(monkeypatch, 3)
    for want, got in ((free, run(None)), (stopped, run(threshold))):
        np.testing.assert_array_equal(got.tokens, want.tokens)
        assert got.lengths.tolist() == want.lengths.tolist() and got.unstable.tolist() == want.unstable.tolist()
        for name in ("entropy", "coherence", "lyapunov", "temperature"):
            np.testing.assert_allclose(getattr(got.trace, name), getattr(want.trace, name), atol=1e-6, err_msg=name)


def test_patched_generation_in_blocks_keeps_its_first_logits_and_traces(model, monkeypatch):
    """``generate_patched`` records call 0's logits and a site at every call: both equal the call-by-call run's."""
    target = random_prompts(51, [10])[0]
    want = generate_patched(model.config, model.params, target, max_new_tokens=7, stop_ids=(), trace={"attn_v": (0, 3)})
    in_blocks(monkeypatch, 2)
    got = generate_patched(model.config, model.params, target, max_new_tokens=7, stop_ids=(), trace={"attn_v": (0, 3)})
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_allclose(got.first_logits, want.first_logits, atol=1e-6, rtol=0)
    np.testing.assert_allclose(got.trace["attn_v"], want.trace["attn_v"], atol=1e-6, rtol=0)


def test_the_block_compiles_once_ahead_and_serves_every_prompt_length_and_max_new_tokens(monkeypatch):
    """With blocks the decode step is never compiled alone: the block compiles once, on the compile-ahead thread,
    and new prompt lengths and ``max_new_tokens`` (a last block of any length) compile nothing more."""
    in_blocks(monkeypatch, 4)
    m = random_tiny_model(vocab_size=263)  # a signature this process has not compiled
    before = loop.compiled_counts()
    with decode_step_compiles() as threads:
        for length, new in ((5, 4), (9, 7), (70, 2), (33, 13)):
            generate(m.config, m.params, random_prompts(length, [length]), new, stop_ids=())
    after = loop.compiled_counts()
    assert after["decode_block"] == before["decode_block"] + 1 and after["decode_step"] == before["decode_step"]
    assert len(threads) == 1 and threads[0].startswith("mtijax-compile-ahead")


@pytest.mark.parametrize("committed", [False, True], ids=["params from a jit", "params device_put"])
def test_with_split_layers_the_block_compiles_ahead_from_abstract_inputs_and_is_found(monkeypatch, committed):
    """On accelerators the decode program takes per-layer buffers (``split_layers``), and its compile starts
    before the split, the empty cache and the row keys exist, from their shapes: the first call still finds that
    program (one compile, on the compile-ahead thread), and the tokens equal the stacked run's."""
    m = random_tiny_model(vocab_size=264 + committed)  # a signature this process has not compiled
    params = jax.device_put(m.params, jax.devices()[0]) if committed else m.params
    prompts = random_prompts(6, [6, 3])
    want = generate(m.config, params, prompts, 5, stop_ids=())
    in_blocks(monkeypatch, 2)
    monkeypatch.setattr(loop, "split_layers", lambda params: True)
    with decode_step_compiles() as threads:
        got = generate(m.config, params, prompts, 5, stop_ids=())
        generate(m.config, params, random_prompts(6, [9, 4]), 3, stop_ids=())
    np.testing.assert_array_equal(got.tokens, want.tokens)
    assert len(threads) == 1 and threads[0].startswith("mtijax-compile-ahead")


@pytest.mark.parametrize("value", ["0", "-2", "eight"])
def test_a_block_size_that_is_not_a_positive_integer_is_refused(model, monkeypatch, value):
    monkeypatch.setenv("MTIJAX_DECODE_BLOCK", value)
    with pytest.raises(MtijaxError, match="MTIJAX_DECODE_BLOCK must be a positive integer"):
        generate(model.config, model.params, [[3, 4]], 2)


def test_a_block_runs_only_the_calls_it_counts(model, monkeypatch):
    """A one-token request in blocks of 4 runs one decode call, not four: the state after it has taken one step
    and written one slot past each prompt (a block's later calls would have written three more)."""
    prompts = random_prompts(40, [5, 9])
    in_blocks(monkeypatch, 4)
    request, steps = start_run(model.config, model.params, prompts, 1, policy=Plain(), stop_ids=())
    (state, record), = list(steps)
    assert int(state.step) == 1
    written = np.asarray(state.cache.positions) >= 0
    assert written.sum(axis=1).tolist() == [5, 9]
    assert int(record.token[0]) == generate(model.config, model.params, prompts, 1, stop_ids=()).tokens[0, 0]
