"""Fusion layers grafted onto a frozen tiny Gemma 3: equivalences with the base model, incremental decoding,
stability-aware generation, gradients, and user errors.

The base is the tiny grouped-query checkpoint written by transformers (4 layers, hidden 64). Most tests
share one configuration with every component switched on, in residual mode with an open blend (so that the
fusion branch matters), and so share its compiled functions.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtijax.api import load
from mtijax.config import preset
from mtijax.errors import MtijaxError
from mtijax.fusion import (COMPONENTS, Decoding, FusionConfig, for_model, fused_forward, generate_fused, init_fusion,
                           init_train_state, train, variables_of)
from mtijax.fusion.stability import StabilityConfig, StabilityState, update
from mtijax.fusion.training import TrainConfig, loss_terms
from mtijax.fusion.wrapper import check_variables
from mtijax.generate import Sampling
from mtijax.injection.integrity import snapshot, verify
from mtijax.models.cache import init_cache
from mtijax.models.decoder import forward
from tests.conftest import random_prompts

ALL_ON = FusionConfig(positions=(1, 3), components=COMPONENTS, mode="residual", alpha=0.5, gate_threshold=-2.0,
                      max_positions=64, smf_slots=8)
"""Every component at layers 1 and 3, blend 0.5, gate threshold sigmoid(-2) = 0.12 (mostly open)."""
TRAIN = TrainConfig(steps=4, batch_size=2, seq_len=10, warmup_steps=1)
"""Shared with tests/test_fusion_training.py, so the training step compiles once per session."""
WINDOWS = np.asarray(random_prompts(7, [10] * 6), np.int32)
SAMPLED = Sampling(0.9, top_k=1)
"""Sampling through the temperature path, made deterministic (top-1) so tokens can be compared."""


@pytest.fixture(scope="module")
def model(tiny_gqa):
    return load(tiny_gqa[1], progress=False)


@pytest.fixture(scope="module")
def variables(model):
    return init_fusion(ALL_ON, model.config, jax.random.key(0))


@pytest.fixture(scope="module")
def tokens():
    return jnp.asarray(random_prompts(3, [12, 12]))


POSITIONS = jnp.broadcast_to(jnp.arange(12, dtype=jnp.int32), (2, 12))
"""Positions of ``tokens``, passed explicitly so every [2, 12] call shares one compile."""


fused = jax.jit(fused_forward, static_argnames=("config", "fusion", "store_memory", "unroll"))
base_logits = jax.jit(lambda config, params, tokens: forward(config, params, tokens).logits, static_argnums=0)


def set_leaf(variables, name: str, value):
    """A copy of ``variables`` with every param whose path ends in ``name`` set to ``value`` (broadcast)."""
    def change(path, leaf):
        keys = "/".join(str(k.key) for k in path)
        return jnp.full_like(leaf, value) if keys.endswith(name) else leaf
    return jax.tree_util.tree_map_with_path(change, variables)


def max_diff(a, b) -> float:
    return float(jnp.max(jnp.abs(a - b)))


# equal to the base model ---------------------------------------------------------------------------------

def test_residual_blend_at_zero_gives_the_base_logits(model, variables, tokens):
    base = base_logits(model.config, model.params, tokens)
    out = fused(model.config, model.params, ALL_ON, set_leaf(variables, "alpha", -1e4), tokens, POSITIONS)  # s = 0
    np.testing.assert_allclose(np.asarray(out.logits), np.asarray(base), atol=1e-5, rtol=1e-5)
    assert float(out.metrics[1]["fusion_alpha"]) == 0.0
    assert max_diff(fused(model.config, model.params, ALL_ON, variables, tokens, POSITIONS).logits, base) > 1e-2


def test_closed_gate_gives_the_base_logits(model, tokens):
    """In parallel mode, zero prime projections (no amplitude anywhere reads as uniform) make the coherence 0;
    a threshold of sigmoid(50) = 1 then shuts the gate to its floor sigmoid(-10) = 4.5e-5, against 0.5 with
    the threshold at -50: the logits move 1e4 times less."""
    fusion = FusionConfig(positions=(1,), components=("prime", "coherence_gate"), mode="parallel", alpha=0.5)
    shut = set_leaf(set_leaf(init_fusion(fusion, model.config, jax.random.key(2)), "prime/proj/kernel", 0.0),
                    "prime/proj/bias", 0.0)
    shut["params"]["layers"]["1"]["prime_back"]["bias"] = jnp.asarray(np.random.default_rng(2).standard_normal(64),
                                                                      jnp.float32)  # a branch that is not 0
    base = base_logits(model.config, model.params, tokens)
    closed = fused(model.config, model.params, fusion, set_leaf(shut, "gate/threshold", 50.0), tokens)
    opened = fused(model.config, model.params, fusion, set_leaf(shut, "gate/threshold", -50.0), tokens)
    assert float(jnp.max(closed.metrics[1]["gate_coherence"])) < 1e-6
    np.testing.assert_allclose(np.asarray(closed.metrics[1]["gate"]), 1 / (1 + np.exp(10.0)), rtol=1e-4)
    assert max_diff(opened.logits, base) > 1e-2
    assert max_diff(closed.logits, base) < 1e-3 * max_diff(opened.logits, base)


# incremental decoding --------------------------------------------------------------------------------------

def test_incremental_calls_with_the_carry_equal_one_full_forward(model, variables):
    """Prefill 7 tokens, then 5 one-token calls with the KV cache and the fusion carry: every logit and metric
    (Kuramoto order and PRSC coherence included) equals the full forward's. Row 1 is left-padded by 3."""
    c = model.config
    ids = np.asarray(random_prompts(4, [12, 12]))
    positions = np.broadcast_to(np.arange(12), (2, 12)).copy()
    positions[1] = np.arange(12) - 3
    tokens, positions = jnp.asarray(ids), jnp.asarray(positions)
    whole = fused(c, model.params, ALL_ON, variables, tokens, positions)
    step = fused(c, model.params, ALL_ON, variables, tokens[:, :7], positions[:, :7],
                 cache=init_cache(c.num_layers, 2, 16, c.num_kv_heads, c.head_dim))
    logits, metrics = [step.logits], [step.metrics]
    for i in range(7, 12):
        step = fused(c, model.params, ALL_ON, variables, tokens[:, i:i + 1], positions[:, i:i + 1], cache=step.cache,
                     write_index=i, carry=step.carry)
        logits.append(step.logits)
        metrics.append(step.metrics)
    valid = np.asarray(positions) >= 0
    np.testing.assert_allclose(np.asarray(jnp.concatenate(logits, 1))[valid], np.asarray(whole.logits)[valid],
                               atol=1e-4, rtol=1e-4)
    for layer in ALL_ON.positions:
        for name, value in whole.metrics[layer].items():
            if value.ndim == 2:
                joined = np.concatenate([np.asarray(m[layer][name]) for m in metrics], 1)
                np.testing.assert_allclose(joined[valid], np.asarray(value)[valid], atol=1e-5, err_msg=name)


