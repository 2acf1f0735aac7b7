"""OLMoE agrees with transformers' ``OlmoeForCausalLM`` (CPU, float32): logits, routing, greedy tokens, losses, GGUF.

The tiny checkpoints (``tests/olmoe_fixtures.py``) cover top-1, top-2 and
top-3 routing over 4, 6 and 8 experts, renormalised and raw top-k weights,
q/k/v clipping and grouped-query attention. Each is written by
``save_pretrained`` into several shards, with one safetensors tensor per
expert, as the published OLMoE checkpoints are. transformers runs each
checkpoint once per session (:func:`reference`); the tests compare against
that run.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
from pathlib import Path
from typing import Any

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

import mtijax
from mtijax.cli import main
from mtijax.config import config_from_gguf, read_hf_config
from mtijax.interventions import Sites
from mtijax.models import olmoe
from mtijax.weights.gguf_file import GGUFFile
from tests.conftest import random_prompts, write_checkpoint
from tests.olmoe_fixtures import EOS, OLMOE_CONFIGS, make_olmoe_model, read_checkpoint, roundtrip, write_olmoe_gguf
from tests.test_cli_errors import edit_config, rewrite_shard, user_error

ROUTING = ("router_logits", "router_experts", "router_weights")
NEW_TOKENS = 12


@dataclasses.dataclass
class Checkpoint:
    """A tiny OLMoE: the transformers model, its multi-shard directory, and mtijax's load of it."""

    hf: Any
    directory: Path
    model: mtijax.Model


@pytest.fixture(scope="session")
def build_olmoe(tmp_path_factory):
    """``build(variant)``: the :class:`Checkpoint` of one of ``OLMOE_CONFIGS``, made once per session."""
    built: dict[str, Checkpoint] = {}

    def build(variant: str) -> Checkpoint:
        if variant not in built:
            hf = make_olmoe_model(variant)
            directory = write_checkpoint(hf, tmp_path_factory.mktemp(f"olmoe-{variant}"))
            built[variant] = Checkpoint(hf, directory, mtijax.load(directory, progress=False))
        return built[variant]

    return build


@pytest.fixture(scope="session", params=sorted(OLMOE_CONFIGS))
def tiny_olmoe(request, build_olmoe) -> Checkpoint:
    return build_olmoe(request.param)


@dataclasses.dataclass
class Reference:
    """transformers' and mtijax's forward over the same two 13-token prompts."""

    tokens: np.ndarray
    hf_logits: np.ndarray       # [B, S, V]
    hf_router_logits: tuple      # L tensors [B * S, E], as transformers returns them
    out: mtijax.ForwardOutput    # mtijax, capturing the routing sites


@pytest.fixture(scope="session")
def reference(tiny_olmoe) -> Reference:
    tokens = np.array(random_prompts(1, [13, 13]))
    with torch.no_grad():
        hf_out = tiny_olmoe.hf(torch.tensor(tokens), output_router_logits=True)
    model = tiny_olmoe.model
    out = mtijax.forward(model.config, model.params, jnp.asarray(tokens), capture=ROUTING)
    return Reference(tokens, hf_out.logits.numpy(), hf_out.router_logits, out)


@pytest.fixture(scope="session")
def hf_greedy(tiny_olmoe) -> tuple[list[int], list[int]]:
    """A 9-token prompt and transformers' greedy continuation of it, never stopping early."""
    prompt = random_prompts(2, [9])[0]
    with torch.no_grad():
        tokens = tiny_olmoe.hf.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                        eos_token_id=None, pad_token_id=0)
    return prompt, tokens[0, len(prompt):].tolist()


def hf_routing(reference: Reference, config: mtijax.OlmoeConfig) -> tuple[np.ndarray, np.ndarray]:
    """What transformers' router chose, from its router logits: ``(experts, weights)``, each ``[L, B, S, k]``."""
    k = config.num_experts_per_tok
    probs = torch.softmax(torch.stack(reference.hf_router_logits), dim=-1)
    weights, experts = torch.topk(probs, k, dim=-1)
    if config.norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    shape = (config.num_layers, *reference.tokens.shape, k)
    return experts.numpy().reshape(shape), weights.numpy().reshape(shape)


