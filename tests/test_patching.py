"""Capture, patch specs and KV-cache replacement (``mtijax.patching``).

Oracles: transformers with PyTorch forward hooks doing the same patch, the
original's ``DynamicCache`` surgery run on transformers, patches built by
hand with the low-level ``Patch``, and identities (a run patched with its own
activations; a run whose whole residual stream is another's).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mtijax.api import load
from mtijax.errors import MtijaxError
from mtijax.interventions import Patch, layer_mask
from mtijax.models.cache import KVCache, init_cache
from mtijax.models.decoder import forward
from mtijax.generate import generate
from mtijax.patching import (KVPatch, Plan, capture, generate_patched, layer_pairs, patch_spec, patched_forward,
                             replace_kv, single_layers, sweep, to_patches)
from mtijax.patching.capture import site_names
from mtijax.patching.spec import position_mask
from tests.conftest import random_prompts

forward_jit = jax.jit(forward, static_argnames=("config",))
PATCHABLE = ("resid_pre", "attn_q", "attn_k", "attn_v", "attn_z", "attn_out", "resid_mid", "mlp_out", "resid_post")


@pytest.fixture(scope="module")
def model(tiny_gqa):
    """The grouped-query tiny Gemma 3 (4 layers, sliding window 6)."""
    return load(tiny_gqa[1], progress=False)


@pytest.fixture(scope="module")
def prompts():
    """Target and source batches, 2 rows of 12 tokens each, and a longer 15-token source row."""
    return (jnp.asarray(random_prompts(41, [12, 12])), jnp.asarray(random_prompts(42, [12, 12])),
            jnp.asarray(random_prompts(43, [15])))


# --- capture --------------------------------------------------------------------------------------------------------


def test_capture_holds_every_site_and_the_kv_cache(model, prompts):
    """One call returns every site ``[L, B, S, ...]``, the logits, and the cache a cached prefill writes."""
    a, _, _ = prompts
    c = model.config
    run = capture(c, model.params, a)
    assert set(run.activations) == set(site_names(c)) == set(PATCHABLE)
    assert run.activations["attn_v"].shape == (c.num_layers, 2, 12, c.num_kv_heads, c.head_dim)
    assert run.layers == tuple(range(c.num_layers))
    cached = forward_jit(c, model.params, a, cache=init_cache(c.num_layers, 2, 12, c.num_kv_heads, c.head_dim))
    np.testing.assert_allclose(run.cache.k, cached.cache.k, atol=1e-5, rtol=0)
    np.testing.assert_allclose(run.cache.v, cached.cache.v, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(run.cache.positions, cached.cache.positions)
    np.testing.assert_allclose(run.logits, forward_jit(c, model.params, a).logits, atol=1e-5, rtol=0)
    np.testing.assert_allclose(run.activations["attn_v"], run.cache.v, atol=0, rtol=0)  # V is stored as projected


def test_capture_keeps_only_the_layers_and_positions_asked_for(model, prompts):
    """``layers`` and ``keep`` select the same values as slicing the full capture (left-padded rows too)."""
    c = model.config
    tokens = np.zeros((2, 12), np.int32)
    positions = np.full((2, 12), -1, np.int32)
    for row, n in enumerate((12, 9)):
        tokens[row, 12 - n:] = random_prompts(44 + row, [n])[0]
        positions[row, 12 - n:] = np.arange(n)
    full = capture(c, model.params, tokens, positions)
    some = capture(c, model.params, tokens, positions, sites=("resid_post", "attn_k"), layers=(3, 1),
                   keep=("last", 4))
    assert some.layers == (1, 3) and set(some.activations) == {"resid_post", "attn_k"}
    assert some.activations["resid_post"].shape == (2, 2, 4, c.hidden_size)
    np.testing.assert_array_equal(some.positions, [[8, 9, 10, 11], [5, 6, 7, 8]])
    for i, layer in enumerate((1, 3)):
        np.testing.assert_allclose(some.activations["attn_k"][i], full.activations["attn_k"][layer][:, -4:],
                                   atol=1e-6, rtol=0)
    middle = capture(c, model.params, tokens, positions, sites=("mlp_out",), keep=(2, 5))
    np.testing.assert_array_equal(middle.positions, [[2, 3, 4], [2, 3, 4]])
    np.testing.assert_allclose(middle.activations["mlp_out"][:, 1], full.activations["mlp_out"][:, 1, 5:8],
                               atol=1e-6, rtol=0)


def test_olmoe_capture_includes_the_router_decisions_and_patches_work(tmp_path):
    """On OLMoE, capture holds the routing sites (logits against transformers); a run patched with its own
    ``router_logits`` is unchanged; whole-cache replacement then decoding is the source's decoding."""
    from tests.olmoe_fixtures import make_olmoe_model

    hf = make_olmoe_model("e4_top2")
    hf.save_pretrained(tmp_path)
    m = load(tmp_path, progress=False)
    tokens = jnp.asarray(random_prompts(45, [7]))
    run = capture(m.config, m.params, tokens)
    assert {"router_logits", "router_experts", "router_weights"} <= set(run.activations)
    assert run.activations["router_experts"].shape == (3, 1, 7, 2)
    with torch.no_grad():
        hf_logits = hf(torch.tensor(np.asarray(tokens))).logits.numpy()
    np.testing.assert_allclose(run.logits, hf_logits, atol=1e-4, rtol=0)
    zero = patch_spec(m.config, "router_logits", jnp.zeros(3), run)
    own = patched_forward(m.config, m.params, tokens, [zero], capture=("router_logits",))
    spec = patch_spec(m.config, "router_logits", range(3), run).replace(
        source=own.captured["router_logits"])
    assert np.array_equal(patched_forward(m.config, m.params, tokens, [spec]).logits, own.logits)
    source = random_prompts(49, [7])[0]
    source[-1] = int(tokens[0, -1])
    gen = generate_patched(m.config, m.params, np.asarray(tokens[0]).tolist(), source, Plan(kv=KVPatch("whole")),
                           max_new_tokens=4, stop_ids=())
    np.testing.assert_array_equal(gen.tokens[0], generate(m.config, m.params, [source], 4, stop_ids=()).tokens[0])