# stability-aware generation --------------------------------------------------------------------------------

def test_stability_rule_on_hand_made_readings():
    state = StabilityState.start(1, 0.8)
    readings = [(3.0, 0.5), (3.5, 0.5), (3.5, 0.1)]
    want_lyapunov = [0.0, 0.05, 0.045]
    temperature = 0.8
    for (s, c), lam in zip(readings, want_lyapunov):
        state, step = update(state, jnp.asarray([s]), jnp.asarray([c]), jnp.asarray([0.0]))
        stable = lam < 0.1 and c > 0.2
        suggested = 0.7 + 0.3 * c if stable else max(0.3, 0.7 - lam)
        temperature = 0.7 * temperature + 0.3 * suggested
        assert float(step.lyapunov[0]) == pytest.approx(lam, abs=1e-6)
        assert bool(step.stable[0]) == stable
        assert float(step.temperature[0]) == pytest.approx(temperature, rel=1e-6)
    _, step = update(state, jnp.asarray([5.0]), jnp.asarray([0.9]), jnp.asarray([0.0]))
    assert float(step.lyapunov[0]) == pytest.approx(0.9 * 0.045 + 0.1 * 1.5) and bool(step.diverging[0])


def test_generation_matches_a_full_forward_over_its_own_output(model, variables):
    """Each (top-1) token is the argmax of the full forward at the position before it, and the trace holds that
    position's entropy and coherence, averaged over the fused layers. The prompt is left-padded to 16 inside
    generation and not here, so padding does not leak into the fusion layers either."""
    prompt = random_prompts(5, [6])[0]
    result = generate_fused(model.config, model.params, ALL_ON, variables, [prompt], 10, stop_ids=(),
                            decoding=Decoding(SAMPLED))
    ids = prompt + result.ids(0)
    assert len(ids) == 16
    whole = fused(model.config, model.params, ALL_ON, variables, jnp.asarray([ids]))
    np.testing.assert_array_equal(np.argmax(np.asarray(whole.logits[0, 5:15]), -1), result.ids(0))
    fed = slice(5, 15)
    entropy = np.mean([np.asarray(whole.metrics[l]["prime_entropy"][0, fed]) for l in ALL_ON.positions], 0)
    coherence = np.mean([np.asarray(whole.metrics[l]["gate_coherence"][0, fed]) for l in ALL_ON.positions], 0)
    np.testing.assert_allclose(result.trace.entropy[0], entropy, atol=1e-5)
    np.testing.assert_allclose(result.trace.coherence[0], coherence, atol=1e-5)
    lyapunov = [0.0]
    for k in range(1, 10):
        lyapunov.append(0.9 * lyapunov[-1] + 0.1 * (entropy[k] - entropy[k - 1]))
    np.testing.assert_allclose(result.trace.lyapunov[0], lyapunov, atol=1e-5)