# --- forward and routing ---------------------------------------------------------------------------------------

def test_checkpoints_are_multi_shard_with_one_tensor_per_expert(tiny_olmoe):
    index = json.loads((tiny_olmoe.directory / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    config = tiny_olmoe.model.config
    assert sum(".mlp.experts." in name for name in index["weight_map"]) == 3 * config.num_layers * config.num_experts


def test_logits_match_transformers(reference):
    np.testing.assert_allclose(np.asarray(reference.out.logits), reference.hf_logits, atol=1e-4, rtol=0)


def test_router_logits_match_transformers(tiny_olmoe, reference):
    config = tiny_olmoe.model.config
    expected = torch.stack(reference.hf_router_logits).numpy()
    got = np.asarray(reference.out.captured["router_logits"])
    assert got.shape == (config.num_layers, *reference.tokens.shape, config.num_experts)
    np.testing.assert_allclose(got.reshape(expected.shape), expected, atol=1e-4, rtol=0)


def test_chosen_experts_match_transformers(tiny_olmoe, reference):
    config = tiny_olmoe.model.config
    expected, _ = hf_routing(reference, config)
    got = np.asarray(reference.out.captured["router_experts"])
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, expected)  # [L, B, S, k], most probable first
    if config.num_experts_per_tok < config.num_experts:
        assert len(np.unique(got)) > config.num_experts_per_tok, "the tokens should not all pick the same experts"


def test_routing_weights_match_transformers(tiny_olmoe, reference):
    config = tiny_olmoe.model.config
    _, expected = hf_routing(reference, config)
    got = np.asarray(reference.out.captured["router_weights"])
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    sums = got.sum(-1)
    if config.norm_topk_prob:
        np.testing.assert_allclose(sums, 1.0, atol=1e-6)
    else:  # the raw top-k probabilities: less than 1 unless every expert is chosen
        assert (sums < 1 - 1e-3).all()


def test_clip_qkv_clips(build_olmoe):
    """Without its clipping the clipped model's logits change: clip_qkv=1 is small enough to matter."""
    hf = build_olmoe("e6_top3_norm_clip").hf
    tokens = torch.tensor(random_prompts(1, [13, 13]))
    with torch.no_grad():
        clipped = hf(tokens).logits
        hf.config.clip_qkv = None
        try:
            unclipped = hf(tokens).logits
        finally:
            hf.config.clip_qkv = 1.0
    assert (clipped - unclipped).abs().max() > 0.1


def test_greedy_tokens_match_transformers(tiny_olmoe, hf_greedy):
    prompt, expected = hf_greedy
    model = tiny_olmoe.model
    got = mtijax.generate(model.config, model.params, [prompt], NEW_TOKENS, stop_ids=()).tokens[0].tolist()
    assert got == expected
    assert len(set(expected)) > 2, "the reference continuation should not be degenerate"


def test_cli_greedy_tokens_match_transformers(tiny_olmoe, hf_greedy, capsys):
    prompt, expected = hf_greedy
    expected = expected[: expected.index(EOS)] if EOS in expected else expected
    status = main(["generate", "--model", str(tiny_olmoe.directory), "--token-ids", ",".join(map(str, prompt)),
                   "--max-new-tokens", str(NEW_TOKENS), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert status == 0
    assert out["prompt_ids"] == prompt
    assert out["ids"] == expected


# --- expert dispatch -------------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("config", "dispatch"))
def run_block(config, layer, spec, x, dispatch):
    """One layer over ``x`` with a forced dispatch: the layer output, the MoE output and the chosen experts."""
    sites = Sites(("mlp_out", "router_experts"), None)
    positions = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape[:2])
    out, _ = olmoe.block(config, layer, spec, x, positions, sites=sites, dispatch=dispatch)
    return out, sites.captured["mlp_out"], sites.captured["router_experts"]


def uses_ragged_dot(fn, *args) -> bool:
    """Whether ``fn(*args)`` traces to a grouped matmul (``lax.ragged_dot``)."""
    return "ragged_dot" in str(jax.make_jaxpr(fn)(*args))


@pytest.mark.parametrize("dispatch", ["grouped", "gathered", "in_place", "tiled"])
@pytest.mark.parametrize("batch", ["varied", "one_token_repeated"])
def test_every_dispatch_agrees_with_dense(tiny_olmoe, batch, dispatch):
    """Running every expert on every token, each expert on its own tokens, each token on its gathered experts and
    each token on its experts read in place and each expert's tiles of tokens as one grouped product (the Pallas
    kernels, interpreted on the CPU) give the same layer.

    Repeating one token makes every position route to the same k experts, so
    the other experts get no tokens at all (empty groups for ``ragged_dot``).
    """
    config, params = tiny_olmoe.model.config, tiny_olmoe.model.params
    last = config.num_layers - 1
    layer = jax.tree.map(lambda a: a[last], params["layers"])
    spec = jax.tree.map(lambda a: jnp.asarray(a[last]), olmoe.layer_spec(config))
    rng = np.random.default_rng(3)
    if batch == "varied":
        x = rng.normal(size=(3, 11, config.hidden_size))
    else:
        x = np.broadcast_to(rng.normal(size=(1, 1, config.hidden_size)), (1, 5, config.hidden_size))
    x = jnp.asarray(x, jnp.float32)
    dense, dense_moe, experts = run_block(config, layer, spec, x, "dense")
    other, other_moe, _ = run_block(config, layer, spec, x, dispatch)
    assert uses_ragged_dot(lambda x: run_block(config, layer, spec, x, dispatch), x) == (dispatch == "grouped")
    assert not uses_ragged_dot(lambda x: run_block(config, layer, spec, x, "dense"), x)
    used = np.unique(np.asarray(experts))
    if batch == "one_token_repeated":
        assert len(used) == config.num_experts_per_tok < config.num_experts
    assert float(jnp.abs(dense_moe).max()) > 0.1
    np.testing.assert_allclose(np.asarray(other_moe), np.asarray(dense_moe), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(other), np.asarray(dense), atol=1e-5, rtol=0)


def test_the_in_place_kernels_read_each_pairs_own_expert():
    """The kernels against NumPy on widths that take several tiles each way (256 input rows in tiles of 128, 128
    output columns in tiles of 64), bfloat16 weights, and pairs that share an expert."""
    from mtijax.models.olmoe import kernels

    rng = np.random.default_rng(5)
    experts, hidden, width = 6, 256, 128
    gate, up = (rng.normal(size=(experts, hidden, width)).astype(np.float32) for _ in range(2))
    down = rng.normal(size=(experts, width, hidden)).astype(np.float32)
    x = rng.normal(size=(4, hidden)).astype(np.float32)
    chosen = np.array([5, 0, 5, 2], np.int32)
    bf16 = [jnp.asarray(a, jnp.bfloat16) for a in (gate, up, down)]
    gate, up, down = (np.asarray(a, np.float32) for a in bf16)  # the reference reads the rounded weights
    h = kernels.gate_up(jnp.asarray(x), bf16[0], bf16[1], jnp.asarray(chosen), interpret=True)
    g, u = np.einsum("pd,pdf->pf", x, gate[chosen]), np.einsum("pd,pdf->pf", x, up[chosen])
    np.testing.assert_allclose(np.asarray(h), g / (1 + np.exp(-g)) * u, rtol=1e-4, atol=1e-3)
    out = kernels.down(h, bf16[2], jnp.asarray(chosen), interpret=True)
    np.testing.assert_allclose(np.asarray(out), np.einsum("pf,pfd->pd", np.asarray(h), down[chosen]), rtol=1e-4,
                               atol=1e-2)
    assert kernels.fits(2048, 1024) and not kernels.fits(2048, 1000)


def test_the_tiled_layout_gives_every_tile_one_experts_pairs():
    """130 pairs over 5 experts (one of them unused): each pair gets its own row, a tile's rows hold pairs of the
    tile's expert only, each expert's group starts on a tile boundary, and the tiles in use are those the groups
    fill (3 + 1 + 1 + 1 tiles of 64 rows here)."""
    from mtijax.models.olmoe import kernels

    experts = np.repeat([3, 0, 4, 1], [140, 10, 1, 5])[np.random.default_rng(2).permutation(156)][:130]
    row, tile_expert, used, rows = kernels.tile_layout(jnp.asarray(experts, jnp.int32), 5)
    row, tile_expert = np.asarray(row), np.asarray(tile_expert)
    assert len(set(row.tolist())) == 130 and rows % kernels.TILE_ROWS == 0 and row.max() < rows
    sizes = np.bincount(experts, minlength=5)
    assert int(used[0]) == sum(-(-n // kernels.TILE_ROWS) for n in sizes)
    np.testing.assert_array_equal(tile_expert[row // kernels.TILE_ROWS], experts)
    for e in np.flatnonzero(sizes):
        assert row[experts == e].min() % kernels.TILE_ROWS == 0


@pytest.mark.parametrize("dispatch", sorted(olmoe.DISPATCHES))
def test_forward_matches_transformers_with_every_dispatch(tiny_olmoe, reference, monkeypatch, dispatch):
    monkeypatch.setattr(olmoe.model, "choose_dispatch", lambda config, num_tokens: dispatch)  # the block reads it there
    config, params = tiny_olmoe.model.config, tiny_olmoe.model.params
    tokens = jnp.asarray(reference.tokens)
    assert uses_ragged_dot(lambda t: mtijax.forward(config, params, t).logits, tokens) == (dispatch == "grouped")
    logits = mtijax.forward(config, params, tokens).logits
    np.testing.assert_allclose(np.asarray(logits), reference.hf_logits, atol=1e-4, rtol=0)


# --- auxiliary losses ------------------------------------------------------------------------------------------

def padding_mask(tokens: np.ndarray) -> np.ndarray:
    """1 for real tokens, 0 for the first 5 of row 0 (as if it were left-padded)."""
    mask = np.ones(tokens.shape, np.int64)
    mask[0, :5] = 0
    return mask


@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "padding-mask"])
def test_load_balancing_loss_matches_transformers(tiny_olmoe, reference, masked):
    from transformers.models.olmoe.modeling_olmoe import load_balancing_loss_func

    config = tiny_olmoe.model.config
    mask = padding_mask(reference.tokens) if masked else None
    expected = load_balancing_loss_func(reference.hf_router_logits, config.num_experts, config.num_experts_per_tok,
                                        None if mask is None else torch.tensor(mask))
    router_logits = jnp.asarray(torch.stack(reference.hf_router_logits).numpy()).reshape(
        config.num_layers, *reference.tokens.shape, config.num_experts)
    experts = reference.out.captured["router_experts"]
    got = mtijax.load_balancing_loss(router_logits, experts, None if mask is None else jnp.asarray(mask))
    np.testing.assert_allclose(float(got), float(expected), rtol=1e-5)
    if masked:  # the mask matters: without it the loss is different
        assert abs(float(got) - float(mtijax.load_balancing_loss(router_logits, experts))) > 1e-4


@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "padding-mask"])
def test_router_z_loss_is_mean_squared_logsumexp(reference, masked):
    logits = np.asarray(reference.out.captured["router_logits"], np.float64)  # [L, B, S, E]
    mask = padding_mask(reference.tokens) if masked else np.ones(reference.tokens.shape, np.int64)
    rows = logits[:, mask.astype(bool)]  # [L, real tokens, E]
    peak = rows.max(-1, keepdims=True)
    logsumexp = (peak + np.log(np.exp(rows - peak).sum(-1, keepdims=True)))[..., 0]
    expected = np.mean(logsumexp**2)
    got = mtijax.router_z_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(mask) if masked else None)
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)


