"""The fusion components' math (seed 002), on hand-made inputs with known answers and against NumPy.

Each component is a Flax module over its own params; the references here are written independently in
NumPy (quaternion products through their 4x4 matrix form, rotations through rotation matrices, the
Kuramoto model as explicit loops over oscillator pairs).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtijax.fusion import quaternion
from mtijax.fusion.attention import QuaternionAttention
from mtijax.fusion.gate import CoherenceGate
from mtijax.fusion.kuramoto import KuramotoSync, integrate, order_parameter
from mtijax.fusion.memory import SemanticMemory
from mtijax.fusion.prime import PrimeProjection, coherence, describe, entropy_bits, first_primes, prime_weights
from mtijax.fusion.prsc import PRSC
from mtijax.fusion.rotation import QuaternionRotation

PHI = (1 + math.sqrt(5)) / 2
RNG = np.random.default_rng(0)


def left_matrix(q: np.ndarray) -> np.ndarray:
    """The 4x4 matrix of ``p -> q p`` (Hamilton product)."""
    w, x, y, z = q
    return np.array([[w, -x, -y, -z], [x, w, -z, y], [y, z, w, -x], [z, -y, x, w]])


def rotation_matrix(q: np.ndarray) -> np.ndarray:
    """The 3x3 rotation a unit quaternion ``q`` performs on vectors."""
    w, x, y, z = q / np.linalg.norm(q)
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
                     [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
                     [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]])


def dense(params, x):
    return np.asarray(x) @ np.asarray(params["kernel"]) + np.asarray(params["bias"])


# quaternions ---------------------------------------------------------------------------------------------

def test_hamilton_product_units():
    i, j, k, one = np.eye(4)[1], np.eye(4)[2], np.eye(4)[3], np.eye(4)[0]
    for a, b, want in [(i, j, k), (j, k, i), (k, i, j), (j, i, -k), (i, i, -one), (k, k, -one)]:
        np.testing.assert_array_equal(np.asarray(quaternion.multiply(jnp.asarray(a), jnp.asarray(b))), want)


def test_hamilton_product_against_its_matrix_form():
    a, b = RNG.standard_normal((5, 4)), RNG.standard_normal((5, 4))
    want = np.stack([left_matrix(p) @ q for p, q in zip(a, b)])
    np.testing.assert_allclose(np.asarray(quaternion.multiply(jnp.asarray(a), jnp.asarray(b))), want, rtol=1e-5,
                               atol=1e-6)


def test_unit_rotation_preserves_norm_and_real_part_and_matches_the_rotation_matrix():
    r = quaternion.normalize(jnp.asarray(RNG.standard_normal((6, 4)), jnp.float32))
    q = jnp.asarray(RNG.standard_normal((6, 4)), jnp.float32)
    turned = np.asarray(quaternion.rotate(r, q))
    np.testing.assert_allclose(np.linalg.norm(turned, axis=-1), np.linalg.norm(np.asarray(q), axis=-1), rtol=1e-5)
    np.testing.assert_allclose(turned[:, 0], np.asarray(q)[:, 0], atol=1e-5)
    for row in range(6):
        np.testing.assert_allclose(turned[row, 1:], rotation_matrix(np.asarray(r[row])) @ np.asarray(q[row, 1:]),
                                   atol=1e-5)


def test_quarter_turn_about_z_takes_x_to_y():
    r = quaternion.from_axis_angle(jnp.asarray([0.0, 0.0, 1.0]), jnp.asarray(np.pi / 2))
    np.testing.assert_allclose(np.asarray(quaternion.rotate(r, jnp.asarray([0.0, 1.0, 0.0, 0.0]))), [0, 0, 1, 0],
                               atol=1e-6)


def test_quaternion_inner_product_is_the_dot_product():
    a, b = RNG.standard_normal((3, 4)), RNG.standard_normal((3, 4))
    np.testing.assert_allclose(np.asarray(quaternion.inner(jnp.asarray(a), jnp.asarray(b))), np.sum(a * b, -1),
                               rtol=1e-5)


# prime projection -----------------------------------------------------------------------------------------

def test_primes_and_their_weights():
    assert first_primes(25).tolist()[:6] == [2, 3, 5, 7, 11, 13] and first_primes(25)[-1] == 97
    np.testing.assert_allclose(prime_weights(3), [1.0, 1 / (1 + np.log(1.5)), 1 / (1 + np.log(2.5))], rtol=1e-6)


def test_uniform_distribution_has_zero_coherence_and_one_prime_has_full_coherence():
    uniform = describe(jnp.ones((25, 4)))
    assert float(uniform.entropy) == pytest.approx(np.log2(25), rel=1e-6)
    assert float(uniform.coherence) == pytest.approx(0.0, abs=1e-6)
    one_hot = describe(jnp.zeros((25, 4)).at[7, 2].set(0.3))
    assert float(one_hot.entropy) == 0.0 and float(one_hot.coherence) == 1.0
    two = describe(jnp.zeros((4, 2)).at[0, 0].set(1.0).at[3, 1].set(1.0))  # 1 bit of 2 possible
    assert float(two.coherence) == pytest.approx(0.5)


def test_entropy_and_coherence_clamp():
    assert float(entropy_bits(jnp.asarray([0.5, 0.5, 0.0]))) == pytest.approx(1.0)
    assert float(coherence(jnp.asarray(9.0), 8)) == 0.0  # more than log2 N bits is clamped


@pytest.mark.parametrize("quat", [True, False])
def test_prime_projection_against_numpy(quat):
    module = PrimeProjection(num_primes=5, quaternion=quat)
    x = jnp.asarray(RNG.standard_normal((2, 3, 8)), jnp.float32)
    params = module.init(jax.random.key(0), x)["params"]
    params = {**params, "phases": jnp.asarray([0.3, -1.0, 2.0, 0.0, 0.7])}
    states = module.apply({"params": params}, x)
    a = 4 if quat else 2
    amp = dense(params["proj"], x).reshape(2, 3, 5, a)
    angle = np.asarray(params["phases"]) / (2 if quat else 1)
    w, i = amp[..., 0].copy(), amp[..., 1].copy()
    amp[..., 0], amp[..., 1] = np.cos(angle) * w - np.sin(angle) * i, np.sin(angle) * w + np.cos(angle) * i
    primes = np.array([2, 3, 5, 7, 11])
    amp = amp / (1 + np.log(primes) - np.log(2))[:, None]
    amp = amp / np.linalg.norm(amp.reshape(2, 3, -1), axis=-1)[..., None, None]
    p = np.sum(amp ** 2, -1)
    h = -np.sum(p * np.log2(p), -1)
    np.testing.assert_allclose(np.asarray(states.amplitudes), amp, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(states.entropy), h, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(states.coherence), np.clip(1 - h / np.log2(5), 0, 1), rtol=1e-4, atol=1e-6)


# quaternion rotation layer ---------------------------------------------------------------------------------

def test_quaternion_rotation_layer_against_numpy():
    module = QuaternionRotation(max_positions=4)
    x = jnp.asarray(RNG.standard_normal((1, 3, 8)), jnp.float32)
    positions = jnp.asarray([[0, 2, 9]])  # 9 is past the table: it uses the last row
    params = module.init(jax.random.key(0), x, positions)["params"]
    out = np.asarray(module.apply({"params": params}, x, positions))
    for s, pos in enumerate([0, 2, 3]):
        axis = dense(params["axis"], x[0, s])
        axis = axis / np.linalg.norm(axis)
        angle = np.pi * np.tanh(dense(params["angle"], x[0, s])[0])
        content = np.concatenate([[np.cos(angle / 2)], np.sin(angle / 2) * axis])
        by_position = np.asarray(params["position_table"][pos])
        r = left_matrix(by_position / np.linalg.norm(by_position)) @ content
        groups = np.asarray(x[0, s]).reshape(2, 4)
        want = np.concatenate([[g[0], *(rotation_matrix(r) @ g[1:])] for g in groups])
        np.testing.assert_allclose(out[0, s], want, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(out[0, s].reshape(2, 4), axis=-1),
                                   np.linalg.norm(groups, axis=-1), rtol=1e-5)


# Kuramoto --------------------------------------------------------------------------------------------------

def test_order_parameter_known_answers():
    assert float(order_parameter(jnp.full((5,), 0.3))) == pytest.approx(1.0)
    assert float(order_parameter(jnp.asarray([0.0, np.pi, 1.0, 1.0 + np.pi]))) == pytest.approx(0.0, abs=1e-6)
    assert float(order_parameter(jnp.asarray([0.0, np.pi / 2]))) == pytest.approx(np.sqrt(0.5))
    masked = order_parameter(jnp.asarray([0.2, 0.2, 2.0]), jnp.asarray([True, True, False]))
    assert float(masked) == pytest.approx(1.0)


def numpy_kuramoto(theta, omega, valid, coupling, steps, dt, sign, causal):
    """Explicit pairwise loops: returns final phases and each token's order parameter."""
    theta = np.array(theta, np.float64)
    s = len(theta)
    partners = lambda i: [j for j in (range(i + 1) if causal else range(s)) if valid[j]]
    for _ in range(steps):
        new = theta.copy()
        for i in range(s):
            js = partners(i)
            pull = sum(np.sin(theta[j] - theta[i]) for j in js) / max(len(js), 1)
            new[i] = theta[i] + dt * (omega[i] + sign * coupling * pull)
        theta = new
    order = [abs(np.mean(np.exp(1j * theta[partners(i)]))) if partners(i) else 0.0 for i in range(s)]
    return theta, np.array(order)


