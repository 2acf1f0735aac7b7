"""Generation: the KV cache, batching, streaming, sampling and stop tokens.

The reference for the cache is a full forward without one; the reference for
batching is each prompt generated alone; the reference for sampling is a
softmax computed independently with NumPy.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtijax.api import Model, load
from mtijax.config import Gemma3Config
from mtijax.errors import MtijaxError
from mtijax.engine import loop
from mtijax.generate import Sampling, generate, generate_stream, sample
from mtijax.models.cache import init_cache
from mtijax.models.decoder import forward, init_params
from tests.conftest import random_prompts

forward_jit = jax.jit(forward, static_argnames=("config",))


@pytest.fixture(scope="module")
def model(tiny_gqa):
    """The grouped-query tiny model loaded by mtijax."""
    return load(tiny_gqa[1], progress=False)


def stream_tokens(config, params, prompts, max_new_tokens, **kwargs) -> np.ndarray:
    """Every step of :func:`generate_stream` stacked into ``[B, steps]``."""
    return np.stack(list(generate_stream(config, params, prompts, max_new_tokens, **kwargs)), axis=1)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


# --- the KV cache ---------------------------------------------------------------------------------------------------


def test_cached_decode_matches_full_forward_at_every_step(tiny):
    """Prefill past the sliding window, then decode one token at a time into the cache: each step's logits
    equal a forward over the whole sequence so far, without a cache.

    The forward is causal (checked against transformers in the parity tests), so the reference for every
    step is one row of a single cache-free forward over the whole sequence.
    """
    _, directory = tiny
    m = load(directory, progress=False)
    config, params = m.config, m.params
    prompt_len, steps = 9, 14
    assert prompt_len > config.sliding_window
    seqs = jnp.asarray(random_prompts(4, [prompt_len + steps] * 2))  # two rows, fixed continuations
    reference = np.asarray(forward_jit(config, params, seqs).logits)
    cache = init_cache(config.num_layers, 2, prompt_len + steps + 3, config.num_kv_heads, config.head_dim)

    out = forward_jit(config, params, seqs[:, :prompt_len], cache=cache, write_index=0)
    np.testing.assert_allclose(out.logits, reference[:, :prompt_len], atol=1e-4, rtol=0)
    cache = out.cache
    for i in range(prompt_len, prompt_len + steps):
        positions = jnp.full((2, 1), i, jnp.int32)
        out = forward_jit(config, params, seqs[:, i:i + 1], positions, cache=cache, write_index=i)
        cache = out.cache
        np.testing.assert_allclose(out.logits[:, 0], reference[:, i], atol=1e-4, rtol=0, err_msg=f"position {i}")
    assert (np.asarray(cache.positions)[:, :prompt_len + steps] == np.arange(prompt_len + steps)).all()
    assert (np.asarray(cache.positions)[:, prompt_len + steps:] == -1).all()


def test_full_forward_is_causal(tiny_gqa):
    """Logits at position i do not depend on later tokens: a forward over the first i + 1 tokens gives the same
    row (what lets one full forward be the reference for every decode step)."""
    m = load(tiny_gqa[1], progress=False)
    seq = jnp.asarray(random_prompts(4, [16]))
    full = np.asarray(forward_jit(m.config, m.params, seq).logits)
    for i in (0, 7, 11):
        prefix = np.asarray(forward_jit(m.config, m.params, seq[:, :i + 1]).logits)
        np.testing.assert_allclose(prefix[:, -1], full[:, i], atol=1e-5, rtol=0)


# --- batching and streaming -----------------------------------------------------------------------------------------


def test_batched_prompts_of_different_lengths_generate_as_if_alone(model):
    """Left padding does not leak between rows: a batch of prompts (padded to 32) gives each row the tokens it
    gets alone (padded to 16)."""
    prompts = random_prompts(5, [3, 11, 20])
    batched = generate(model.config, model.params, prompts, 10, stop_ids=())
    for row, prompt in enumerate(prompts):
        alone = generate(model.config, model.params, [prompt], 10, stop_ids=())
        assert batched.tokens[row].tolist() == alone.tokens[0].tolist(), f"row {row}"
    assert batched.lengths.tolist() == [10, 10, 10]


@pytest.mark.parametrize("sampling", [Sampling(), Sampling(temperature=1.5, top_k=20, top_p=0.9)],
                         ids=["greedy", "sampled"])
def test_stream_yields_the_same_tokens_as_generate(model, sampling):
    """``generate_stream`` (yielding each step's tokens) and ``generate`` (returning them all at the end) give
    the same tokens, greedy or sampled with the same seed."""
    prompts = random_prompts(6, [4, 13])
    looped = generate(model.config, model.params, prompts, 9, sampling=sampling, seed=3, stop_ids=())
    streamed = stream_tokens(model.config, model.params, prompts, 9, sampling=sampling, seed=3, stop_ids=())
    assert streamed.tolist() == looped.tokens.tolist()


def random_tiny_model(vocab_size: int = 256) -> Model:
    """A tiny model with random mtijax params and a config no fixture uses."""
    config = Gemma3Config(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                          num_kv_heads=1, head_dim=16, query_pre_attn_scalar=16, sliding_window=3,
                          layer_types=("sliding_attention", "full_attention"))
    return Model(config, init_params(config, jax.random.key(0), scale=0.3), None, "random")


def clear_engine_caches() -> None:
    for tiers in (loop._chunk_tiers, loop._step_tiers, loop._block_tiers):
        tiers.clear_cache()
    loop._start_jit.clear_cache()


def test_new_prompt_lengths_and_max_new_tokens_trigger_no_compilation():
    """After the first request, prompts of other lengths (one chunk or several) and other ``max_new_tokens``
    reuse the compiled prefill chunk, start and decode step: compilations are counted, not timed."""
    m = random_tiny_model()  # a fresh config, so no other test has compiled these functions for it
    clear_engine_caches()
    generate(m.config, m.params, random_prompts(8, [5]), 8, stop_ids=())
    first = loop.compiled_counts()
    assert first == {"prefill_chunk": 1, "prefill_first": 0, "start": 1, "decode_step": 1, "decode_block": 0}
    for length, new in ((1, 3), (9, 8), (16, 30), (65, 5), (150, 40)):
        generate(m.config, m.params, random_prompts(length, [length]), new, stop_ids=())
    stream_tokens(m.config, m.params, random_prompts(7, [3]), 12, stop_ids=())
    assert loop.compiled_counts() == first


@contextlib.contextmanager
def decode_step_compiles() -> Iterator[list[str]]:
    """The name of the thread of every compile of the engine's decode step (or decode block) while the block runs."""
    threads: list[str] = []

    def listen(event: str, duration: float, **kwargs) -> None:
        if event == "/jax/core/compile/backend_compile_duration" and "decode_" in str(kwargs.get("fun_name")):
            threads.append(threading.current_thread().name)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield threads
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)


