"""The spiking MoE gate (seed 003's ``olmoe.rs``) as OLMoE's router hook: its limit is the softmax router, its
recurrence matches an independent NumPy loop, its membranes carry from one call to the next (so generation
with the gate is the full spiking forward's argmax), and without the hook routing is exactly as before."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtijax
from mtijax.config import OlmoeConfig
from mtijax.engine import Interventions
from mtijax.models import olmoe
from mtijax.snn.gate import SEED_GATE, SOFTMAX_LIMIT, gate_logits, spiking_gate

CONFIG = OlmoeConfig(vocab_size=128, hidden_size=32, intermediate_size=16, num_layers=3, num_heads=4,
                     num_kv_heads=4, num_experts=8, num_experts_per_tok=2, eos_token_ids=(1,))
ROUTING = ("router_logits", "router_experts", "router_weights")


@pytest.fixture(scope="module")
def params():
    """Random tiny OLMoE params, scaled up so the router logits spread over several units."""
    p = mtijax.init_params(CONFIG, jax.random.key(0))
    p["embed"] = p["embed"] * 50
    p["layers"]["moe"]["router"] = p["layers"]["moe"]["router"] * 100
    return p


def run(params, tokens, router=None):
    return mtijax.forward(CONFIG, params, tokens, capture=ROUTING, router=router)


def tokens(seed=0, batch=2, length=12):
    return jnp.asarray(np.random.default_rng(seed).integers(2, CONFIG.vocab_size, size=(batch, length)), jnp.int32)


def test_threshold_at_infinity_and_no_memory_is_the_softmax_router(params):
    plain = run(params, tokens())
    limit = run(params, tokens(), spiking_gate(CONFIG, **SOFTMAX_LIMIT))
    np.testing.assert_array_equal(np.asarray(limit.captured["router_experts"]),
                                  np.asarray(plain.captured["router_experts"]))
    np.testing.assert_array_equal(np.asarray(limit.captured["router_weights"]),
                                  np.asarray(plain.captured["router_weights"]))
    np.testing.assert_array_equal(np.asarray(limit.logits), np.asarray(plain.logits))


def test_without_a_hook_the_router_is_the_softmax_top_k(params):
    """Without a router hook the router is the plain top-k of the softmax (checked from the logits)."""
    out = run(params, tokens(1))
    probs = jax.nn.softmax(out.captured["router_logits"], axis=-1)
    want = np.argsort(-np.asarray(probs), axis=-1, kind="stable")[..., :2]
    np.testing.assert_array_equal(np.asarray(out.captured["router_experts"]), want)


def numpy_gate(logits: np.ndarray, decay: float, gain: float, threshold: float) -> np.ndarray:
    """The seed's gate, one position at a time, float32."""
    f = np.float32
    m = np.zeros(logits.shape[::2], f)  # [B, E]
    out = np.zeros_like(logits, dtype=f)
    for s in range(logits.shape[1]):
        m = f(decay) * m + f(gain) * logits[:, s].astype(f)
        spike = np.where(m > f(threshold), f(1), np.where(m < -f(threshold), f(-1), f(0)))
        m = np.where(spike != 0, m - f(threshold) * spike, m)
        out[:, s] = np.where(spike != 0, m + f(threshold) * spike, m)
    return out


def test_gate_recurrence_against_numpy():
    logits = np.random.default_rng(2).normal(scale=3.0, size=(2, 40, 6)).astype(np.float32)
    got = np.asarray(gate_logits(jnp.asarray(logits), SEED_GATE))
    want = numpy_gate(logits, **SEED_GATE)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    # the membranes really spike both ways and carry over positions
    assert (np.abs(want) > 0.75).any() and not np.allclose(want[:, 1:], SEED_GATE["gain"] * logits[:, 1:])