# --- patch specs ----------------------------------------------------------------------------------------------------


def test_patching_a_run_with_its_own_activations_changes_nothing_bit_for_bit(model, prompts):
    """Replacing any site (or all of them at once) at any layers with the values the same compiled forward
    computed there leaves the logits identical, bit for bit. (The zero-mask run and the patched runs are one
    compiled function: masks are data. Another compilation may round differently, by about 1e-7.)"""
    a, _, _ = prompts
    c = model.config
    source = capture(c, model.params, a)
    zero = jnp.zeros(c.num_layers)
    specs = [patch_spec(c, site, zero, source) for site in PATCHABLE]
    own = patched_forward(c, model.params, a, specs, capture=PATCHABLE)
    np.testing.assert_allclose(own.logits, forward_jit(c, model.params, a).logits, atol=1e-5, rtol=0)
    specs = [spec.replace(source=own.captured[spec.site]) for spec in specs]
    for layers in (range(c.num_layers), [1], [0, 3]):
        mask = layer_mask(c.num_layers, layers)
        every = patched_forward(c, model.params, a, [spec.replace(layers=mask) for spec in specs]).logits
        assert np.array_equal(every, own.logits), f"all sites, layers {list(layers)}"
        for site in PATCHABLE:
            one = [spec.replace(layers=mask if spec.site == site else zero) for spec in specs]
            assert np.array_equal(patched_forward(c, model.params, a, one).logits, own.logits), (site, list(layers))