def test_the_decode_step_compiles_once_on_a_background_thread_while_the_prefill_runs():
    """A request of a new shape compiles its decode step on the compile-ahead thread, beside the prefill; the
    step's first call finds that program and compiles nothing, whether the params are committed to a device
    (``jax.device_put``) or not (the outputs of a jit). Compilations are counted with their thread."""
    with decode_step_compiles() as threads:
        for committed in (False, True):
            m = random_tiny_model(vocab_size=260 + committed)  # a signature this process has not compiled
            params = jax.device_put(m.params, jax.devices()[0]) if committed else m.params
            assert jax.tree.leaves(params)[0].committed is committed
            for length in (5, 70):
                generate(m.config, params, random_prompts(length, [length]), 4, stop_ids=())
    assert len(threads) == 2 and all(name.startswith("mtijax-compile-ahead") for name in threads)


def test_compile_ahead_switched_off_compiles_the_step_at_its_first_call(monkeypatch):
    """``MTIJAX_COMPILE_AHEAD=0``: the decode step compiles once, on the caller's thread."""
    monkeypatch.setenv("MTIJAX_COMPILE_AHEAD", "0")
    m = random_tiny_model(vocab_size=262)
    with decode_step_compiles() as threads:
        generate(m.config, m.params, random_prompts(5, [5]), 4, stop_ids=())
    assert threads == [threading.current_thread().name]


def test_a_new_batch_bucket_or_cache_rung_compiles_once_more_and_then_is_shared():
    """Batches round up to powers of two and cache lengths to the ladder's rungs: 3 prompts run in the
    4-row bucket, and 2 more prompts of another length share it."""
    m = random_tiny_model()
    clear_engine_caches()
    generate(m.config, m.params, random_prompts(1, [5, 7, 9]), 4, stop_ids=())
    after_three = loop.compiled_counts()
    generate(m.config, m.params, random_prompts(2, [4, 11, 2, 6]), 6, stop_ids=())
    assert loop.compiled_counts() == after_three
    generate(m.config, m.params, random_prompts(3, [300]), 4, stop_ids=())  # past the 256-slot rung
    assert loop.compiled_counts()["decode_step"] == after_three["decode_step"] + 1


