"""Tiered compiles: a quick build (XLA's autotuner off) serves a program's first calls while the tuned build
compiles, and the run moves to the tuned build once it exists.

On accelerators this is the default; on the CPU the tests switch it on with ``MTIJAX_TIERED_COMPILE=1``. The
reference is the same generation with tiering off.
"""

from __future__ import annotations

import collections
import contextlib
import threading
from typing import Any, Callable, Iterator

import jax
import numpy as np
import pytest

from mtijax.engine import loop, settle_compiles
from mtijax.errors import MtijaxError
from mtijax.generate import Sampling, generate, generate_stream
from tests.conftest import random_prompts
from tests.test_generation import random_tiny_model


class CountedJit:
    """A jit that counts its calls; ``gate``, when given, holds every lowering until it is set."""

    def __init__(self, jit: Callable, gate: threading.Event | None = None) -> None:
        self.jit, self.gate, self.calls = jit, gate, 0

    def __call__(self, *args: Any) -> Any:
        self.calls += 1
        return self.jit(*args)

    def lower(self, *args: Any) -> Any:
        if self.gate is not None:
            self.gate.wait()
        return self.jit.lower(*args)


@pytest.fixture
def tiered(monkeypatch):
    monkeypatch.setenv("MTIJAX_TIERED_COMPILE", "1")


@pytest.mark.parametrize("block", [1, 3], ids=["step by step", "blocks of 3"])
def test_a_run_starts_on_the_quick_build_and_moves_to_the_tuned_one_with_the_same_tokens(tiered, monkeypatch,
                                                                                         block):
    """The tuned decode build is held back until the first tokens have come from the quick one; once it is
    built, the rest of the same run calls it, and the tokens equal a run without tiers (sampled, so the keys
    and every other piece of the decode state pass between the builds)."""
    monkeypatch.setenv("MTIJAX_DECODE_BLOCK", str(block))
    m = random_tiny_model(vocab_size=270 + block)  # a signature this process has not compiled
    prompts = random_prompts(8, [7, 3])
    sampling = Sampling(temperature=1.3, top_k=30)
    monkeypatch.setenv("MTIJAX_TIERED_COMPILE", "0")
    want = generate(m.config, m.params, prompts, 12, sampling=sampling, seed=5, stop_ids=()).tokens
    monkeypatch.setenv("MTIJAX_TIERED_COMPILE", "1")
    tiers = loop._block_tiers if block > 1 else loop._step_tiers
    gate = threading.Event()
    quick, tuned = CountedJit(tiers.quick), CountedJit(tiers.tuned, gate)
    monkeypatch.setattr(tiers, "quick", quick)
    monkeypatch.setattr(tiers, "tuned", tuned)
    steps = generate_stream(m.config, m.params, prompts, 12, sampling=sampling, seed=5, stop_ids=())
    got = [next(steps)]
    assert quick.calls >= 1 and tuned.calls == 0
    gate.set()
    settle_compiles()
    got += list(steps)
    assert tuned.calls >= 1
    np.testing.assert_array_equal(np.stack(got, axis=1), want)


@contextlib.contextmanager
def compiles() -> Iterator[collections.Counter]:
    """Every backend compile while the block runs, by function name (``jit(prefill_chunk)``, ...)."""
    counts: collections.Counter = collections.Counter()

    def listen(event: str, duration: float, **kwargs) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            counts[str(kwargs.get("fun_name"))] += 1

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield counts
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)


def test_each_program_is_built_twice_and_then_serves_every_prompt_length_and_max_new_tokens(tiered):
    """With tiers the prefill chunk and the decode step each compile twice (quick, then tuned), and prompts of
    other lengths and other ``max_new_tokens`` compile neither again."""
    m = random_tiny_model(vocab_size=275)
    with compiles() as first:
        generate(m.config, m.params, random_prompts(8, [5]), 8, stop_ids=())
        settle_compiles()
    assert first["jit(prefill_chunk)"] == 2 and first["jit(decode_step)"] == 2 and first["jit(start)"] == 1
    with compiles() as later:
        for length, new in ((1, 3), (9, 8), (70, 5)):
            generate(m.config, m.params, random_prompts(length, [length]), new, stop_ids=())
        settle_compiles()
    assert not {name for name in later if "prefill_chunk" in name or "decode_" in name or "start" in name}


def test_a_tiering_setting_that_is_not_0_or_1_is_refused(monkeypatch):
    monkeypatch.setenv("MTIJAX_TIERED_COMPILE", "yes")
    m = random_tiny_model(vocab_size=276)
    with pytest.raises(MtijaxError, match="MTIJAX_TIERED_COMPILE must be 0 or 1"):
        generate(m.config, m.params, random_prompts(4, [4]), 2, stop_ids=())
