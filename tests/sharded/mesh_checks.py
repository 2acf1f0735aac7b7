"""Sharded runs equal unsharded ones, on 8 CPU devices (``--xla_force_host_platform_device_count=8``).

Not collected by the suite (the file name does not start with ``test_``): ``tests/test_sharding.py`` runs it
in one subprocess with 8 host devices, so the rest of the suite keeps one. Each check compares a run on a mesh
with the same run on one device (float32; the unsharded runs are the ones the parity tests check against
transformers). Models are random, in tiny shapes with 8 query heads, so that tp = 2, 4 split the heads and
tp = 8 meets the documented fallback of 4 kv heads replicated.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import mtijax
from mtijax.config import Gemma3Config, OlmoeConfig
from mtijax.errors import MtijaxError
from mtijax.sharding.generation import start_run
from mtijax.engine.sampling import Plain, Sampling

SLIDING, FULL = "sliding_attention", "full_attention"
GEMMA = Gemma3Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=8, num_kv_heads=4,
                     head_dim=8, query_pre_attn_scalar=8, sliding_window=4, layer_types=(SLIDING, FULL))
OLMOE = OlmoeConfig(vocab_size=128, hidden_size=32, intermediate_size=16, num_layers=2, num_heads=4, num_kv_heads=2,
                    num_experts=8, num_experts_per_tok=2)
TOKENS = jnp.asarray(np.random.default_rng(0).integers(3, 128, (4, 7)), jnp.int32)


def random_params(config, seed: int = 0):
    """Random params with a spread that makes every weight matter (a small embedding, as the parity fixtures),
    drawn with numpy (no compile)."""
    rng = np.random.default_rng(seed)
    shapes = mtijax.family(config).param_shapes(config)
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.4, s), jnp.float32), shapes,
                          is_leaf=lambda x: isinstance(x, tuple))
    return {**params, "embed": params["embed"] * 0.05}


@pytest.fixture(scope="module")
def gemma():
    return random_params(GEMMA)


@pytest.fixture(scope="module")
def olmoe():
    return random_params(OLMOE, 1)


def mesh(shape, names=("data", "model")):
    return jax.make_mesh(shape, names)


def spec(array: jax.Array) -> tuple:
    """The mesh axis of each dim of ``array`` (None where it is replicated)."""
    given = tuple(array.sharding.spec)
    return given + (None,) * (array.ndim - len(given))


logits_of = jax.jit(lambda config, params, tokens: mtijax.forward(config, params, tokens).logits, static_argnums=0)


@pytest.mark.parametrize("shape", [(1, 2), (2, 4), (1, 8)])
def test_gemma_forward_on_a_data_model_mesh_equals_one_device(gemma, shape):
    m = mesh(shape)
    params = mtijax.shard(GEMMA, gemma, m)
    attn, mlp = params["layers"]["attn"], params["layers"]["mlp"]
    assert attn["q_proj"].sharding.spec == P(None, None, "model")
    assert attn["o_proj"].sharding.spec == P(None, "model", None)
    assert mlp["down_proj"].sharding.spec == P(None, "model", None)
    assert params["embed"].sharding.spec == P(None, None)
    # 4 kv heads split 2 and 4 ways; over 8 devices they are replicated, as the rules document
    assert attn["k_proj"].sharding.spec == (P(None, None, None) if shape[1] == 8 else P(None, None, "model"))
    assert attn["q_proj"].addressable_shards[0].data.shape == (2, 32, 64 // shape[1])
    got = logits_of(GEMMA, params, mtijax.sharding.shard_batch(TOKENS, m))
    assert spec(got)[0] == ("data" if shape[0] > 1 else None)
    np.testing.assert_allclose(np.asarray(got), np.asarray(logits_of(GEMMA, gemma, TOKENS)), atol=2e-5, rtol=0)


@pytest.mark.parametrize("shape", [(2, 1), (4, 2)])
def test_olmoe_forward_on_an_expert_model_mesh_equals_one_device(olmoe, shape):
    params = mtijax.shard(OLMOE, olmoe, mesh(shape, ("expert", "model")))
    moe = params["layers"]["moe"]
    model = "model" if shape[1] > 1 else None
    assert moe["gate_proj"].sharding.spec == P(None, "expert", None, model)
    assert moe["down_proj"].sharding.spec == P(None, "expert", model, None)
    assert moe["router"].sharding.spec == P(None, None, "expert")
    assert moe["up_proj"].addressable_shards[0].data.shape == (2, 8 // shape[0], 32, 16 // shape[1])
    np.testing.assert_allclose(np.asarray(logits_of(OLMOE, params, TOKENS)),
                               np.asarray(logits_of(OLMOE, olmoe, TOKENS)), atol=2e-5, rtol=0)


def test_a_dim_the_mesh_does_not_divide_names_the_leaf(olmoe):
    with pytest.raises(MtijaxError, match=r"layers/moe/down_proj: dim 1 \('experts', size 8\) does not divide"):
        mtijax.shard(OLMOE, olmoe, jax.make_mesh((3,), ("expert",), devices=jax.devices()[:3]))
    with pytest.raises(MtijaxError, match="subset of data, expert, model"):
        mtijax.shard(OLMOE, olmoe, mesh((2, 4), ("data", "tensor")))
    with pytest.raises(MtijaxError, match="unknown logical axis 'hidden'"):
        mtijax.shard(OLMOE, olmoe, mesh((2, 4)), rules={"hidden": "model"})
    with pytest.raises(MtijaxError, match="dims 'experts' and 'mlp' both map to mesh axis 'model'"):
        mtijax.shard(OLMOE, olmoe, mesh((2, 4)), rules={"experts": "model"})


PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]


def test_greedy_generation_with_a_sharded_cache_equals_one_device(gemma):
    m = mesh((2, 4))
    params = mtijax.shard(GEMMA, gemma, m)
    want = mtijax.generate(GEMMA, gemma, PROMPTS, 8, stop_ids=())
    got = mtijax.generate(GEMMA, params, PROMPTS, 8, stop_ids=())
    assert len({tuple(row) for row in want.tokens.tolist()}) == 3 and len(set(want.tokens[0].tolist())) > 1
    np.testing.assert_array_equal(got.tokens, want.tokens)
    _, steps = start_run(GEMMA, params, PROMPTS, 2, policy=Plain(Sampling()), stop_ids=())
    state, _ = next(steps)
    assert spec(state.cache.k) == (None, "data", None, "model", None)
    assert spec(state.cache.positions) == ("data", None)


def test_a_fusion_train_step_on_a_data_parallel_batch_equals_one_device(gemma):
    from mtijax.fusion import FusionConfig, TrainConfig, init_fusion, init_train_state, train_step

    fusion = FusionConfig(positions=(1,), components=(), mode="residual", alpha=0.5)  # the linear adapter
    train = TrainConfig(steps=2, batch_size=4, seq_len=7, warmup_steps=0)
    state = init_train_state(init_fusion(fusion, GEMMA, jax.random.key(2)), train)
    want, want_logs = train_step(GEMMA, fusion, train, state, gemma, TOKENS)
    m = mesh((2, 4))
    got, got_logs = train_step(GEMMA, fusion, train, mtijax.sharding.replicate(state, m), mtijax.shard(GEMMA, gemma, m),
                               mtijax.sharding.shard_batch(TOKENS, m))
    assert all(len(a.sharding.device_set) == 8 and a.sharding.is_fully_replicated for a in jax.tree.leaves(got.params))
    np.testing.assert_allclose(float(got_logs["loss"]), float(want_logs["loss"]), rtol=1e-5)
    np.testing.assert_allclose(float(got_logs["grad_norm"]), float(want_logs["grad_norm"]), rtol=1e-4)
    for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(want.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5)
    assert any(not np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(jax.tree.leaves(want.params), jax.tree.leaves(state.params))), "the step moved nothing"


def test_an_injection_alpha_sweep_spread_over_data_equals_one_device(gemma):
    from mtijax.injection import InjectionSpec
    from mtijax.injection.study import _sweep_logits
    from mtijax.sharding.sweeps import injection_logits

    teacher = random_params(GEMMA, 3)
    injection = InjectionSpec(tensors=("attn/q_proj", "mlp/*"), layers=(0, 1))
    alphas = jnp.asarray([0.0, 0.25, 0.5, 1.0])
    positions = jnp.broadcast_to(jnp.arange(7, dtype=jnp.int32), TOKENS.shape)
    want, _ = _sweep_logits(GEMMA, injection, gemma, teacher, alphas, TOKENS, positions)
    m = mesh((4, 2))
    got = injection_logits(GEMMA, injection, mtijax.shard(GEMMA, gemma, m), mtijax.shard(GEMMA, teacher, m), alphas, TOKENS,
                           mesh=m)
    assert spec(got)[0] == "data" and got.addressable_shards[0].data.shape[0] == 1
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=0)
    assert np.abs(np.asarray(want[3] - want[0])).max() > 1e-2


def test_a_patch_mask_sweep_spread_over_data_equals_one_device(gemma):
    from mtijax.patching import patch_spec, sweep
    from mtijax.sharding.sweeps import patch_sweep

    source = mtijax.capture(GEMMA, gemma, TOKENS[::-1], sites=("resid_post",))
    masks = jnp.asarray([[1, 0], [0, 1], [1, 1], [0, 0]], jnp.float32)
    specs = [patch_spec(GEMMA, "resid_post", [0], source, positions=(2, 5)).replace(layers=masks)]
    want = sweep(GEMMA, gemma, TOKENS, specs)
    m = mesh((4, 2))
    got = patch_sweep(GEMMA, mtijax.shard(GEMMA, gemma, m), TOKENS, specs, mesh=m)
    assert spec(got)[0] == "data"
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=0)
    assert np.abs(np.asarray(want[1] - want[0])).max() > 1e-3


@pytest.fixture(scope="module")
def olmoe_files(tmp_path_factory):
    """A tiny OLMoE (8 experts, 4 heads, 2 kv heads) as a multi-shard Hugging Face directory and a Q8_0 GGUF."""
    import gguf

    from tests.conftest import write_checkpoint
    from tests.olmoe_fixtures import make_olmoe_model, read_checkpoint, write_olmoe_gguf

    hf = make_olmoe_model("e8_top1_gqa")
    directory = write_checkpoint(hf, tmp_path_factory.mktemp("olmoe"))
    q8 = write_olmoe_gguf(tmp_path_factory.mktemp("gguf") / "q8_0.gguf", hf.config, read_checkpoint(directory),
                          gguf.GGMLQuantizationType.Q8_0)
    return {"hf": directory, "gguf": q8}


@pytest.mark.parametrize("fmt", ["hf", "gguf"])
def test_a_sharded_load_reads_only_each_devices_block(olmoe_files, fmt, monkeypatch):
    """Every stored tensor is read in blocks, once per distinct block (devices holding the same block share
    it), each block 1/n of the tensor where n is how many ways its leaf is split; the values are the unsharded
    load's (Q8_0 included, whose expert down projections are split inside a 32-value quant block)."""
    from mtijax.sharding import load as sharded_load

    reads = []
    read_block = sharded_load.read_block

    def recording(source, slot, ranges):
        value = read_block(source, slot, ranges)
        reads.append((slot, value.size))
        return value

    monkeypatch.setattr(sharded_load, "read_block", recording)
    m = mesh((2, 2), ("expert", "model"))
    got = mtijax.load(olmoe_files[fmt], mesh=m, tokenizer=False, progress=False)
    monkeypatch.undo()
    want = mtijax.load(olmoe_files[fmt], tokenizer=False, progress=False)
    config = want.config
    specs = mtijax.sharding.param_specs(config, m)
    for a, b, s in zip(jax.tree.leaves(got.params), jax.tree.leaves(want.params),
                       jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))):
        assert a.sharding.spec == s
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    shapes = mtijax.family(config).param_shapes(config)
    sizes = dict(zip(m.axis_names, m.devices.shape))
    counts: dict[str, int] = {}
    for slot, size in reads:
        leaf_spec, leaf_shape = specs, shapes
        for key in slot.path:
            leaf_spec, leaf_shape = leaf_spec[key], leaf_shape[key]
        ways = int(np.prod([sizes[a] for a in tuple(leaf_spec)[len(slot.index):] if a is not None]))
        assert size * ways == np.prod(leaf_shape[len(slot.index):]), slot.name
        counts[slot.name] = counts.get(slot.name, 0) + 1
        assert counts[slot.name] <= ways, f"{slot.name} was read more often than it has blocks"
    expert = "layers.0.mlp.experts.5.down_proj.weight" if fmt == "hf" else "blk.0.ffn_down_exps.weight"
    assert counts[expert] == (2 if fmt == "hf" else 4)