@pytest.mark.parametrize("rolling", [True, False], ids=["rolling layout", "full layout"])
def test_decode_slots_past_the_rung_wrap_into_the_left_padding(tiny_gqa, rolling):
    """A rung holds the prompt tokens plus ``max_new_tokens``, not the padded width: prompts of 250 and 100
    tokens with 6 new ones fit the 256-slot rung although their 249-token prefill pads to 256 slots. The decode
    slots wrap onto padding, and every step's logits equal a run on a 512-slot rung, resident and streamed."""
    from mtijax.engine.ladder import Ladder
    from mtijax.generate import start_run
    from mtijax.engine.sampling import Plain
    from mtijax.streaming import StreamedModel

    _, directory = tiny_gqa
    m = load(directory, progress=False)
    prompts = random_prompts(13, [250, 100])

    def logits(source, ladder):
        request, steps = start_run(m.config, source, prompts, 6, policy=Plain(), stop_ids=(), ladder=ladder,
                                   record_logits=True)
        run = loop.collect(steps, request, m.config.pad_token_id)
        return request.cache_length, np.stack([r.logits for r in run.records])

    rung, wrapped = logits(m.params, Ladder(chunk=64, rolling=rolling))
    roomy, reference = logits(m.params, Ladder(chunk=64, max_context=512, rolling=rolling))
    assert (rung, roomy) == (256, 512)
    np.testing.assert_allclose(wrapped, reference, rtol=1e-5, atol=1e-5)
    if not rolling:
        with StreamedModel(directory) as streamed:
            rung, streamed_logits = logits(streamed, Ladder(chunk=64, rolling=False))
        assert rung == 256
        np.testing.assert_allclose(streamed_logits, reference, rtol=1e-5, atol=1e-5)


def test_a_request_whose_cache_is_edited_counts_its_padded_width():
    """A cache edit may fill the padding that decode slots would wrap onto, so with one the same prompts need the
    512-slot rung (their 256-slot prefill region plus 6 new tokens)."""
    from mtijax.engine import CacheEdit, Interventions
    from mtijax.engine.ladder import Ladder
    from mtijax.engine.sampling import Plain
    from mtijax.generate import start_run

    m = random_tiny_model()
    prompts = random_prompts(13, [250, 100])
    for edit, rung in ((None, 256), (CacheEdit(None, lambda cache, data, width: cache), 512)):
        request, _ = start_run(m.config, m.params, prompts, 6, policy=Plain(), stop_ids=(), ladder=Ladder(chunk=64),
                               interventions=Interventions(cache_edit=edit))
        assert request.cache_length == rung


def test_accelerators_start_the_cache_ladder_at_8192_slots_unless_every_layer_keeps_them(monkeypatch):
    """On accelerators one rung serves every prompt up to 8192 slots; where every layer keeps the full length
    (streamer, sharded generation, KV edits) and on the CPU the rungs start at 256."""
    from mtijax.engine.ladder import default_ladder

    assert default_ladder().min_cache == 256 and default_ladder().chunk == 64  # this CPU backend
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert default_ladder().cache_length(300, 32768) == 8192
    assert default_ladder().cache_length(9000, 32768) == 16384
    assert default_ladder(rolling=False).cache_length(300, 32768) == 512


def test_layers_are_split_for_decode_only_on_accelerators_with_room_for_the_copy(model, monkeypatch):
    """The per-layer copy is made where the layers take at most 1/SPLIT_FRACTION of the device's memory, never on
    the CPU."""
    size = sum(a.nbytes for a in jax.tree.leaves(model.params["layers"]))
    assert not loop.split_layers(model.params)  # this CPU backend

    class Device:
        def __init__(self, limit):
            self.limit = limit

        def memory_stats(self):
            return {"bytes_limit": self.limit}

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    fraction = loop.SPLIT_FRACTION
    for limit, split in ((fraction * size, True), (fraction * size - 1, False)):
        monkeypatch.setattr(jax, "devices", lambda limit=limit: [Device(limit)])
        assert loop.split_layers(model.params) is split


