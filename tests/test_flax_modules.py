"""The decoders as linen modules over the documented params: ``init`` makes the documented tree, ``apply`` runs
on a loaded checkpoint's params unchanged, and the fused model is one module.

``mtijax.forward`` is ``module(config).apply``, so the parity tests against transformers (test_gemma3_parity.py,
test_olmoe.py) test the module. Here the reference is independent of the layer scan: a Python loop over the
layers applying the one-layer :class:`~mtijax.models.Block` to ``tree_map(lambda x: x[l], params["layers"])``
with each layer's patch slice. Compiled with the scan unrolled, the two are the same program up to how the
layers are sliced, so they agree bit for bit (on the grouped-query tiny Gemma 3 and a tiny OLMoE; the other
tiny configurations run through the same module in the parity tests).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtijax
from mtijax.errors import MtijaxError
from mtijax.fusion import FusionConfig, fused_forward, init_fusion
from mtijax.fusion.module import Fused, fused_variables
from mtijax.interventions import Patch, Sites
from mtijax.models import Gemma3, Olmoe, block_apply, module
from mtijax.models.decoder import family
from mtijax.models.fused import LAYOUT, fuse_qkv
from tests.conftest import random_prompts, write_checkpoint
from tests.olmoe_fixtures import make_olmoe_model

TOKENS = jnp.asarray(random_prompts(5, [9, 9]))
CAPTURE = ("attn_q", "resid_post")


@pytest.fixture(scope="module")
def olmoe(tmp_path_factory):
    """A tiny OLMoE (top-1 of 8 experts, grouped-query attention) loaded from its transformers checkpoint."""
    return mtijax.load(write_checkpoint(make_olmoe_model("e8_top1_gqa"), tmp_path_factory.mktemp("olmoe")),
                       progress=False)


def layer_by_layer(config, params, tokens, capture, patches):
    """Logits and captures ``[L, ...]`` from a Python loop of :func:`block_apply` over the layers."""
    arch = family(config)
    spec = arch.layer_spec(config)
    b, s = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    x = arch.embed(config, params, tokens)
    captured = {name: [] for name in capture}
    for l in range(config.num_layers):
        sites = Sites(capture, {site: jax.tree.map(lambda a: a[l], p) for site, p in patches.items()})
        x, _ = block_apply(config, jax.tree.map(lambda a: a[l], params["layers"]),
                           jax.tree.map(lambda a: jnp.asarray(a[l]), spec), x, positions, None, sites)
        for name in capture:
            captured[name].append(sites.captured[name])
    return arch.unembed(config, params, x), {name: jnp.stack(values) for name, values in captured.items()}


def resid_mid_patch(config) -> dict[str, Patch]:
    """A blend of random values into ``resid_mid``: layer 0 untouched, layer 1 replaced, the rest half-blended."""
    value = jax.random.normal(jax.random.key(2), (config.num_layers, *TOKENS.shape, config.hidden_size))
    return {"resid_mid": Patch(value, jnp.asarray([0.0, 1.0] + [0.5] * (config.num_layers - 2)))}


def check_apply_matches_layer_loop(model, capture):
    config, params = model.config, model.params
    patches = resid_mid_patch(config)
    apply = jax.jit(lambda p, t, pa: module(config).apply({"params": p}, t, capture=capture, patches=pa,
                                                          unroll=True))
    out = apply(params, TOKENS, patches)
    logits, captured = jax.jit(lambda p, t, pa: layer_by_layer(config, p, t, capture, pa))(params, TOKENS, patches)
    assert np.array_equal(out.logits, logits)
    for name in capture:
        assert np.array_equal(out.captured[name], captured[name]), name


def test_gemma3_apply_on_loaded_params_matches_a_loop_of_its_block(tiny_gqa):
    model = mtijax.load(tiny_gqa[1], progress=False)
    assert isinstance(module(model.config), Gemma3)
    check_apply_matches_layer_loop(model, CAPTURE)


def test_olmoe_apply_on_loaded_params_matches_a_loop_of_its_block(olmoe):
    assert isinstance(module(olmoe.config), Olmoe)
    check_apply_matches_layer_loop(olmoe, CAPTURE + ("router_experts", "router_weights"))


def test_captures_are_also_sown_into_intermediates(olmoe):
    out, state = module(olmoe.config).apply({"params": olmoe.params}, TOKENS, capture=CAPTURE,
                                            mutable=["intermediates"])
    assert sorted(state["intermediates"]) == sorted(CAPTURE)
    for name in CAPTURE:
        assert np.array_equal(state["intermediates"][name][0], out.captured[name])


def test_a_transform_may_build_and_apply_a_linen_module(olmoe):
    """Transforms run as from plain JAX code, so a module they construct is top-level, not the decoder's child."""
    dense = nn.Dense(olmoe.config.hidden_size)
    weights = dense.init(jax.random.key(3), jnp.zeros((1, olmoe.config.hidden_size)))
    kernel, bias = weights["params"]["kernel"], weights["params"]["bias"]
    built = mtijax.forward(olmoe.config, olmoe.params, TOKENS,
                           transforms={0: lambda h, _: nn.Dense(olmoe.config.hidden_size).apply(weights, h)})
    by_hand = mtijax.forward(olmoe.config, olmoe.params, TOKENS, transforms={0: lambda h, _: h @ kernel + bias})
    assert np.array_equal(built.logits, by_hand.logits)