@pytest.mark.parametrize("sign", ["attractive", "original"])
@pytest.mark.parametrize("scope", ["causal", "sequence"])
def test_kuramoto_integration_against_pairwise_loops(sign, scope):
    theta, omega = RNG.uniform(-3, 3, (2, 7)), RNG.standard_normal((2, 7))
    valid = np.ones((2, 7), bool)
    valid[1, :2] = False  # left padding
    got_theta, got_order, _ = integrate(jnp.asarray(theta, jnp.float32), jnp.asarray(omega, jnp.float32),
                                        jnp.asarray(valid), jnp.float32(3.0), num_steps=6, dt=0.05, sign=sign,
                                        scope=scope)
    for row in range(2):
        want_theta, want_order = numpy_kuramoto(theta[row], omega[row], valid[row], 3.0, 6, 0.05,
                                                1.0 if sign == "attractive" else -1.0, scope == "causal")
        keep = valid[row]
        np.testing.assert_allclose(np.asarray(got_theta[row])[keep], want_theta[keep], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(np.asarray(got_order[row])[keep], want_order[keep], rtol=1e-4, atol=1e-5)


def test_attractive_coupling_synchronises_and_the_original_sign_desynchronises():
    theta = jnp.asarray(RNG.uniform(-1.5, 1.5, (1, 12)), jnp.float32)
    zero, valid = jnp.zeros((1, 12)), jnp.ones((1, 12), bool)
    start = float(order_parameter(theta[0]))
    runs = {sign: integrate(theta, zero, valid, jnp.float32(4.0), num_steps=60, dt=0.05, sign=sign, scope="sequence")
            for sign in ("attractive", "original")}
    assert float(runs["attractive"][1][0, 0]) > start + 0.2
    assert float(runs["original"][1][0, 0]) < start - 0.2


def test_causal_kuramoto_split_with_a_carry_equals_one_call():
    theta, omega = jnp.asarray(RNG.uniform(-3, 3, (2, 9)), jnp.float32), jnp.asarray(RNG.normal(size=(2, 9)),
                                                                                      jnp.float32)
    valid = jnp.ones((2, 9), bool)
    whole = integrate(theta, omega, valid, jnp.float32(2.0), num_steps=5, dt=0.1)
    first = integrate(theta[:, :4], omega[:, :4], valid[:, :4], jnp.float32(2.0), num_steps=5, dt=0.1)
    rest = integrate(theta[:, 4:], omega[:, 4:], valid[:, 4:], jnp.float32(2.0), num_steps=5, dt=0.1,
                     carry=first[2])
    for part in (0, 1):
        np.testing.assert_allclose(np.concatenate([first[part], rest[part]], 1), whole[part], rtol=1e-5, atol=1e-6)


def test_kuramoto_layer_frequencies_step_by_position_over_phi():
    """With no coupling and zero weights, each phase advances by dt * steps * (bias + position / phi)."""
    module = KuramotoSync(coupling=0.0, num_steps=5, dt=0.01)
    x = jnp.asarray(RNG.standard_normal((1, 4, 8)), jnp.float32)
    positions = jnp.asarray([[0, 1, 2, 30]])
    params = jax.tree.map(jnp.zeros_like, module.init(jax.random.key(0), x, positions)["params"])
    params["to_hidden"]["kernel"] = jnp.eye(2, 8)
    params["blend"] = jnp.float32(50.0)  # sigmoid = 1
    out, order, _ = module.apply({"params": params}, x, positions)
    theta = 0.05 * np.array([0, 1, 2, 30]) / PHI
    np.testing.assert_allclose(np.asarray(out - x)[0, :, :2],
                               np.asarray(order)[0, :, None] * np.stack([np.cos(theta), np.sin(theta)], -1),
                               rtol=1e-5, atol=1e-6)
    want_order = [abs(np.mean(np.exp(1j * theta[:i + 1]))) for i in range(4)]
    np.testing.assert_allclose(np.asarray(order)[0], want_order, rtol=1e-5)


# coherence gate ------------------------------------------------------------------------------------------

def test_gate_is_a_steep_sigmoid_around_the_learned_threshold():
    gate = CoherenceGate(threshold=0.7)
    x = jnp.ones((1, 3, 4))
    params = gate.init(jax.random.key(0), x, jnp.zeros((1, 3)))["params"]
    threshold = 1 / (1 + np.exp(-0.7))
    c = jnp.asarray([[threshold, 1.0, 0.0]])
    out, coh, g = gate.apply({"params": params}, x, c)
    want = 1 / (1 + np.exp(-10 * (np.asarray(c)[0] - threshold)))
    np.testing.assert_allclose(np.asarray(g)[0], want, rtol=1e-5)
    assert float(g[0, 0]) == pytest.approx(0.5)
    np.testing.assert_allclose(np.asarray(out)[0], want[:, None] * np.ones((3, 4)), rtol=1e-5)


def test_gate_computes_its_own_coherence_when_none_is_given():
    gate = CoherenceGate()
    x = jnp.asarray(RNG.standard_normal((1, 2, 8)), jnp.float32)
    params = gate.init(jax.random.key(0), x)["params"]
    _, coh, _ = gate.apply({"params": params}, x)
    hidden = np.tanh(dense(params["coherence_hidden"], x))
    np.testing.assert_allclose(np.asarray(coh), 1 / (1 + np.exp(-dense(params["coherence_out"], hidden)[..., 0])),
                               rtol=1e-5)
    assert float(params["coherence_out"]["bias"][0]) == 1.0


# PRSC ------------------------------------------------------------------------------------------------------

def test_prsc_composes_each_token_with_its_predecessor():
    module = PRSC(num_primes=3)
    x = jnp.asarray(RNG.standard_normal((1, 4, 8)), jnp.float32)
    positions = jnp.asarray([[-1, 0, 1, 2]])  # one padding token first
    params = module.init(jax.random.key(0), x, positions)["params"]
    params = {**params, "mix": jnp.float32(50.0)}  # blend = composed only
    out, coh, carry = module.apply({"params": params}, x, positions)
    q = np.asarray(PrimeProjection(3).apply({"params": params["prime"]}, x).amplitudes)[0]
    composed = np.zeros((4, 3, 4))
    composed[:2, :, 0] = 1.0  # the padding token and the first real token compose with nothing: identity
    for s in (2, 3):
        for p in range(3):
            prod = left_matrix(q[s - 1, p]) @ q[s, p]
            composed[s, p] = prod / np.linalg.norm(prod)
    np.testing.assert_allclose(np.asarray(out)[0], dense(params["back"], composed.reshape(4, 12)), rtol=1e-4,
                               atol=1e-5)
    np.testing.assert_allclose(np.asarray(carry.previous)[0], q[3], rtol=1e-6)
    assert float(coh[0, 1]) == pytest.approx(0.0, abs=1e-6)  # identity in every prime: uniform


# SMF memory ------------------------------------------------------------------------------------------------

def test_memory_writes_oldest_slot_and_reads_by_decayed_attention():
    module = SemanticMemory(slots=2, dim=4, decay=0.5, importance=0.8)
    valid = jnp.ones((1, 3), bool)
    xs = [jnp.asarray(RNG.standard_normal((1, 3, 8)), jnp.float32) for _ in range(3)]
    variables = module.init(jax.random.key(0), xs[0], valid)
    params, memory = variables["params"], variables["memory"]
    assert not np.asarray(module.apply({"params": params, "memory": memory}, xs[0], valid)).any()  # empty bank
    summaries = []
    for x in xs:
        read, changed = module.apply({"params": params, "memory": memory}, x, valid, True, mutable=["memory"])
        memory = changed["memory"]
        summaries.append(0.8 * dense(params["write"], x)[0].mean(0))
    assert int(memory["count"]) == 2
    np.testing.assert_allclose(np.asarray(memory["bank"]), [summaries[2], summaries[1]], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(memory["ages"]), [0.0, 1.0])
    slots = np.asarray(memory["bank"]) * np.exp(-0.5 * np.array([0.0, 1.0]))[:, None]
    scores = dense(params["query"], xs[2])[0] @ slots.T
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(read)[0], dense(params["read"], weights @ slots), rtol=1e-4, atol=1e-5)