def test_gate_on_one_layer_leaves_the_layers_before_it_alone(params):
    plain = run(params, tokens(3))
    gated = run(params, tokens(3), spiking_gate(CONFIG, layers=[1]))
    experts, plain_experts = (np.asarray(o.captured["router_experts"]) for o in (gated, plain))
    np.testing.assert_array_equal(experts[0], plain_experts[0])
    assert (experts[1] != plain_experts[1]).any(), "the seed's gate must change some routing"
    # layer 1 routes on the gate's membranes over its own (unchanged) router logits
    want = np.asarray(olmoe.route(CONFIG, gate_logits(gated.captured["router_logits"][1], SEED_GATE))[0])
    np.testing.assert_array_equal(experts[1], want)


def test_gate_constants_are_data_beside_the_params():
    gate = spiking_gate(CONFIG, threshold=2.0, layers=[0, 2])
    np.testing.assert_array_equal(np.asarray(gate.params["threshold"]), [2.0, np.inf, 2.0])
    np.testing.assert_array_equal(np.asarray(gate.params["decay"]), np.float32([0.91, 0.0, 0.91]))
    assert gate.state is None, "membranes are made for the batch at the first call"
    assert spiking_gate(CONFIG, threshold=3.0).replace(params=None) == gate.replace(params=None), \
        "gates that differ only in their constants share one compiled program"


def test_membranes_carry_from_one_call_to_the_next(params):
    """A prefix, then the rest from the prefix's membranes and cache, routes and predicts as one call."""
    t = tokens(4, length=11)
    gate = spiking_gate(CONFIG)
    whole = run(params, t, gate)
    cache = mtijax.init_cache(CONFIG.num_layers, 2, 16, CONFIG.num_kv_heads, CONFIG.head_dim)
    first = mtijax.forward(CONFIG, params, t[:, :6], cache=cache, router=gate, capture=ROUTING)
    rest = mtijax.forward(CONFIG, params, t[:, 6:], jnp.broadcast_to(jnp.arange(6, 11), (2, 5)), cache=first.cache,
                          write_index=6, router=gate.replace(state=first.router_state), capture=ROUTING)
    np.testing.assert_array_equal(np.asarray(rest.captured["router_experts"]),
                                  np.asarray(whole.captured["router_experts"][:, :, 6:]))
    np.testing.assert_allclose(np.asarray(rest.logits), np.asarray(whole.logits[:, 6:]), atol=1e-5)
    restarted = mtijax.forward(CONFIG, params, t[:, 6:], jnp.broadcast_to(jnp.arange(6, 11), (2, 5)),
                               cache=first.cache, write_index=6, router=gate, capture=ROUTING)
    assert (np.asarray(restarted.captured["router_experts"]) != np.asarray(rest.captured["router_experts"])).any(), \
        "restarting the membranes must change the routing (or this test cannot fail)"


def test_greedy_generation_with_the_gate_is_the_argmax_of_the_full_spiking_forward():
    params = mtijax.init_params(CONFIG, jax.random.key(0), scale=1.0)  # experts strong enough to steer tokens
    prompt = np.random.default_rng(5).integers(2, CONFIG.vocab_size, size=7).tolist()
    gate = spiking_gate(CONFIG)
    gen = mtijax.generate(CONFIG, params, [prompt], 10, stop_ids=(), interventions=Interventions(router=gate))
    text = prompt + gen.ids(0)
    full = run(params, jnp.asarray([text[:-1]], jnp.int32), gate)
    np.testing.assert_array_equal(np.argmax(np.asarray(full.logits[0, len(prompt) - 1:]), axis=-1), gen.ids(0))
    plain = mtijax.generate(CONFIG, params, [prompt], 10, stop_ids=())
    assert plain.ids(0) != gen.ids(0), "the gate must change the continuation (or this test cannot fail)"


def test_gate_errors():
    with pytest.raises(mtijax.MtijaxError, match="has none"):
        spiking_gate(mtijax.preset("gemma3-270m"))
    with pytest.raises(mtijax.MtijaxError, match="layer 5 is out of range"):
        spiking_gate(CONFIG, layers=[5])