def shape_tree(tree):
    return jax.tree.map(lambda a: tuple(a.shape), tree)


def test_init_makes_exactly_the_documented_names_and_shapes(tiny_gqa, olmoe):
    for config in (mtijax.load_config(tiny_gqa[1])[0], olmoe.config):
        variables = jax.eval_shape(module(config).init, jax.random.key(0), TOKENS)
        assert list(variables) == ["params"]
        documented = family(config).param_shapes(config)
        assert shape_tree(variables["params"]) == documented
        fused = jax.eval_shape(module(config, LAYOUT).init, jax.random.key(0), TOKENS)["params"]
        assert shape_tree(fused) == shape_tree(jax.eval_shape(fuse_qkv, variables["params"]))


def test_a_module_refuses_another_architectures_config(olmoe):
    with pytest.raises(MtijaxError, match="Gemma3 is the gemma3 module"):
        Gemma3(olmoe.config).apply({"params": olmoe.params}, TOKENS)


CARRY_AND_MEMORY = FusionConfig(positions=(1, 3), components=("kuramoto", "smf"), mode="residual", alpha=0.5,
                                smf_slots=8)
"""Fusion layers with a carry (Kuramoto) and a memory bank (SMF) at two layers."""


def test_fused_module_equals_fused_forward_and_writes_the_same_memory(tiny_gqa):
    model = mtijax.load(tiny_gqa[1], progress=False)
    variables = init_fusion(CARRY_AND_MEMORY, model.config, jax.random.key(0))
    expected = jax.jit(lambda v, t: fused_forward(model.config, model.params, CARRY_AND_MEMORY, v, t, store_memory=True,
                                                  capture=CAPTURE))(variables, TOKENS)
    fused = Fused(model.config, CARRY_AND_MEMORY)
    out, changed = jax.jit(lambda v, t: fused.apply(v, t, store_memory=True, capture=CAPTURE, mutable=["memory"]))(
        fused_variables(model.params, variables), TOKENS)
    assert jax.tree.structure(out) == jax.tree.structure(expected)
    for got, want in zip(jax.tree.leaves(out), jax.tree.leaves(expected)):
        assert np.array_equal(got, want)
    assert jax.tree.structure(changed["memory"]) == jax.tree.structure(out.memory)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(changed["memory"]), jax.tree.leaves(out.memory)))
    init = jax.eval_shape(fused.init, jax.random.key(0), TOKENS)
    assert shape_tree(init) == shape_tree(fused_variables(model.params, variables))