def test_decode_on_per_layer_weight_buffers_gives_the_same_tokens(model, monkeypatch):
    """Split layers (each layer's weights in arrays of their own, stacked again inside the step) change how XLA
    sees the weights, not what the step computes: the same greedy tokens, and the same sampled ones."""
    prompts = random_prompts(11, [6, 2, 9])
    plain = [generate(model.config, model.params, prompts, 10, stop_ids=(), sampling=s).tokens
             for s in (Sampling(), Sampling(temperature=0.8, top_k=20))]
    monkeypatch.setattr(loop, "split_layers", lambda params: True)
    split = [generate(model.config, model.params, prompts, 10, stop_ids=(), sampling=s).tokens
             for s in (Sampling(), Sampling(temperature=0.8, top_k=20))]
    np.testing.assert_array_equal(split[0], plain[0])
    np.testing.assert_array_equal(split[1], plain[1])


def test_a_request_beyond_the_context_is_refused_before_any_work():
    m = random_tiny_model()
    limit = m.config.max_position_embeddings
    with pytest.raises(MtijaxError, match=f"context of {limit} tokens"):
        generate(m.config, m.params, random_prompts(4, [10]), limit)


# --- sampling -------------------------------------------------------------------------------------------------------


def test_top_k_one_is_greedy(model):
    """With only the most likely token left, sampling at temperature 1 is argmax."""
    prompts = random_prompts(9, [6, 10])
    greedy = generate(model.config, model.params, prompts, 12, stop_ids=())
    for seed in (0, 1):
        top1 = generate(model.config, model.params, prompts, 12, sampling=Sampling(1.0, top_k=1), seed=seed,
                        stop_ids=())
        assert top1.tokens.tolist() == greedy.tokens.tolist()


def test_tiny_top_p_is_greedy(model):
    """top-p keeps the most likely token even when its probability alone exceeds p."""
    prompts = random_prompts(9, [6, 10])
    greedy = generate(model.config, model.params, prompts, 12, stop_ids=())
    nucleus = generate(model.config, model.params, prompts, 12, sampling=Sampling(1.0, top_p=1e-6), seed=5,
                       stop_ids=())
    assert nucleus.tokens.tolist() == greedy.tokens.tolist()


def test_seed_decides_the_sample(model):
    """Same seed, same tokens; another seed, other tokens (at a temperature that makes the draws near uniform)."""
    prompts = random_prompts(10, [6])
    hot = Sampling(temperature=5.0)
    first = generate(model.config, model.params, prompts, 12, sampling=hot, seed=11, stop_ids=())
    again = generate(model.config, model.params, prompts, 12, sampling=hot, seed=11, stop_ids=())
    other = generate(model.config, model.params, prompts, 12, sampling=hot, seed=12, stop_ids=())
    assert first.tokens.tolist() == again.tokens.tolist()
    assert first.tokens.tolist() != other.tokens.tolist()


LOGITS = np.array([2.0, 1.2, 0.9, 0.0, -0.5, -1.0, -3.0, 0.4], np.float32)
DRAWS = 20_000


def draw(sampling: Sampling, logits: np.ndarray = LOGITS) -> np.ndarray:
    """``DRAWS`` independent single-step samples from one row of logits, one key each."""
    keys = jax.random.split(jax.random.key(1234), DRAWS)
    one = lambda key: sample(jnp.asarray(logits)[None], key, sampling)[0]
    return np.asarray(jax.vmap(one)(keys))


def assert_frequencies_match(tokens: np.ndarray, probs: np.ndarray) -> None:
    """Empirical frequencies within 5 standard errors (plus a little) of ``probs``."""
    freq = np.bincount(tokens, minlength=len(probs)) / len(tokens)
    bound = 5 * np.sqrt(probs * (1 - probs) / len(tokens)) + 1e-3
    assert (np.abs(freq - probs) <= bound).all(), f"frequencies {freq.round(4)} vs {probs.round(4)}"


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sampling_follows_the_softmax(temperature):
    """Over many keys, one sampling step draws token i with probability softmax(logits / temperature)[i]."""
    assert_frequencies_match(draw(Sampling(temperature)), softmax(LOGITS.astype(np.float64) / temperature))


def test_top_k_two_draws_only_the_two_best_in_proportion():
    """top_k=2 never draws outside the two highest logits, and draws those two renormalised."""
    tokens = draw(Sampling(1.0, top_k=2))
    best = np.argsort(LOGITS)[-2:]
    assert set(np.unique(tokens)) <= set(best.tolist())
    probs = np.zeros(len(LOGITS))
    probs[best] = softmax(LOGITS[best].astype(np.float64))
    assert_frequencies_match(tokens, probs)