def test_auto_temperature_and_stop_on_instability(model, variables, tmp_path):
    prompt = random_prompts(6, [5])[0]
    free = generate_fused(model.config, model.params, ALL_ON, variables, [prompt], 10, stop_ids=(),
                          decoding=Decoding(SAMPLED, auto_temperature=True), seed=3)
    trace = free.trace
    temperature = 0.9
    for k in range(10):
        suggested = (0.7 + 0.3 * trace.coherence[0, k] if trace.stable[0, k]
                     else max(0.3, 0.7 - trace.lyapunov[0, k]))
        temperature = 0.7 * temperature + 0.3 * min(max(suggested, 0.3), 1.5)
        assert trace.temperature[0, k] == pytest.approx(temperature, rel=1e-5)
    trace.plot(str(tmp_path / "trace.png"))
    assert (tmp_path / "trace.png").stat().st_size > 0
    # a threshold just under the first new maximum of the estimate stops the row at that step
    lyapunov = free.trace.lyapunov[0]
    crossing = next(k for k in range(1, 10) if lyapunov[k] > max(lyapunov[:k].max(), 0.0))
    threshold = float((lyapunov[crossing] + max(lyapunov[:crossing].max(), 0.0)) / 2)
    stopped = generate_fused(model.config, model.params, ALL_ON, variables, [prompt], 10, stop_ids=(),
                             decoding=Decoding(SAMPLED, auto_temperature=True, stop_on_instability=True,
                                               stability=StabilityConfig(lyapunov_threshold=threshold)), seed=3)
    assert stopped.unstable[0] and stopped.lengths[0] == crossing
    assert stopped.ids(0) == free.ids(0)[:crossing]


# gradients -------------------------------------------------------------------------------------------------

REGULARISED = ("prime/phases", "prime/proj/bias", "kuramoto/coupling_scale", "kuramoto/phase/bias", "alpha")
"""Params the regularisers depend on (checked against finite differences of the regularisers alone)."""
EPS = 1e-2