# --- GGUF files, and the config fields llama.cpp and transformers read -----------------------------------------

def same_config(from_gguf: mtijax.OlmoeConfig, expected: mtijax.OlmoeConfig) -> bool:
    """Equal configs, but for the RMSNorm epsilon, which GGUF stores as a float32."""
    return (dataclasses.replace(from_gguf, rms_norm_eps=expected.rms_norm_eps) == expected
            and from_gguf.rms_norm_eps == np.float32(expected.rms_norm_eps))


@pytest.fixture(scope="module")
def gguf_source(build_olmoe) -> Checkpoint:
    """The checkpoint the GGUF files are made from (multi-head attention: llama.cpp's OLMoE k_norm is hidden-wide)."""
    return build_olmoe("e4_top2")


@pytest.fixture(scope="module")
def f32_gguf(gguf_source, tmp_path_factory) -> Path:
    return write_olmoe_gguf(tmp_path_factory.mktemp("olmoe-gguf") / "f32.gguf", gguf_source.hf.config,
                            read_checkpoint(gguf_source.directory))


def test_f32_gguf_loads_the_same_model_as_the_checkpoint(gguf_source, f32_gguf):
    reader = gguf.GGUFReader(f32_gguf)
    layout = {t.name: tuple(int(d) for d in reversed(t.shape.tolist())) for t in reader.tensors}
    config = gguf_source.model.config
    e, f, d = config.num_experts, config.intermediate_size, config.hidden_size
    assert layout["blk.0.ffn_gate_exps.weight"] == layout["blk.0.ffn_up_exps.weight"] == (e, f, d)
    assert layout["blk.0.ffn_down_exps.weight"] == (e, d, f)

    model = mtijax.load(f32_gguf, tokenizer=False, progress=False)
    assert same_config(model.config, config)
    tokens = jnp.asarray(random_prompts(4, [10, 10]))
    expected = mtijax.forward(config, gguf_source.model.params, tokens).logits
    got = mtijax.forward(model.config, model.params, tokens).logits
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5, rtol=0)


