"""Streaming as a param source of the generation engine, against the same run with the layers resident.

The resident engine (``mtijax.generate`` and ``mtijax.generate.start_run``) is checked against full
forwards and transformers elsewhere; here a streamed model (layers arriving one at a time, from a
multi-shard checkpoint or from params in memory) must give its tokens exactly, and its logits, trace
and policy readings to float rounding, with every kind of intervention: static and step patches, a
fusion graft with its carry and the stability policy, the spiking gate with its membranes (whole
layers and expert streaming). Injection writes into host memory only (the checkpoint's bytes are
unchanged, injected layers are never read again), the host cache keeps hitting on a cyclic scan
larger than itself, and a run whose allocator peak passes the cap stops with one line.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtijax
from mtijax.engine import CacheEdit, Interventions, Plain, StepPatch, collect
from mtijax.fusion import Decoding, for_model, init_fusion
from mtijax.fusion.decode import StabilityPolicy, grafts
from mtijax.generate import start_run
from mtijax.interventions import Patch, layer_mask
from mtijax.models.decoder import family
from mtijax.snn.gate import spiking_gate
from mtijax.streaming import StreamedModel
from mtijax.streaming.memory import allocator_peak
from tests.conftest import random_prompts, tree_checksums
from tests.olmoe_fixtures import make_olmoe_model

TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def gemma(tiny_gqa):
    """``(checkpoint_dir, resident mtijax.Model)`` of the grouped-query tiny Gemma 3 (4 layers)."""
    _, directory = tiny_gqa
    return directory, mtijax.load(directory, tokenizer=False, progress=False)


@pytest.fixture(scope="module")
def olmoe(tmp_path_factory):
    """``(checkpoint_dir, resident Model)``: 2 layers, top-3 of 6 experts, in several shards."""
    directory = tmp_path_factory.mktemp("olmoe-engine")
    make_olmoe_model("e6_top3_norm_clip").save_pretrained(directory, max_shard_size="64KB")
    return directory, mtijax.load(directory, tokenizer=False, progress=False)


def random_params(config, seed, scale=0.5):
    """Host numpy params of ``config`` drawn normal (std ``scale``; numpy, so no compile per leaf)."""
    rng = np.random.default_rng(seed)
    shapes = family(config).param_shapes(config)
    return jax.tree.map(lambda shape: (scale * rng.standard_normal(shape)).astype(np.float32), shapes,
                        is_leaf=lambda x: isinstance(x, tuple))


def both_runs(model, streamed, prompts, steps, **options):
    """The same request through the resident engine and through the streamed model: two ``Collected``."""
    options = {"policy": Plain(), "stop_ids": (), "record_logits": True, **options}
    request, resident_steps = start_run(model.config, model.params, prompts, steps, **options)
    resident = collect(resident_steps, request, model.config.pad_token_id)
    request, streamed_steps = streamed.start_run(prompts, steps, **options)
    with_streaming = collect(streamed_steps, request, model.config.pad_token_id)
    return resident, with_streaming


def assert_same_run(resident, streamed):
    np.testing.assert_array_equal(streamed.tokens, resident.tokens)
    for a, b in zip(resident.records, streamed.records):
        np.testing.assert_allclose(b.logits, a.logits, **TOL)
        for name in a.readings:
            np.testing.assert_allclose(b.readings[name], a.readings[name], **TOL)
        for site in a.trace:
            np.testing.assert_allclose(b.trace[site], a.trace[site], **TOL)


def plain_logits(model, prompts, steps):
    request, run = start_run(model.config, model.params, prompts, steps, policy=Plain(), stop_ids=(),
                             record_logits=True)
    return np.stack([r.logits for r in collect(run, request, 0).records])


# --- interventions -------------------------------------------------------------------------------------------------

def halve_values(cache, layer, width):
    """A cache edit: the values of layer ``layer`` in the prefill region halved."""
    scale = jnp.where(jnp.arange(cache.length) < width, 0.5, 1.0)[None, :, None, None]
    return cache._replace(v=cache.v.at[layer].multiply(scale.astype(cache.v.dtype)))


def test_streamed_generation_with_every_kind_of_patch_a_cache_edit_and_a_trace(gemma):
    directory, model = gemma
    c = model.config
    rng = np.random.default_rng(0)
    prompts = random_prompts(20, [11, 5])  # a prefill of 10 tokens: one 64-slot chunk on the CPU ladder
    static = Patch(jnp.asarray(rng.normal(size=(c.num_layers, 1, 1, c.hidden_size)), jnp.float32),
                   layer_mask(c.num_layers, [1]), "add")
    prompt = Patch(jnp.asarray(rng.normal(size=(c.num_layers, 2, 64, c.hidden_size)), jnp.float32),
                   layer_mask(c.num_layers, [1]), "add")
    step = StepPatch(jnp.asarray(rng.normal(size=(c.num_layers, 2, 3, c.hidden_size)), jnp.float32),
                     jnp.array([1.0, 0.0, 1.0]), layer_mask(c.num_layers, [0, 2]), "add")
    interventions = Interventions(patches={"resid_post": static}, prompt_patches={"attn_out": prompt},
                                  step_patches={"mlp_out": step}, cache_edit=CacheEdit(jnp.int32(2), halve_values),
                                  trace=(("attn_out", (0, 3)),))
    with StreamedModel(directory, host_cache_layers=2, prefetch=1) as streamed:
        resident, with_streaming = both_runs(model, streamed, prompts, 6, interventions=interventions)
    assert_same_run(resident, with_streaming)
    assert with_streaming.records[0].trace["attn_out"].shape == (2, 2, c.hidden_size)
    assert not np.allclose(np.stack([r.logits for r in resident.records]), plain_logits(model, prompts, 6), **TOL)


def test_streamed_fusion_graft_with_the_stability_policy(gemma):
    """The graft's carry (Kuramoto sums, PRSC's previous token) persists across streamed calls, and its
    metrics reach the policy: the stability readings equal the resident run's."""
    directory, model = gemma
    fusion = for_model(model.config, "minimal")
    variables = init_fusion(fusion, model.config, jax.random.key(3))
    interventions = Interventions(grafts=grafts(fusion, variables))
    prompts = random_prompts(21, [9, 4])
    with StreamedModel(directory, prefetch=2) as streamed:
        resident, with_streaming = both_runs(model, streamed, prompts, 6, interventions=interventions,
                                             policy=StabilityPolicy.of(Decoding()))
    assert_same_run(resident, with_streaming)
    assert {"entropy", "lyapunov"} <= set(with_streaming.records[-1].readings)
    assert not np.allclose(np.stack([r.logits for r in resident.records]), plain_logits(model, prompts, 6), **TOL)