def test_top_p_keeps_the_smallest_set_reaching_p():
    """top_p keeps the most likely tokens until their mass reaches p (the token that crosses p included)."""
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    tokens = draw(Sampling(1.0, top_p=0.7), np.log(probs).astype(np.float32))
    expected = np.array([0.5, 0.3, 0.0, 0.0]) / 0.8  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7
    assert_frequencies_match(tokens, expected)


@pytest.mark.parametrize("kwargs", [dict(temperature=-1.0), dict(temperature=float("nan")), dict(top_k=-1),
                                    dict(top_p=0.0), dict(top_p=1.5)])
def test_invalid_sampling_settings_are_rejected(kwargs):
    with pytest.raises(MtijaxError):
        Sampling(**kwargs)


# --- stopping -------------------------------------------------------------------------------------------------------


def test_row_stops_at_its_stop_token(model):
    """A row that produces a stop token at step k has length k + 1, keeps that token, and holds the pad id
    afterwards; the other row is unaffected; the stream stops at the same place."""
    prompts = random_prompts(11, [7, 12])
    free = generate(model.config, model.params, prompts, 12, stop_ids=())
    row0 = free.tokens[0].tolist()
    k = next(i for i in range(2, 12) if row0[i] not in row0[:i] and row0[i] not in free.tokens[1])
    stop = row0[k]

    stopped = generate(model.config, model.params, prompts, 12, stop_ids=(stop,))
    assert stopped.lengths.tolist() == [k + 1, 12]
    assert stopped.stopped.tolist() == [True, False]
    assert stopped.tokens[0, :k + 1].tolist() == row0[:k + 1]
    assert (stopped.tokens[0, k + 1:] == model.config.pad_token_id).all()
    assert stopped.tokens[1].tolist() == free.tokens[1].tolist()
    assert stopped.ids(0) == row0[:k] and stopped.ids(0, keep_stop=True) == row0[:k + 1]
    assert stopped.ids(1) == free.tokens[1].tolist()

    streamed = stream_tokens(model.config, model.params, prompts, 12, stop_ids=(stop,))
    assert streamed.tolist() == stopped.tokens.tolist()


def test_generation_ends_when_every_row_has_stopped(model):
    """When the only row stops, the loop and the stream end there; the rest of the output is padding."""
    prompt = random_prompts(12, [8])
    free = generate(model.config, model.params, prompt, 10, stop_ids=()).tokens[0].tolist()
    k = next(i for i in range(1, 10) if free[i] not in free[:i])
    stopped = generate(model.config, model.params, prompt, 10, stop_ids=(free[k],))
    assert stopped.lengths.tolist() == [k + 1]
    assert stopped.tokens[0].tolist() == free[:k + 1] + [model.config.pad_token_id] * (9 - k)
    streamed = list(generate_stream(model.config, model.params, prompt, 10, stop_ids=(free[k],)))
    assert [int(t[0]) for t in streamed] == free[:k + 1]


def test_stop_token_on_the_last_step_is_still_a_stop(model):
    """A row whose stop token is its last allowed token has stopped: ``ids`` drops that token."""
    prompt = random_prompts(12, [8])
    free = generate(model.config, model.params, prompt, 10, stop_ids=()).tokens[0].tolist()
    k = next(i for i in range(1, 10) if free[i] not in free[:i])
    stopped = generate(model.config, model.params, prompt, k + 1, stop_ids=(free[k],))
    assert stopped.lengths.tolist() == [k + 1]
    assert stopped.stopped.tolist() == [True]
    assert stopped.ids(0) == free[:k]
    assert stopped.ids(0, keep_stop=True) == free[:k + 1]
    unstopped = generate(model.config, model.params, prompt, k + 1, stop_ids=())
    assert unstopped.ids(0) == free[:k + 1]


def test_forward_rejects_a_write_past_the_end_of_the_cache(tiny_gqa):
    """Writing more tokens than the cache has slots left is a user error, not a silent clamp."""
    _, directory = tiny_gqa
    model = load(directory, progress=False)
    c = model.config
    cache = init_cache(c.num_layers, 1, 16, c.num_kv_heads, c.head_dim)
    with pytest.raises(MtijaxError, match="16-slot cache"):
        forward(c, model.params, jnp.ones((1, 4), jnp.int32), cache=cache, write_index=14)