def test_q_and_k_are_read_in_the_layout_llama_cpp_writes_for_olmoe(gguf_source, f32_gguf, tmp_path):
    """llama.cpp's converter stores OLMoE's q and k unpermuted: that file gives transformers' logits. The same
    weights with q and k in the LLaMA-style layout (which llama.cpp uses for LLaMA and OLMo) do not, so the
    check tells the two layouts apart."""
    tokens = random_prompts(4, [10, 10])
    with torch.no_grad():
        expected = gguf_source.hf(torch.tensor(tokens)).logits.numpy()
    permuted = write_olmoe_gguf(tmp_path / "permuted.gguf", gguf_source.hf.config,
                                read_checkpoint(gguf_source.directory), permute_qk=True)
    logits = {}
    for name, path in (("llama.cpp", f32_gguf), ("permuted", permuted)):
        model = mtijax.load(path, tokenizer=False, progress=False)
        logits[name] = np.asarray(mtijax.forward(model.config, model.params, jnp.asarray(tokens)).logits)
    np.testing.assert_allclose(logits["llama.cpp"], expected, atol=1e-4, rtol=0)
    assert np.abs(logits["permuted"] - expected).max() > 1e-2


def test_q8_0_gguf_matches_transformers_on_the_dequantised_weights(gguf_source, tmp_path):
    """Q8_0 changes the weights; with the same dequantised weights transformers gives the same logits."""
    from transformers import OlmoeForCausalLM

    qtype = gguf.GGMLQuantizationType.Q8_0
    tensors = read_checkpoint(gguf_source.directory)
    path = write_olmoe_gguf(tmp_path / "q8_0.gguf", gguf_source.hf.config, tensors, qtype)
    assert {t.tensor_type for t in gguf.GGUFReader(path).tensors} == {gguf.GGMLQuantizationType.F32, qtype}

    dequantised = tmp_path / "dequantised"
    dequantised.mkdir()
    shutil.copy(gguf_source.directory / "config.json", dequantised)
    save_file({name: roundtrip(v, qtype) if v.ndim >= 2 else v for name, v in tensors.items()},
              dequantised / "model.safetensors", metadata={"format": "pt"})
    hf = OlmoeForCausalLM.from_pretrained(dequantised, dtype=torch.float32).eval()

    model = mtijax.load(path, tokenizer=False, progress=False)
    tokens = random_prompts(4, [10, 10])
    with torch.no_grad():
        expected = hf(torch.tensor(tokens)).logits.numpy()
        original = gguf_source.hf(torch.tensor(tokens)).logits.numpy()
    got = np.asarray(mtijax.forward(model.config, model.params, jnp.asarray(tokens)).logits)
    assert np.abs(expected - original).max() > 1e-3, "quantization should change the logits"
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_gguf_without_expert_feed_forward_length_uses_feed_forward_length(gguf_source, f32_gguf):
    """llama.cpp's converter writes no ``olmoe.expert_feed_forward_length`` for OLMoE (transformers' config has no
    ``moe_intermediate_size``); llama.cpp sizes the experts by ``olmoe.feed_forward_length``."""
    source = GGUFFile(f32_gguf)
    metadata = {k: v for k, v in source.metadata.items() if k != "olmoe.expert_feed_forward_length"}
    config = config_from_gguf(metadata, gguf_source.model.config.vocab_size, str(f32_gguf))
    assert same_config(config, gguf_source.model.config)