@pytest.mark.parametrize("options", [dict(), dict(stream_experts=True, device_experts_per_layer=1)])
def test_streamed_spiking_gate_keeps_its_membranes(olmoe, options):
    directory, model = olmoe
    prompts = random_prompts(22, [8, 3])
    interventions = Interventions(router=spiking_gate(model.config))
    with StreamedModel(directory, prefetch=1, **options) as streamed:
        resident, with_streaming = both_runs(model, streamed, prompts, 5, interventions=interventions)
    assert_same_run(resident, with_streaming)
    assert not np.allclose(np.stack([r.logits for r in resident.records]), plain_logits(model, prompts, 5), **TOL)


def test_generate_stream_yields_what_generate_returns(gemma):
    directory, model = gemma
    prompts = random_prompts(23, [6, 2, 9])
    with StreamedModel(directory, prefetch=1) as streamed:
        whole = streamed.generate(prompts, 5, stop_ids=())
        steps = np.stack(list(streamed.generate_stream(prompts, 5, stop_ids=())), axis=1)
    np.testing.assert_array_equal(steps, whole.tokens)
    np.testing.assert_array_equal(whole.tokens, mtijax.generate(model.config, model.params, prompts, 5,
                                                                stop_ids=()).tokens)


def test_streamed_forward_takes_patches_transforms_captures_and_a_router(olmoe):
    directory, model = olmoe
    c = model.config
    tokens = jnp.asarray(random_prompts(24, [7, 7]))
    patch = {"attn_out": Patch(jnp.full((c.num_layers, 1, 1, c.hidden_size), 0.3), layer_mask(c.num_layers, [0]),
                               "add")}
    transforms = {0: jax.jit(lambda h, positions: 1.5 * h)}
    kwargs = dict(patches=patch, transforms=transforms, router=spiking_gate(c), capture=("router_experts",))
    want = mtijax.forward(c, model.params, tokens, **kwargs)
    with StreamedModel(directory, prefetch=1) as streamed:
        got = streamed.forward(tokens, **kwargs)
    np.testing.assert_allclose(np.asarray(got.logits), np.asarray(want.logits), **TOL)
    np.testing.assert_array_equal(np.asarray(got.captured["router_experts"]),
                                  np.asarray(want.captured["router_experts"]))
    np.testing.assert_allclose(np.asarray(got.router_state), np.asarray(want.router_state), **TOL)