def test_replacing_the_residual_stream_at_every_layer_gives_the_source_logits(model, prompts):
    a, b, _ = prompts
    c = model.config
    source = capture(c, model.params, b, sites=("resid_post",))
    patched = patched_forward(c, model.params, a, [patch_spec(c, "resid_post", range(c.num_layers), source)])
    assert np.abs(np.asarray(forward_jit(c, model.params, a).logits - source.logits)).max() > 1e-2
    np.testing.assert_allclose(patched.logits, source.logits, atol=1e-6, rtol=0)


@pytest.mark.parametrize("positions, align, expected", [
    ("last", "end", {11: 14}), (("last", 3), "end", {9: 12, 10: 13, 11: 14}),
    ((2, 5), "end", {2: 5, 3: 6, 4: 7}), ((2, 5), "start", {2: 2, 3: 3, 4: 4}), ((-4, -2), "start", {8: 8, 9: 9})])
def test_position_rules_and_alignment_pick_the_documented_tokens(model, prompts, positions, align, expected):
    """Against a hand-built ``[L, B, S]`` patch: target token i gets source token ``expected[i]`` (a 15-token
    source; ``end`` pairs the last tokens, ``start`` the first), at layer 2 only, and nothing else moves."""
    a, _, long = prompts
    c = model.config
    source = capture(c, model.params, long, sites=("attn_out",))
    spec = patch_spec(c, "attn_out", [2], source, positions=positions, align=align)
    value = jnp.zeros((c.num_layers, 2, 12, c.hidden_size))
    mask = jnp.zeros((c.num_layers, 2, 12))
    for i, j in expected.items():
        value = value.at[2, :, i].set(source.activations["attn_out"][2, 0, j])
        mask = mask.at[2, :, i].set(1.0)
    by_hand = forward_jit(c, model.params, a, patches={"attn_out": Patch(value, mask)}).logits
    np.testing.assert_allclose(patched_forward(c, model.params, a, [spec]).logits, by_hand, atol=1e-6, rtol=0)


def test_modes_replace_interpolate_and_add_at_the_site(model, prompts):
    """At the patched site: replace gives the source, interpolate ``(1 - c) h + c s``, add ``h + c s``."""
    a, b, _ = prompts
    c = model.config
    h = capture(c, model.params, a, sites=("mlp_out",)).activations["mlp_out"][1]
    source = capture(c, model.params, b, sites=("mlp_out",))
    s = source.activations["mlp_out"][1]
    for mode, expected in (("replace", s), ("interpolate", 0.7 * h + 0.3 * s), ("add", h + 0.3 * s)):
        spec = patch_spec(c, "mlp_out", [1], source, mode=mode, coef=0.3)
        got = patched_forward(c, model.params, a, [spec], capture=("mlp_out",)).captured["mlp_out"][1]
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-5, err_msg=mode)


def test_a_steering_vector_is_added_at_every_patched_token(model, prompts):
    """A vector source (``align="broadcast"``) with ``mode="add"`` adds ``coef * vector`` at each patched token."""
    a, _, _ = prompts
    c = model.config
    vector = jax.random.normal(jax.random.key(3), (c.hidden_size,))
    spec = patch_spec(c, "resid_mid", [0], vector, positions=(3, 7), mode="add", coef=2.0)
    h = capture(c, model.params, a, sites=("resid_mid",)).activations["resid_mid"][0]
    got = patched_forward(c, model.params, a, [spec], capture=("resid_mid",)).captured["resid_mid"][0]
    np.testing.assert_allclose(got[:, 3:7], h[:, 3:7] + 2.0 * vector, atol=1e-5, rtol=1e-6)
    np.testing.assert_allclose(got[:, :3], h[:, :3], atol=1e-5, rtol=0)
    np.testing.assert_allclose(got[:, 7:], h[:, 7:], atol=1e-5, rtol=0)