def test_num_local_experts_is_read_as_transformers_reads_it(gguf_source, tmp_path):
    """transformers' OlmoeConfig takes ``num_local_experts`` as another name for ``num_experts``."""
    from transformers import OlmoeConfig

    directory = Path(shutil.copytree(gguf_source.directory, tmp_path / "renamed"))
    raw = json.loads((directory / "config.json").read_text())
    raw["num_local_experts"] = raw.pop("num_experts")
    (directory / "config.json").write_text(json.dumps(raw))
    assert read_hf_config(directory).num_experts == OlmoeConfig.from_pretrained(directory).num_experts == 4


# --- errors through the CLI, and the preset --------------------------------------------------------------------

@pytest.fixture
def checkpoint(gguf_source, tmp_path) -> Path:
    """A private copy of the 4-expert checkpoint, free to damage."""
    return Path(shutil.copytree(gguf_source.directory, tmp_path / "olmoe"))


def generate_args(model: Path) -> list[str]:
    return ["generate", "--model", str(model), "--token-ids", "5,6,7", "--max-new-tokens", "2"]


def test_expert_missing_from_its_shard_is_named(capsys, checkpoint):
    name = "model.layers.0.mlp.experts.1.up_proj.weight"
    shard = rewrite_shard(checkpoint, name, lambda tensors: tensors.pop(name))
    line = user_error(capsys, generate_args(checkpoint), checkpoint)
    assert repr(name) in line and str(shard) in line and "missing" in line