# quaternion attention --------------------------------------------------------------------------------------

def numpy_attention(x, params, heads, angles, causal=True):
    b, s, d = x.shape
    hd = d // heads
    q, k, v = (dense(params[n], x).reshape(b, s, heads, hd) for n in ("query", "key", "value"))
    k = k.reshape(b, s, heads, hd // 4, 4).copy()
    for h in range(heads):
        if angles is None:
            continue
        a = h * np.pi / PHI
        axis = np.array([np.cos(a), np.sin(a), 0.0])
        r = np.concatenate([[np.cos(angles[h] / 2)], np.sin(angles[h] / 2) * axis])
        k[:, :, h, :, 1:] = k[:, :, h, :, 1:] @ rotation_matrix(r).T
    k = k.reshape(b, s, heads, hd)
    scores = np.einsum("bihd,bjhd->bhij", q, k) / np.sqrt(hd)
    if causal:
        scores = np.where(np.tril(np.ones((s, s), bool)), scores, -np.inf)
    w = np.exp(scores - scores.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    return dense(params["out"], np.einsum("bhij,bjhd->bihd", w, v).reshape(b, s, d))


def test_quaternion_attention_applies_golden_ratio_head_rotations():
    module = QuaternionAttention(num_heads=2)
    x = jnp.asarray(RNG.standard_normal((1, 5, 16)), jnp.float32)
    params = module.init(jax.random.key(0), x)["params"]
    out, weights = module.apply({"params": params}, x)
    np.testing.assert_allclose(np.asarray(out), numpy_attention(np.asarray(x), params, 2, np.asarray(
        params["head_angles"])), rtol=1e-4, atol=1e-5)
    assert not np.allclose(np.asarray(out), numpy_attention(np.asarray(x), params, 2, None), atol=1e-3)
    np.testing.assert_allclose(np.asarray(weights).sum(-1), 1.0, rtol=1e-5)
    assert np.asarray(weights)[0, :, 0, 1:].max() == 0.0  # causal


def test_quaternion_attention_without_rotations_is_dot_product_attention():
    module = QuaternionAttention(num_heads=2)
    x = jnp.asarray(RNG.standard_normal((1, 5, 16)), jnp.float32)
    params = module.init(jax.random.key(0), x)["params"]
    params = {**params, "head_angles": jnp.zeros(2)}
    np.testing.assert_allclose(np.asarray(module.apply({"params": params}, x)[0]),
                               numpy_attention(np.asarray(x), params, 2, None), rtol=1e-4, atol=1e-5)


# the layer's modes and norm placement ------------------------------------------------------------------------

def layer_norm(x, p):
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-5) * np.asarray(p["scale"]) + np.asarray(p["bias"])


@pytest.mark.parametrize("mode,norm", [("parallel", "fusion"), ("residual", "fusion"), ("sequential", "fusion"),
                                       ("residual", "output"), ("parallel", "none")])
def test_layer_modes_and_norm_placement_without_components(mode, norm):
    """With no component the branch is ``x = h``: parallel ``h + s W_o x``, residual ``(1 - s) h + s W_o x``,
    sequential ``x``; the norm on the branch or on the output; ``s = sigmoid(alpha)`` starts at ``alpha``."""
    from mtijax.fusion import FusionConfig, FusionLayer, LayerCarry

    config = FusionConfig(positions=(0,), components=(), mode=mode, norm=norm, alpha=0.2)
    h = jnp.asarray(RNG.standard_normal((1, 3, 8)), jnp.float32)
    layer = FusionLayer(config)
    carry = LayerCarry.empty(config, 1)
    params = layer.init(jax.random.key(0), h, jnp.zeros((1, 3), jnp.int32), carry)["params"]
    out, metrics, _ = layer.apply({"params": params}, h, jnp.zeros((1, 3), jnp.int32), carry)
    x = np.asarray(h)[0]
    branch = layer_norm(x, params["norm"]) if norm == "fusion" else x
    if mode == "sequential":
        want = branch
    else:
        assert float(metrics["fusion_alpha"]) == pytest.approx(0.2)
        mixed = dense(params["out_proj"], branch)
        want = x + 0.2 * mixed if mode == "parallel" else 0.8 * x + 0.2 * mixed
    if norm == "output":
        want = layer_norm(want, params["norm"])
    np.testing.assert_allclose(np.asarray(out)[0], want, rtol=1e-5, atol=1e-5)