def test_position_mask_counts_real_tokens_of_left_padded_rows():
    from mtijax.patching.spec import PatchSpec

    positions = jnp.asarray([[0, 1, 2, 3, 4], [-1, -1, 0, 1, 2]])
    spec = PatchSpec(jnp.ones(1), jnp.asarray([-2, 2**30]), jnp.float32(1), jnp.zeros((1, 1, 1, 1)),
                     jnp.zeros((1, 1), jnp.int32))
    assert position_mask(spec, positions).tolist() == [[0, 0, 0, 1, 1], [0, 0, 0, 1, 1]]
    spec = spec.replace(span=jnp.asarray([0, 2]))
    assert position_mask(spec, positions).tolist() == [[1, 1, 0, 0, 0], [0, 0, 1, 1, 0]]


# --- sweeps ---------------------------------------------------------------------------------------------------------


def test_vmapped_sweep_equals_a_loop_over_single_specs(model, prompts):
    """Every single layer and every pair (two sites at once), and a batch of coefficients, in one vmapped call
    each, equal patching one spec at a time."""
    a, b, _ = prompts
    c = model.config
    source = capture(c, model.params, b, sites=("attn_v", "resid_pre"))
    v = patch_spec(c, "attn_v", [0], source, positions=("last", 5))
    resid = patch_spec(c, "resid_pre", [2], source, mode="interpolate", coef=0.5)
    singles = sweep(c, model.params, a, [v.replace(layers=jnp.asarray(single_layers(c.num_layers))), resid],
                    final_only=False)
    pairs, chosen = layer_pairs(c.num_layers)
    assert len(chosen) == 6
    by_pair = sweep(c, model.params, a, [v.replace(layers=jnp.asarray(pairs)), resid])
    coefs = sweep(c, model.params, a, [v, resid.replace(coef=jnp.asarray([0.0, 0.25, 1.0]))])
    for layer in range(c.num_layers):
        one = patched_forward(c, model.params, a, [v.replace(layers=layer_mask(c.num_layers, [layer])), resid])
        np.testing.assert_allclose(singles[layer], one.logits, atol=1e-5, rtol=0, err_msg=f"layer {layer}")
    for k, pair in enumerate(chosen):
        one = patched_forward(c, model.params, a, [v.replace(layers=layer_mask(c.num_layers, pair)), resid])
        np.testing.assert_allclose(by_pair[k], one.logits[:, -1], atol=1e-5, rtol=0, err_msg=f"pair {pair}")
    for k, coef in enumerate((0.0, 0.25, 1.0)):
        one = patched_forward(c, model.params, a, [v, resid.replace(coef=jnp.float32(coef))])
        np.testing.assert_allclose(coefs[k], one.logits[:, -1], atol=1e-5, rtol=0, err_msg=f"coef {coef}")


# --- the same patch with PyTorch hooks on transformers --------------------------------------------------------------