def test_router_of_the_wrong_width_is_named(capsys, checkpoint):
    """A router with a row for a fifth expert that config.json does not have."""
    name = "model.layers.0.mlp.gate.weight"
    shard = rewrite_shard(checkpoint, name, lambda tensors: tensors.update(
        {name: np.concatenate([tensors[name], tensors[name][:1]])}))
    line = user_error(capsys, generate_args(checkpoint), checkpoint)
    assert "shape mismatch" in line and repr(name) in line and str(shard) in line
    assert "[5, 64]" in line and "[4, 64]" in line


def test_top_k_above_the_expert_count_is_named(capsys, checkpoint):
    config = edit_config(checkpoint, num_experts_per_tok=5)
    line = user_error(capsys, generate_args(checkpoint), checkpoint)
    assert str(config) in line and "top-k 5 is larger than the 4 experts" in line


def test_info_on_the_preset_counts_transformers_parameters(capsys):
    """OLMoE-1B-7B's published shapes, built by transformers on the meta device (no memory), give the same count."""
    from transformers import OlmoeConfig, OlmoeForCausalLM

    hf_config = OlmoeConfig(vocab_size=50_304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
                            num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8)
    with torch.device("meta"):
        hf = OlmoeForCausalLM(hf_config)
    total = sum(p.numel() for p in hf.parameters())
    experts = hf.model.layers[0].mlp.experts
    per_expert = (experts.gate_up_proj.numel() + experts.down_proj.numel()) // hf_config.num_experts
    active = total - hf_config.num_hidden_layers * (hf_config.num_experts - hf_config.num_experts_per_tok) * per_expert

    assert main(["info", "--model", "olmoe-1b-7b"]) == 0
    assert "6.92B" in capsys.readouterr().out
    assert main(["info", "--model", "olmoe-1b-7b", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["parameters"], summary["active_parameters"]) == (total, active)
    assert summary["experts"] == "8 of 64 per token"
