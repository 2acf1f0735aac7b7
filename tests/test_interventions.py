"""Activation sites: what is captured matches transformers; patches replace, add, blend, and stay data.

Captures are checked against ``output_hidden_states`` and a forward hook on
the transformers model. Patches are checked against the effect they must
have: replacing a residual stream with another prompt's makes everything
downstream that prompt's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import mtijax
from mtijax.api import load
from mtijax.errors import MtijaxError
from mtijax.interventions import Patch, layer_mask
from mtijax.models.cache import init_cache
from mtijax.models.decoder import forward
from mtijax.models.gemma3 import SITES
from mtijax.models.layers import rms_norm
from tests.conftest import random_prompts

forward_jit = jax.jit(forward, static_argnames=("config", "capture"))


@pytest.fixture(scope="module")
def model(tiny_gqa):
    """The grouped-query tiny model (4 layers) loaded by mtijax."""
    return load(tiny_gqa[1], progress=False)


@pytest.fixture(scope="module")
def two_prompts():
    """Two batches of two prompts each, all of length 12 (longer than the sliding window)."""
    a, b = np.array(random_prompts(21, [12] * 2)), np.array(random_prompts(22, [12] * 2))
    return jnp.asarray(a), jnp.asarray(b)


def run(model, tokens, **kwargs):
    return forward_jit(model.config, model.params, tokens, **kwargs)


# --- captures against transformers ---------------------------------------------------------------------------------


def test_residual_stream_matches_transformers_hidden_states(tiny):
    """``resid_pre`` of layer 0 is hidden_states[0] (scaled embeddings); ``resid_post`` of layer l is
    hidden_states[l + 1] for every layer but the last, whose hidden state transformers returns after the
    final norm."""
    hf, directory = tiny
    m = load(directory, progress=False)
    tokens = np.array(random_prompts(23, [13, 13]))
    with torch.no_grad():
        hidden = [h.numpy() for h in hf(torch.tensor(tokens), output_hidden_states=True).hidden_states]
    out = run(m, jnp.asarray(tokens), capture=("resid_pre", "resid_post"))
    pre, post = np.asarray(out.captured["resid_pre"]), np.asarray(out.captured["resid_post"])
    num_layers = m.config.num_layers
    assert len(hidden) == num_layers + 1
    assert post.shape == (num_layers, *tokens.shape, m.config.hidden_size)
    np.testing.assert_allclose(pre[0], hidden[0], atol=1e-4, rtol=0)
    for layer in range(num_layers - 1):
        np.testing.assert_allclose(post[layer], hidden[layer + 1], atol=1e-4, rtol=0, err_msg=f"layer {layer}")
        np.testing.assert_allclose(pre[layer + 1], post[layer], atol=0, rtol=0)
    final = rms_norm(post[-1], m.params["final_norm"], m.config.rms_norm_eps)
    np.testing.assert_allclose(final, hidden[-1], atol=1e-4, rtol=0)


def test_attn_v_matches_the_transformers_v_projection(tiny):
    """``attn_v`` of layer l is the output of ``layers[l].self_attn.v_proj``, as ``[B, S, K, H]``."""
    hf, directory = tiny
    m = load(directory, progress=False)
    tokens = np.array(random_prompts(24, [11, 11]))
    seen: dict[int, np.ndarray] = {}
    hooks = [layer.self_attn.v_proj.register_forward_hook(
        lambda module, args, output, l=l: seen.__setitem__(l, output.detach().numpy()))
        for l, layer in enumerate(hf.model.layers)]
    try:
        with torch.no_grad():
            hf(torch.tensor(tokens))
    finally:
        for hook in hooks:
            hook.remove()
    captured = np.asarray(run(m, jnp.asarray(tokens), capture=("attn_v",)).captured["attn_v"])
    c = m.config
    assert captured.shape == (c.num_layers, *tokens.shape, c.num_kv_heads, c.head_dim)
    for layer in range(c.num_layers):
        expected = seen[layer].reshape(*tokens.shape, c.num_kv_heads, c.head_dim)
        np.testing.assert_allclose(captured[layer], expected, atol=1e-4, rtol=0, err_msg=f"layer {layer}")


def test_every_site_is_captured_with_its_documented_shape(model, two_prompts):
    c = model.config
    b, s = two_prompts[0].shape
    shapes = {"resid_pre": (c.hidden_size,), "attn_q": (c.num_heads, c.head_dim),
              "attn_k": (c.num_kv_heads, c.head_dim), "attn_v": (c.num_kv_heads, c.head_dim),
              "attn_z": (c.num_heads, c.head_dim), "attn_out": (c.hidden_size,), "resid_mid": (c.hidden_size,),
              "mlp_out": (c.hidden_size,), "resid_post": (c.hidden_size,)}
    assert set(shapes) == set(SITES)
    out = run(model, two_prompts[0], capture=SITES)
    assert {name: v.shape for name, v in out.captured.items()} == {
        name: (c.num_layers, b, s, *shape) for name, shape in shapes.items()}


# --- patches --------------------------------------------------------------------------------------------------------


def test_zero_mask_leaves_logits_bit_identical(model, two_prompts):
    """A patch whose mask is 0 everywhere changes nothing, bit for bit, at any site."""
    a, _ = two_prompts
    plain = np.asarray(run(model, a).logits)
    zeros = jnp.zeros((model.config.num_layers,))
    captured = run(model, a, capture=SITES).captured
    for site in ("resid_pre", "attn_v", "resid_post"):
        noise = jax.random.normal(jax.random.key(0), captured[site].shape) * 100
        for mode in ("replace", "add"):
            patched = np.asarray(run(model, a, patches={site: Patch(noise, zeros, mode)}).logits)
            assert np.array_equal(patched, plain), (site, mode)


@pytest.mark.parametrize("layer", ["last", "middle"])
def test_replacing_the_residual_stream_transplants_the_other_prompt(model, two_prompts, layer):
    """Replacing ``resid_post`` of layer l at every position with a second prompt's makes every later
    activation, and the logits at all positions, the second prompt's."""
    a, b = two_prompts
    l = model.config.num_layers - 1 if layer == "last" else 1
    donor = run(model, b, capture=("resid_post",))
    patch = Patch(donor.captured["resid_post"], layer_mask(model.config.num_layers, [l]))
    patched = run(model, a, capture=("resid_post",), patches={"resid_post": patch})
    original = run(model, a).logits
    assert np.abs(np.asarray(original) - np.asarray(donor.logits)).max() > 1e-2, "the prompts must differ"
    np.testing.assert_allclose(patched.logits, donor.logits, atol=1e-5, rtol=0)
    np.testing.assert_allclose(patched.captured["resid_post"][l:], donor.captured["resid_post"][l:],
                               atol=1e-5, rtol=0)