def test_patches_match_pytorch_forward_hooks_on_transformers(tiny_gqa, model, prompts):
    """Interpolating layer 2's v_proj output at the last 3 tokens towards a longer source's last 3 (end-aligned),
    and replacing the residual stream entering layer 1 at tokens 2..4 with the source's tokens 2..4, done with a
    forward hook and a forward pre-hook on ``Gemma3ForCausalLM``, gives the same logits."""
    hf = tiny_gqa[0]
    a, _, long = prompts
    c = model.config
    source = capture(c, model.params, long, sites=("attn_v", "resid_pre"))
    specs = [patch_spec(c, "attn_v", [2], source, positions=("last", 3), mode="interpolate", coef=0.4),
             patch_spec(c, "resid_pre", [1], source, positions=(2, 5), align="start")]
    ours = patched_forward(c, model.params, a, specs).logits

    with torch.no_grad():
        recorded = {}
        hooks = [hf.model.layers[2].self_attn.v_proj.register_forward_hook(
                     lambda m, i, o: recorded.__setitem__("v", o.clone())),
                 hf.model.layers[1].register_forward_pre_hook(
                     lambda m, args, kwargs: recorded.__setitem__("resid", (args[0] if args else
                                                                           kwargs["hidden_states"]).clone()),
                     with_kwargs=True)]
        hf(torch.tensor(np.asarray(long)))
        for hook in hooks:
            hook.remove()

        def v_hook(module, inputs, output):
            output = output.clone()
            output[:, -3:] = 0.6 * output[:, -3:] + 0.4 * recorded["v"][:, -3:]
            return output

        def resid_hook(module, args, kwargs):
            key = "hidden_states" if "hidden_states" in kwargs else None
            hidden = (kwargs[key] if key else args[0]).clone()
            hidden[:, 2:5] = recorded["resid"][:, 2:5]
            if key:
                return args, {**kwargs, key: hidden}
            return (hidden, *args[1:]), kwargs

        hooks = [hf.model.layers[2].self_attn.v_proj.register_forward_hook(v_hook),
                 hf.model.layers[1].register_forward_pre_hook(resid_hook, with_kwargs=True)]
        try:
            theirs = hf(torch.tensor(np.asarray(a))).logits.numpy()
        finally:
            for hook in hooks:
                hook.remove()
        plain = hf(torch.tensor(np.asarray(a))).logits.numpy()
    assert np.abs(theirs - plain).max() > 1e-2, "the patch must change the logits"
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


# --- KV-cache replacement -------------------------------------------------------------------------------------------


def test_last_min_replacement_is_the_originals_dynamic_cache_surgery(tiny_gqa, model):
    """The original overwrote, in every layer of a transformers cache, the last min(n_target, n_source) positions of
    K and V with the source's last ones, then fed the target's last token again. Both ways round (shorter and
    longer source) the next-token logits equal ours (``last_min`` + ``refeed``). (transformers keeps only the last
    window - 1 positions of a sliding layer; those are the ones the next token can see.)"""
    hf = tiny_gqa[0]
    c = model.config
    target = random_prompts(46, [11])[0]
    for source in random_prompts(47, [8, 14]):
        with torch.no_grad():
            src = hf(torch.tensor([source]), use_cache=True).past_key_values
            patched = hf(torch.tensor([target]), use_cache=True).past_key_values
            for layer, src_layer in zip(patched.layers, src.layers):
                m = min(layer.keys.shape[2], src_layer.keys.shape[2])
                layer.keys[:, :, -m:] = src_layer.keys[:, :, -m:]
                layer.values[:, :, -m:] = src_layer.values[:, :, -m:]
            theirs = hf(torch.tensor([target[-1:]]), past_key_values=patched, use_cache=True).logits[0, -1].numpy()
            plain = hf(torch.tensor([target + target[-1:]])).logits[0, -1].numpy()
        ours = generate_patched(c, model.params, target, source, Plan(kv=KVPatch("last_min"), first_token="refeed"),
                                max_new_tokens=1).first_logits
        assert np.abs(theirs - plain).max() > 1e-2, "the surgery must matter"
        np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0, err_msg=f"source of {len(source)} tokens")


def test_replace_kv_policies_move_the_documented_slots(model):
    """``last_min`` keeps the target's positions and moves the last m slots; ``whole`` moves everything with the
    source's positions, right-aligned at the prompt end; slots after the prompt end are untouched; layers not
    chosen keep the target's entries."""
    c = model.config
    shape = (c.num_layers, 1, 8, c.num_kv_heads, c.head_dim)
    target = KVCache(jnp.ones(shape), -jnp.ones(shape), jnp.asarray([[-1, -1, 0, 1, 2, 3, -1, -1]]))
    src_values = jnp.arange(6.0)[None, None, :, None, None] * jnp.ones((c.num_layers, 1, 6, c.num_kv_heads,
                                                                      c.head_dim))
    source = KVCache(src_values + 10, src_values + 20, jnp.asarray([[-1, -1, -1, 0, 1, 2]]))
    last = replace_kv(target, source, policy="last_min", target_end=6, layers=[1, 2])
    np.testing.assert_array_equal(last.positions, target.positions)
    np.testing.assert_array_equal(last.k[1, 0, :, 0, 0], [1, 1, 1, 13, 14, 15, 1, 1])
    np.testing.assert_array_equal(last.v[2, 0, :, 0, 0], [-1, -1, -1, 23, 24, 25, -1, -1])
    np.testing.assert_array_equal(last.k[0], target.k[0])
    whole = replace_kv(target, source, policy="whole", target_end=6)
    np.testing.assert_array_equal(whole.positions, [[-1, -1, -1, 0, 1, 2, -1, -1]])
    np.testing.assert_array_equal(whole.k[3, 0, :, 0, 0], [10, 11, 12, 13, 14, 15, 1, 1])


