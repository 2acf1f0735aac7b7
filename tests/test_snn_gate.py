"""The spiking MoE gate (seed 003's ``olmoe.rs``) as OLMoE's router: its limit is the softmax router, its
recurrence matches an independent NumPy loop, and plain params route exactly as before."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtijax
from mtijax.config import OlmoeConfig
from mtijax.models import olmoe
from mtijax.snn.gate import SEED_GATE, SOFTMAX_LIMIT, gate_logits, with_spiking_gate

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


def run(params, tokens):
    return mtijax.forward(CONFIG, params, tokens, capture=ROUTING)


def tokens(seed=0, batch=2, length=12):
    return jnp.asarray(np.random.default_rng(seed).integers(2, CONFIG.vocab_size, size=(batch, length)), jnp.int32)


def test_threshold_at_infinity_and_no_memory_is_the_softmax_router(params):
    plain = run(params, tokens())
    limit = run(with_spiking_gate(CONFIG, params, **SOFTMAX_LIMIT), tokens())
    np.testing.assert_array_equal(np.asarray(limit.captured["router_experts"]),
                                  np.asarray(plain.captured["router_experts"]))
    np.testing.assert_array_equal(np.asarray(limit.captured["router_weights"]),
                                  np.asarray(plain.captured["router_weights"]))
    np.testing.assert_array_equal(np.asarray(limit.logits), np.asarray(plain.logits))


def test_plain_params_route_as_the_softmax_router(params):
    """Without a ``spiking`` sub-dict the router is the plain top-k of the softmax (checked from the logits)."""
    out = run(params, tokens(1))
    probs = jax.nn.softmax(out.captured["router_logits"], axis=-1)
    want = np.argsort(-np.asarray(probs), axis=-1, kind="stable")[..., :2]
    np.testing.assert_array_equal(np.asarray(out.captured["router_experts"]), want)
    assert "spiking" not in params["layers"]["moe"]


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
    gated = run(with_spiking_gate(CONFIG, params, layers=[1]), tokens(3))
    experts, plain_experts = (np.asarray(o.captured["router_experts"]) for o in (gated, plain))
    np.testing.assert_array_equal(experts[0], plain_experts[0])
    assert (experts[1] != plain_experts[1]).any(), "the seed's gate must change some routing"
    # layer 1 routes on the gate's membranes over its own (unchanged) router logits
    want = np.asarray(olmoe.route(CONFIG, gated.captured["router_logits"][1], SEED_GATE)[0])
    np.testing.assert_array_equal(experts[1], want)


def test_gate_params_are_data_and_weights_are_shared(params):
    gated = with_spiking_gate(CONFIG, params, threshold=2.0, layers=[0, 2])
    spiking = gated["layers"]["moe"]["spiking"]
    np.testing.assert_array_equal(np.asarray(spiking["threshold"]), [2.0, np.inf, 2.0])
    np.testing.assert_array_equal(np.asarray(spiking["decay"]), np.float32([0.91, 0.0, 0.91]))
    assert gated["layers"]["moe"]["router"] is params["layers"]["moe"]["router"]
    assert "spiking" not in params["layers"]["moe"], "the input params must not change"


def test_gate_errors():
    with pytest.raises(mtijax.MtijaxError, match="has none"):
        with_spiking_gate(mtijax.preset("gemma3-270m"), {})
    with pytest.raises(mtijax.MtijaxError, match="layer 5 is out of range"):
        with_spiking_gate(CONFIG, {"layers": {"moe": {}}}, layers=[5])