def test_position_mask_patches_only_those_positions(model, two_prompts):
    """A ``[L, B, S]`` mask patches single positions: earlier positions (causal) and other rows keep their
    logits exactly; the patched position changes."""
    a, b = two_prompts
    c = model.config
    donor = run(model, b, capture=("resid_pre",)).captured["resid_pre"]
    mask = jnp.zeros((c.num_layers, *a.shape)).at[0, 0, 7].set(1.0)
    plain = np.asarray(run(model, a).logits)
    patched = np.asarray(run(model, a, patches={"resid_pre": Patch(donor, mask)}).logits)
    assert np.array_equal(patched[0, :7], plain[0, :7])
    assert np.array_equal(patched[1], plain[1])
    assert np.abs(patched[0, 7] - plain[0, 7]).max() > 1e-3


def test_add_equals_replace_with_captured_plus_value(model, two_prompts):
    """``mode="add"`` with value v at layer l is ``mode="replace"`` with (activation at l) + v."""
    a, _ = two_prompts
    c, l = model.config, 2
    for site in ("resid_mid", "attn_k"):
        captured = run(model, a, capture=(site,)).captured[site]
        v = jax.random.normal(jax.random.key(1), captured.shape)
        mask = layer_mask(c.num_layers, [l])
        added = run(model, a, patches={site: Patch(v, mask, "add")}).logits
        replaced = run(model, a, patches={site: Patch(captured + v, mask)}).logits
        plain = run(model, a).logits
        np.testing.assert_allclose(added, replaced, atol=1e-5, rtol=0)
        assert np.abs(np.asarray(added) - np.asarray(plain)).max() > 1e-3


def test_fractional_masks_blend_and_scale(model, two_prompts):
    """With mask m, replace gives ``(1 - m) * h + m * value`` at the site and add gives ``h + m * value``."""
    a, b = two_prompts
    c = model.config
    h = run(model, a, capture=("mlp_out",)).captured["mlp_out"]
    value = run(model, b, capture=("mlp_out",)).captured["mlp_out"]
    mask = 0.25 * layer_mask(c.num_layers, [0])
    for mode, expected in (("replace", 0.75 * h[0] + 0.25 * value[0]), ("add", h[0] + 0.25 * value[0])):
        patch = Patch(value, mask, mode)
        patched = run(model, a, capture=("mlp_out",), patches={"mlp_out": patch}).captured["mlp_out"]
        np.testing.assert_allclose(patched[0], expected, atol=1e-5, rtol=1e-6, err_msg=mode)