# --- bad input ------------------------------------------------------------------------------------------------------


def test_bad_specs_are_clear_errors(model, prompts):
    a, b, _ = prompts
    c = model.config
    source = capture(c, model.params, b, sites=("attn_v",))
    cases = [
        (lambda: patch_spec(c, "resid", [0], source), "has no activation site 'resid'"),
        (lambda: patch_spec(c, "router_logits", [0], source), "gemma3 has no activation site 'router_logits'"),
        (lambda: patch_spec(c, "attn_v", [4], source), "layer 4 is out of range"),
        (lambda: patch_spec(c, "attn_v", [0], source, mode="multiply"), "unknown patch mode"),
        (lambda: patch_spec(c, "attn_out", [0], source), "the source capture has no site 'attn_out'"),
        (lambda: patch_spec(c, "attn_v", [0], source, positions="first"), "unknown position rule"),
        (lambda: patch_spec(c, "attn_v", [0], source, positions=(5, 5)), "is empty"),
        (lambda: patched_forward(c, model.params, a, [patch_spec(c, "attn_v", [0], source, positions=(10, 14))]),
         r"position range \(10, 14\) is outside the prompt of row 0, which has 12 tokens"),
        (lambda: patched_forward(c, model.params, a, [patch_spec(c, "attn_v", [0], source, positions=("last", 13))]),
         "outside the prompt"),
        (lambda: capture(c, model.params, a, layers=[7]), "capture layer 7 is out of range"),
        (lambda: capture(c, model.params, a, keep=("last", 20)), "outside"),
        (lambda: to_patches([patch_spec(c, "attn_v", [0], source)] * 2, jnp.zeros((1, 1), jnp.int32)),
         "two patches at site 'attn_v'"),
    ]
    for make, message in cases:
        with pytest.raises(MtijaxError, match=message):
            make()


def test_a_short_source_cannot_feed_aligned_tokens(model, prompts):
    a, _, _ = prompts
    c = model.config
    short = capture(c, model.params, jnp.asarray(random_prompts(48, [5])), sites=("attn_v",))
    with pytest.raises(MtijaxError, match="have no end-aligned source token: the source has 5 tokens"):
        patched_forward(c, model.params, a, [patch_spec(c, "attn_v", [0], short, positions=("last", 8))])


def test_a_cache_from_another_architecture_or_shape_is_rejected(model):
    c = model.config
    target = init_cache(c.num_layers, 2, 16, c.num_kv_heads, c.head_dim)
    for source, message in ((init_cache(c.num_layers + 1, 1, 16, c.num_kv_heads, c.head_dim), "another architecture"),
                            (init_cache(c.num_layers, 1, 16, c.num_kv_heads, c.head_dim * 2), "another architecture"),
                            (init_cache(c.num_layers, 3, 16, c.num_kv_heads, c.head_dim), "batch 3"),
                            (init_cache(c.num_layers, 1, 32, c.num_kv_heads, c.head_dim), "does not fit")):
        with pytest.raises(MtijaxError, match=message):
            replace_kv(target, source, policy="whole")
    with pytest.raises(MtijaxError, match="unknown KV policy"):
        replace_kv(target, target, policy="first")