def leaves_with_names(tree):
    return [("/".join(str(k.key) for k in path), leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def filled_memory(memory):
    """The SMF banks with 5 of their 8 slots written (one slot would make the read's softmax constant)."""
    rng = np.random.default_rng(1)

    def fill(path, leaf):
        kind = path[-1].key
        if kind == "bank":
            return jnp.asarray(rng.standard_normal(leaf.shape), jnp.float32)
        return jnp.arange(leaf.shape[0], dtype=jnp.float32) if kind == "ages" else jnp.int32(5)

    return jax.tree_util.tree_map_with_path(fill, memory)


@pytest.fixture(scope="module")
def gradient_check(model, variables, tokens):
    """Gradients of the training loss and of its regularisers alone, and central differences of each along
    each checked leaf's normalised gradient."""
    memory, train_config = filled_memory(variables["memory"]), TrainConfig()

    def both(params):
        loss, aux = loss_terms(params, memory, model.config, model.params, ALL_ON, train_config, tokens)
        return loss, sum(v for k, v in aux["terms"].items() if k != "cross_entropy")

    params = variables["params"]
    pullback = jax.jit(lambda p, cotangent: jax.vjp(both, p)[1](cotangent)[0])  # one backward pass, compiled once
    grads = [pullback(params, (jnp.float32(1.0), jnp.float32(0.0))), pullback(params, (jnp.float32(0.0),
                                                                                       jnp.float32(1.0)))]
    names = [n for n, _ in leaves_with_names(params)]
    checks = [(0, n) for n in names] + [(1, n) for n in names if n.endswith(REGULARISED)]
    named = [dict(leaves_with_names(g)) for g in grads]
    norms = [float(jnp.linalg.norm(named[which][n])) for which, n in checks]

    evaluate = jax.jit(both)
    estimates = []
    for (which, name), norm in zip(checks, norms):
        step = EPS * named[which][name] / max(norm, 1e-30)
        moved = [jax.tree_util.tree_map_with_path(
            lambda path, leaf: leaf + sign * step if "/".join(str(k.key) for k in path) == name else leaf, params)
            for sign in (1, -1)]
        estimates.append((float(evaluate(moved[0])[which]) - float(evaluate(moved[1])[which])) / (2 * EPS))
    return checks, norms, estimates


def test_every_fusion_param_gets_the_finite_difference_gradient(gradient_check):
    """Every leaf of the training loss's gradient (cross-entropy and regularisers; the SMF write reaches it
    through the slot it writes) is non-zero and equals a central difference along it."""
    for (which, name), norm, estimate in zip(*gradient_check):
        if which == 0:
            assert norm > 0, f"{name} gets no gradient"
            assert estimate == pytest.approx(norm, rel=0.05, abs=3e-4), name


def test_regularisers_are_differentiated(gradient_check):
    """The regularisers alone have gradients equal to finite differences in the params they depend on (the
    original turned them into Python floats, so they trained nothing)."""
    regularised = [(n, norm, e) for (which, n), norm, e in zip(*gradient_check) if which == 1]
    assert {n.split("/", 2)[2] for n, _, _ in regularised} >= set(REGULARISED)
    for name, norm, estimate in regularised:
        assert norm > 0, f"{name} gets no gradient from the regularisers"
        assert estimate == pytest.approx(norm, rel=0.05, abs=3e-4), name


def test_training_changes_only_the_fusion_params(model, variables):
    """Two optimiser steps move every fusion param and write the SMF bank twice. The base params are only
    read: the training step donates none of their buffers, and the base checkpoint read back from disk
    afterwards is what was loaded before."""
    before = snapshot(model.source, model.config, model.params)
    result = train(model.config, model.params, ALL_ON, init_train_state(variables, TRAIN), WINDOWS, TRAIN, until=2,
                   progress=False)
    assert jax.tree.structure(result.state.params) == jax.tree.structure(variables["params"])
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(model.params))
    assert verify(before)[0]["ok"]
    moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(variables["params"]),
                                                       jax.tree.leaves(result.state.params))]
    assert all(moved)
    assert int(variables_of(result.state)["memory"]["layers"]["1"]["smf"]["count"]) == 2
    assert [h["step"] for h in result.history] == [1, 2] and all(np.isfinite(h["loss"]) for h in result.history)


# user errors -----------------------------------------------------------------------------------------------

def test_fusion_position_outside_the_model(model, tokens):
    fusion = ALL_ON.replace(positions=(1, 4))
    with pytest.raises(MtijaxError, match=r"fusion position 4 is outside the model: it has layers 0\.\.3"):
        init_fusion(fusion, model.config, jax.random.key(0))
    with pytest.raises(MtijaxError, match="fusion position 4 is outside the model"):
        fused_forward(model.config, model.params, fusion, {"params": {"layers": {}}}, tokens)


def test_unknown_component_and_bad_settings():
    with pytest.raises(MtijaxError, match="unknown fusion component 'resonance'; the components are prime, "):
        FusionConfig(positions=(1,), components=("prime", "resonance"))
    with pytest.raises(MtijaxError, match="fusion mode must be one of parallel, sequential, residual"):
        FusionConfig(positions=(1,), mode="blend")
    with pytest.raises(MtijaxError, match=r"alpha is the initial blend weight and must be in \(0, 1\)"):
        FusionConfig(positions=(1,), alpha=1.5)
    with pytest.raises(MtijaxError, match="unknown fusion preset 'huge'"):
        for_model(preset("gemma3-270m"), "huge")


def test_params_of_another_hidden_size_are_refused(model, variables):
    other = dataclasses.replace(model.config, hidden_size=32)
    with pytest.raises(MtijaxError, match=r"layers/1/.* has shape \(64, .*hidden size 32 needs \(32, "):
        check_variables(ALL_ON, other, variables)


def test_presets_spread_over_depth():
    assert FusionConfig.standard().positions == (4, 8, 11)  # the original's choices for 12 layers
    assert FusionConfig.full().positions == (2, 4, 6, 8, 10, 11)
    assert FusionConfig.minimal().positions == (6,)
    assert FusionConfig.standard(18).positions == (6, 12, 17)
    assert FusionConfig.full(4).positions == (1, 2, 3)
    minimal = FusionConfig.minimal()
    assert minimal.components == ("prime", "coherence_gate") and minimal.num_primes == 16 and minimal.alpha == 0.05