def test_one_compiled_forward_serves_every_layer_mask(model, two_prompts):
    """Which layers are patched is data: changing the mask does not retrace the jitted forward."""
    a, b = two_prompts
    c = model.config
    traces = []

    @jax.jit
    def patched_logits(mask, value):
        traces.append(1)
        return forward(c, model.params, a, patches={"resid_post": Patch(value, mask)}).logits

    value = run(model, b, capture=("resid_post",)).captured["resid_post"]
    results = [patched_logits(layer_mask(c.num_layers, layers), value) for layers in ([], [1], [3], [0, 2])]
    assert len(traces) == 1
    np.testing.assert_allclose(results[0], run(model, a).logits, atol=1e-5, rtol=0)
    for result in results[1:]:  # the whole stream replaced at any layer: the donor's logits
        np.testing.assert_allclose(result, run(model, b).logits, atol=1e-5, rtol=0)


def test_vmap_over_layer_masks_equals_a_loop(model, two_prompts):
    """A sweep over layers is one ``jax.vmap`` over a stack of masks, equal to patching each layer in turn."""
    a, b = two_prompts
    c = model.config
    value = run(model, b, capture=("attn_out",)).captured["attn_out"]
    masks = jnp.eye(c.num_layers)
    sweep = jax.vmap(lambda m: forward(c, model.params, a, patches={"attn_out": Patch(value, m)}).logits)(masks)
    for l in range(c.num_layers):
        one = run(model, a, patches={"attn_out": Patch(value, layer_mask(c.num_layers, [l]))}).logits
        np.testing.assert_allclose(sweep[l], one, atol=1e-5, rtol=0, err_msg=f"layer {l}")


def test_patched_values_are_what_the_cache_stores(model, two_prompts):
    """Patching ``attn_k`` and ``attn_v`` with another prompt's at every layer writes that prompt's keys and
    values into the KV cache."""
    a, b = two_prompts
    c = model.config
    cache = init_cache(c.num_layers, a.shape[0], 16, c.num_kv_heads, c.head_dim)
    donor = run(model, b, cache=cache, capture=("attn_k", "attn_v"))
    ones = jnp.ones((c.num_layers,))
    patches = {"attn_k": Patch(donor.captured["attn_k"], ones), "attn_v": Patch(donor.captured["attn_v"], ones)}
    patched = run(model, a, cache=cache, patches=patches)
    np.testing.assert_allclose(patched.cache.k, donor.cache.k, atol=1e-5, rtol=0)
    np.testing.assert_allclose(patched.cache.v, donor.cache.v, atol=1e-5, rtol=0)


# --- errors ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layers", [[4], [-1], [0, 9]])
def test_layer_mask_rejects_layers_out_of_range(layers):
    with pytest.raises(MtijaxError, match="out of range"):
        layer_mask(4, layers)


def test_layer_mask_marks_the_chosen_layers():
    assert layer_mask(5, [1, 3]).tolist() == [0, 1, 0, 1, 0]
    assert layer_mask(3, []).tolist() == [0, 0, 0]


def test_unknown_site_names_are_rejected_with_the_architectures_sites(model, two_prompts):
    a, _ = two_prompts
    with pytest.raises(MtijaxError, match="gemma3 has no activation site 'resid'; its sites are resid_pre, attn_q"):
        forward(model.config, model.params, a, capture=("resid_post", "resid"))
    patch = Patch(jnp.zeros((model.config.num_layers,)), jnp.zeros((model.config.num_layers,)))
    with pytest.raises(MtijaxError, match="gemma3 has no activation site 'mlp_in'"):
        forward(model.config, model.params, a, patches={"mlp_in": patch})
    with pytest.raises(MtijaxError, match="gemma3 has no activation site 'router_logits'"):
        forward(model.config, model.params, a, capture=("router_logits",))


def test_the_engine_checks_intervention_sites_before_it_compiles(model, two_prompts):
    from mtijax.engine import Interventions

    a, _ = two_prompts
    patch = Patch(jnp.zeros((model.config.num_layers,)), jnp.zeros((model.config.num_layers,)))
    with pytest.raises(MtijaxError, match="gemma3 has no activation site 'router_logits'"):
        mtijax.generate(model.config, model.params, a.tolist(), 2,
                        interventions=Interventions(patches={"router_logits": patch}))
    with pytest.raises(MtijaxError, match="gemma3 has no activation site 'router_experts'"):
        mtijax.generate(model.config, model.params, a.tolist(), 2,
                        interventions=Interventions(trace=(("router_experts", (0,)),)))


def test_unknown_patch_mode_is_rejected(model, two_prompts):
    a, _ = two_prompts
    patch = Patch(jnp.zeros((model.config.num_layers,)), jnp.zeros((model.config.num_layers,)), "multiply")
    with pytest.raises(MtijaxError, match="unknown patch mode"):
        forward(model.config, model.params, a, patches={"resid_post": patch})