# --- params from memory -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("on_device", [False, True])
def test_params_from_memory_stream_as_the_checkpoint_does(gemma, on_device):
    directory, model = gemma
    params = model.params if on_device else jax.tree.map(np.asarray, model.params)
    tokens = np.array(random_prompts(25, [10]))
    prompts = random_prompts(26, [7, 3])
    with StreamedModel(directory, prefetch=1) as from_disk, \
            StreamedModel(params, config=model.config, prefetch=1) as from_memory:
        np.testing.assert_allclose(np.asarray(from_memory.forward(tokens).logits),
                                   np.asarray(from_disk.forward(tokens).logits), rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(from_memory.generate(prompts, 5, stop_ids=()).tokens,
                                      from_disk.generate(prompts, 5, stop_ids=()).tokens)
        assert from_memory.stats().host_cache.misses == model.config.num_layers


def test_params_from_memory_must_be_the_documented_layout(gemma):
    _, model = gemma
    broken = {**model.params, "layers": {**model.params["layers"], "mlp": {}}}
    with pytest.raises(mtijax.MtijaxError, match="params have no leaf layers/mlp/down_proj"):
        StreamedModel(broken, config=model.config)
    with pytest.raises(mtijax.MtijaxError, match="needs their config"):
        StreamedModel(model.params)


# --- injection into host memory ------------------------------------------------------------------------------------

def test_streamed_injection_with_a_patch_equals_resident_injection_and_never_touches_the_disk(gemma):
    directory, model = gemma
    c = model.config
    teacher_config = dataclasses.replace(c, intermediate_size=96, num_kv_heads=4)
    teacher = random_params(teacher_config, 7)
    spec = mtijax.InjectionSpec(tensors=("attn/k_proj", "mlp/*"), layers=(1, 3))
    patch = {"resid_mid": Patch(jnp.full((c.num_layers, 1, 1, c.hidden_size), 0.2), layer_mask(c.num_layers, [2]),
                                "add")}
    prompts = random_prompts(27, [8, 5])
    injected = jax.jit(mtijax.inject, static_argnums=2)(model.params, teacher, spec, 0.5)  # eager: op by op, slow
    expected = mtijax.generate(c, injected, prompts, 6, stop_ids=(), interventions=Interventions(patches=patch))
    before = tree_checksums(directory)
    with StreamedModel(directory, host_cache_layers=0, prefetch=1) as streamed:
        assert streamed.inject(teacher, spec, 0.5) == [1, 3]
        np.testing.assert_allclose(streamed.layer_params(3)["mlp"]["up_proj"],
                                   np.asarray(injected["layers"]["mlp"]["up_proj"][3]), rtol=1e-6, atol=1e-7)
        streamed.reset_stats()
        got = streamed.generate(prompts, 6, stop_ids=(), interventions=Interventions(patches=patch))
        stats = streamed.stats()
    np.testing.assert_array_equal(got.tokens, expected.tokens)
    plain = mtijax.generate(c, model.params, prompts, 6, stop_ids=(), interventions=Interventions(patches=patch))
    assert not np.array_equal(plain.tokens, expected.tokens), "the injection should change the continuation"
    assert stats.pinned_layers == 2
    assert stats.bytes_read == stats.passes * (c.num_layers - 2) * streamed.layer_nbytes  # no cache: 2 layers per pass
    assert tree_checksums(directory) == before


def test_override_layer_checks_shapes(gemma):
    directory, model = gemma
    layer = jax.tree.map(lambda a: np.asarray(a[0]), model.params["layers"])
    layer["attn"]["q_proj"] = layer["attn"]["q_proj"][:, :8]
    with StreamedModel(directory) as streamed:
        with pytest.raises(mtijax.MtijaxError, match=r"leaf attn/q_proj has shape \[64, 8\], expected \[64, 64\]"):
            streamed.override_layer(0, layer)
        with pytest.raises(mtijax.MtijaxError, match="layer 4 is out of range"):
            streamed.override_layer(4, layer)


# --- the host cache on a cyclic scan -------------------------------------------------------------------------------

@pytest.mark.parametrize("policy, hits_per_later_pass", [("resident", 8), ("lru", 0)])
def test_host_cache_hits_on_a_scan_of_more_layers_than_it_holds(gemma, policy, hits_per_later_pass):
    """12 layers through an 8-layer cache: the resident subset hits 8 of 12 from the second pass on; LRU none."""
    _, model = gemma
    config = dataclasses.replace(model.config, num_layers=12, layer_types=model.config.layer_types[:1] * 12)
    params = random_params(config, 1, scale=0.02)
    tokens = np.array(random_prompts(28, [4]))
    with StreamedModel(params, config=config, host_cache_layers=8, host_cache_policy=policy, prefetch=1) as streamed:
        seen = []
        for _ in range(3):
            streamed.forward(tokens)
            cache = streamed.stats().host_cache
            seen.append((cache.hits, cache.misses))
    later = hits_per_later_pass
    assert seen == [(0, 12), (later, 24 - later), (2 * later, 36 - 2 * later)]
    assert f"host cache ({policy}) hit rate {100 * 2 * later / 36:.1f}%" in streamed.stats().lines()[2]


# --- the allocator's peak --------------------------------------------------------------------------------------------

def test_a_run_past_the_cap_by_the_allocator_peak_stops_with_one_line(gemma, monkeypatch):
    """The CPU backend reports no allocator peak (only the accounted check holds there), so a backend that
    reports one is stood in for."""
    directory, _ = gemma
    assert allocator_peak(jax.devices("cpu")[0]) is None
    cap = 10**9
    monkeypatch.setattr("mtijax.streaming.runner.allocator_peak", lambda device: 3 * cap)
    with StreamedModel(directory, prefetch=1, max_device_memory=cap) as streamed:
        with pytest.raises(mtijax.MtijaxError) as error:
            streamed.generate(random_prompts(29, [5]), 4)
        assert streamed.stats().passes == 1
    message = str(error.value)
    assert "\n" not in message and "peak 3.00 GB exceeded max device memory 1.00 GB (accounted " in message


# --- what streamed generation refuses -------------------------------------------------------------------------------

def test_layer_selection_refuses_grafts_and_traces_it_skips(gemma):
    directory, model = gemma
    fusion = for_model(model.config, "minimal")
    graft = Interventions(grafts=grafts(fusion, init_fusion(fusion, model.config, jax.random.key(0))))
    with StreamedModel(directory) as streamed:
        with pytest.raises(mtijax.MtijaxError, match="graft at layer 2, which the layer selection skips"):
            streamed.generate([[5, 6]], 2, interventions=graft, layers=[0, 1, 3])
        with pytest.raises(mtijax.MtijaxError, match="a trace needs every layer"):
            streamed.generate([[5, 6]], 2, interventions=Interventions(trace=(("resid_post", (0,)),)),
                              layers=[0, 1])


def test_mtijax_generate_takes_a_streamed_source_and_gives_the_resident_tokens(gemma):
    """``mtijax.generate`` runs the engine on a streamed param source as on resident params."""
    directory, model = gemma
    prompts = [[5, 9, 17, 33, 3], [4, 66]]
    resident = mtijax.generate(model.config, model.params, prompts, 6, stop_ids=())
    with StreamedModel(directory) as streamed:
        got = mtijax.generate(model.config, streamed, prompts, 6, stop_ids=())
    np.testing.assert_array_equal(got.tokens, resident.tokens)
