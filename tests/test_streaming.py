"""Layer streaming against the resident model, on tiny multi-shard Gemma 3 and OLMoE checkpoints.

The resident forward (``mtijax.forward``/``mtijax.generate`` on parameters
loaded whole) is itself checked against ``transformers`` elsewhere; here the
streamed model must give its logits (to float rounding: the layers run as
separate compiled steps instead of one scan) and exactly its greedy tokens,
for every host-cache size and prefetch depth, from safetensors shards and from
GGUF files. Counters are checked against what the access pattern implies,
device-memory caps are refused before any weight is read, a shard truncated
while in use is reported without partial output, expert streaming moves
exactly the experts the resident model's router chose, and skipped layers are
checked against a smaller model built without them.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import mtijax
from mtijax.cli import main
from mtijax.config import read_hf_config
from mtijax.generate import pad_prompts
from mtijax.streaming import LayerStore, StreamedModel, selection_study, write_random_checkpoint
from mtijax.streaming.runner import StreamedModel as RunnerStreamedModel
from tests.conftest import random_prompts, tree_checksums
from tests.olmoe_fixtures import make_olmoe_model, read_checkpoint, write_olmoe_gguf
from tests.test_cli_errors import write_gguf

TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def gemma(tiny_gqa):
    """``(hf_model, checkpoint_dir, resident mtijax.Model)`` of the grouped-query tiny Gemma 3 (4 layers)."""
    hf, directory = tiny_gqa
    return hf, directory, mtijax.load(directory, tokenizer=False, progress=False)


@pytest.fixture(scope="module")
def olmoe(tmp_path_factory):
    """``(checkpoint_dir, gguf_file, resident Model)``: 2 layers, top-3 of 6 experts, one tensor per expert."""
    hf = make_olmoe_model("e6_top3_norm_clip")
    directory = tmp_path_factory.mktemp("olmoe")
    hf.save_pretrained(directory, max_shard_size="64KB")
    assert len(list(directory.glob("*.safetensors"))) > 1
    gguf_path = write_olmoe_gguf(tmp_path_factory.mktemp("olmoe-gguf") / "tiny.gguf", hf.config,
                                 read_checkpoint(directory))
    return directory, gguf_path, mtijax.load(directory, tokenizer=False, progress=False)


def resident_logits(model, tokens, **kwargs):
    return np.asarray(mtijax.forward(model.config, model.params, jnp.asarray(tokens), **kwargs).logits)


# --- the store ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_store_reads_each_layer_as_the_loader_does(gemma, dtype):
    _, directory, _ = gemma
    loaded = mtijax.load(directory, dtype, tokenizer=False, progress=False)
    store = LayerStore(directory, dtype)
    for layer in range(store.num_layers):
        stored = store.read_layer(layer)
        for leaf in store.leaves:
            value = stored
            expected = loaded.params["layers"]
            for key in leaf.path:
                value, expected = value[key], expected[key]
            expected = np.asarray(expected[layer])
            assert value.dtype == expected.dtype
            np.testing.assert_array_equal(value.swapaxes(-1, -2) if leaf.transpose else value, expected)
    assert store.layer_nbytes == sum(v.nbytes for v in jax.tree.leaves(store.read_layer(0)))


def test_store_maps_layers_across_shards(gemma):
    """Layer -> shard files, from the store, against the index file read independently."""
    _, directory, _ = gemma
    weight_map = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    store = LayerStore(directory)
    spans = []
    for layer in range(store.num_layers):
        files = {str(directory / f) for name, f in weight_map.items() if name.startswith(f"model.layers.{layer}.")}
        assert store.layer_files(layer) == sorted(files)
        spans.append(len(files))
    assert max(spans) > 1, "the fixture should have a layer split across shards"


# --- parity: Gemma 3 -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("host_cache_layers, prefetch", [(1, 0), (2, 1), (None, 3), (0, 2)])
def test_streamed_gemma_equals_resident(gemma, host_cache_layers, prefetch):
    _, directory, resident = gemma
    tokens = np.array(random_prompts(0, [9, 9]))
    prompts = random_prompts(1, [13, 4])
    with StreamedModel(directory, host_cache_layers=host_cache_layers, prefetch=prefetch) as model:
        np.testing.assert_allclose(np.asarray(model.forward(tokens).logits), resident_logits(resident, tokens), **TOL)
        streamed = model.generate(prompts, 8, stop_ids=())
        stats = model.stats()
        compiled = model.compiled_steps()
    expected = mtijax.generate(resident.config, resident.params, prompts, 8, stop_ids=())
    np.testing.assert_array_equal(streamed.tokens, expected.tokens)
    layers = resident.config.num_layers
    passes = 1 + 1 + 8  # the forward, one prefill chunk (12 prompt tokens) and 8 decode calls each use every layer
    assert stats.passes == passes
    cache = stats.host_cache
    assert cache.hits + cache.misses == layers * passes
    held = layers if host_cache_layers is None else min(host_cache_layers, layers)
    # the resident subset: the first layers that fit stay and hit on every later pass; nothing is evicted
    assert (cache.hits, cache.evictions, cache.items) == (held * (passes - 1), 0, held)
    assert stats.bytes_read == cache.misses * model.layer_nbytes
    assert stats.max_live_layers == prefetch + 1
    assert compiled == 3, "one step per shape (forward, prefill, decode), not one per layer"


def test_streamed_logits_match_transformers(gemma):
    hf, directory, _ = gemma
    tokens = np.array(random_prompts(2, [12]))
    with torch.no_grad():
        expected = hf(torch.tensor(tokens)).logits.numpy()
    with StreamedModel(directory, prefetch=1) as model:
        np.testing.assert_allclose(np.asarray(model.forward(tokens).logits), expected, rtol=1e-4, atol=1e-4)


def test_pinned_host_staging_path_gives_the_same_logits(gemma):
    """The CPU backend offers pinned_host memory too; forcing it runs the accelerator's path here."""
    _, directory, resident = gemma
    tokens = np.array(random_prompts(3, [7]))
    with StreamedModel(directory, host_memory="pinned_host", host_cache_layers=2, prefetch=2) as model:
        np.testing.assert_allclose(np.asarray(model.forward(tokens).logits), resident_logits(resident, tokens), **TOL)
        assert model.stats().host_memory.startswith("pinned_host")


def test_device_held_cache_and_changing_prefetch_keep_logits_and_cache(gemma):
    """``host_memory="device"`` (the benchmark's compute-only baseline) and ``set_prefetch`` on a warm cache."""
    _, directory, resident = gemma
    tokens = np.array(random_prompts(15, [5]))
    expected = resident_logits(resident, tokens)
    with StreamedModel(directory, host_memory="device", host_cache_layers=None, prefetch=0) as model:
        for depth in (0, 2):
            model.set_prefetch(depth)
            np.testing.assert_allclose(np.asarray(model.forward(tokens).logits), expected, **TOL)
        cache = model.stats().host_cache
    assert (cache.misses, cache.hits) == (resident.config.num_layers, resident.config.num_layers)


def test_streamed_gemma_from_gguf_equals_resident(gemma, tmp_path):
    hf, _, _ = gemma
    path = write_gguf(tmp_path / "tiny.gguf", hf)
    resident = mtijax.load(path, tokenizer=False, progress=False)
    tokens = np.array(random_prompts(4, [10]))
    with StreamedModel(path, host_cache_layers=1, prefetch=1) as model:
        np.testing.assert_allclose(np.asarray(model.forward(tokens).logits), resident_logits(resident, tokens), **TOL)


# --- parity: OLMoE, whole layers and expert streaming --------------------------------------------------------------

@pytest.mark.parametrize("options, generate", [(dict(), True),
                                               (dict(stream_experts=True, device_experts_per_layer=0), False),
                                               (dict(stream_experts=True, host_cache_layers=1, prefetch=0), True)])
def test_streamed_olmoe_equals_resident(olmoe, options, generate):
    directory, _, resident = olmoe
    tokens = np.array(random_prompts(5, [6, 6]))
    prompts = random_prompts(6, [9, 3])
    with StreamedModel(directory, **{"prefetch": 1, **options}) as model:
        np.testing.assert_allclose(np.asarray(model.forward(tokens).logits), resident_logits(resident, tokens), **TOL)
        if generate:
            streamed = model.generate(prompts, 6, stop_ids=())
            expected = mtijax.generate(resident.config, resident.params, prompts, 6, stop_ids=())
            np.testing.assert_array_equal(streamed.tokens, expected.tokens)


def test_expert_streaming_moves_exactly_the_routed_experts(olmoe):
    """Counted against the resident router's choices; padding tokens (position -1) are not real tokens."""
    directory, _, resident = olmoe
    prompts = random_prompts(7, [1])  # one real token (3 of 6 experts per layer) after 15 padding tokens
    tokens, positions, _ = pad_prompts(prompts, resident.config.pad_token_id)
    captured = mtijax.forward(resident.config, resident.params, jnp.asarray(tokens), jnp.asarray(positions),
                              capture=("router_experts",)).captured["router_experts"]
    real = positions >= 0
    routed = [np.unique(np.asarray(captured[layer])[real]) for layer in range(resident.config.num_layers)]
    assert all(len(r) < resident.config.num_experts for r in routed), "pick prompts that leave experts unused"
    with StreamedModel(directory, stream_experts=True, device_experts_per_layer=0, prefetch=1) as model:
        logits = model.forward(tokens, positions).logits
        stats = model.stats()
    np.testing.assert_allclose(np.asarray(logits)[real], resident_logits(resident, tokens, positions=jnp.asarray(
        positions))[real], **TOL)
    assert stats.experts_moved == sum(len(r) for r in routed)
    assert stats.expert_bytes_to_device == stats.experts_moved * LayerStore(directory).expert_nbytes
    whole_layers = resident.config.num_layers * LayerStore(directory).layer_nbytes
    assert stats.total_bytes_to_device < whole_layers


def test_device_expert_cache_serves_repeated_experts(olmoe):
    directory, _, _ = olmoe
    tokens = np.array(random_prompts(8, [5]))
    with StreamedModel(directory, stream_experts=True, device_experts_per_layer=6, prefetch=1) as model:
        model.forward(tokens)
        first = model.stats().experts_moved
        model.forward(tokens)
        stats = model.stats()
    assert stats.experts_moved == first and stats.expert_device_hits == first


def test_expert_streaming_from_gguf_stacked_experts(olmoe):
    """Each expert's rows dequantised out of the layer's stacked tensor (the GGUF file records no qkv clipping,
    so the reference is the same file loaded whole)."""
    _, gguf_path, _ = olmoe
    resident = mtijax.load(gguf_path, tokenizer=False, progress=False)
    tokens = np.array(random_prompts(9, [8]))
    with StreamedModel(gguf_path, stream_experts=True, prefetch=2) as model:
        np.testing.assert_allclose(np.asarray(model.forward(tokens).logits), resident_logits(resident, tokens), **TOL)


def test_expert_streaming_needs_experts(gemma):
    with pytest.raises(mtijax.MtijaxError, match="expert streaming needs a mixture-of-experts model"):
        StreamedModel(gemma[1], stream_experts=True)


# --- layer selection -------------------------------------------------------------------------------------------

def test_skipped_layers_are_identity(gemma):
    """Against a smaller resident model built from the kept layers only."""
    _, directory, resident = gemma
    keep = [0, 2, 3]
    config = dataclasses.replace(resident.config, num_layers=len(keep),
                                 layer_types=tuple(resident.config.layer_types[i] for i in keep))
    params = {**resident.params, "layers": jax.tree.map(lambda a: a[np.array(keep)], resident.params["layers"])}
    tokens = np.array(random_prompts(10, [10]))
    expected = np.asarray(mtijax.forward(config, params, jnp.asarray(tokens)).logits)
    with StreamedModel(directory, prefetch=1) as model:
        np.testing.assert_allclose(np.asarray(model.forward(tokens, layers=keep).logits), expected, **TOL)
        stats = model.stats()
        assert stats.bytes_to_device == len(keep) * model.layer_nbytes
        assert (stats.layers_run, stats.layers_skipped) == (3, 1)


def test_selection_study_prices_each_selection(gemma):
    _, directory, resident = gemma
    text = random_prompts(11, [20])[0]
    with StreamedModel(directory, host_cache_layers=None, prefetch=1) as model:
        rows = selection_study(model, text, {"skip layer 1": [0, 2, 3], "first two": [0, 1]})
    assert [r.name for r in rows] == ["all layers", "skip layer 1", "first two"]
    logits = resident_logits(resident, np.array([text[:-1]]))[0].astype(np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - \
        logits.max(-1, keepdims=True)
    nll = -np.mean(logp[np.arange(len(text) - 1), text[1:]])
    assert rows[0].nll == pytest.approx(nll, rel=1e-5)
    assert rows[0].nll_increase == 0 and rows[0].bytes_saved == 0
    assert [r.bytes_saved for r in rows[1:]] == [0.25, 0.5]
    assert rows[1].perplexity == pytest.approx(np.exp(rows[1].nll))


# --- device memory -------------------------------------------------------------------------------------------------

def test_cap_below_one_layer_is_refused_before_any_read(gemma, monkeypatch):
    _, directory, _ = gemma
    layer = LayerStore(directory).layer_nbytes

    def no_reads(*args, **kwargs):
        raise AssertionError("a layer was read")

    monkeypatch.setattr(LayerStore, "read_layer", no_reads)
    with pytest.raises(mtijax.MtijaxError, match="less than one layer"):
        StreamedModel(directory, max_device_memory=layer - 1)


def test_cap_too_small_for_the_prefetch_depth_names_one_that_fits(gemma):
    _, directory, _ = gemma
    store = LayerStore(directory)
    prompts = random_prompts(12, [5])
    with StreamedModel(store, prefetch=1, max_device_memory=None) as probe:
        probe.generate(prompts, 2)
        need_two = probe.stats().accounted_peak_bytes          # resident + 2 layers + cache + work
    cap = need_two - 1
    with StreamedModel(store, prefetch=3, max_device_memory=cap) as model:
        with pytest.raises(mtijax.MtijaxError, match=r"--prefetch 0 would fit"):
            model.generate(prompts, 2)
        stats = model.stats()
        assert (stats.passes, stats.bytes_read, stats.bytes_to_device) == (0, 0, 0)
    with StreamedModel(store, prefetch=0, max_device_memory=cap) as model:
        model.generate(prompts, 2)
        assert model.stats().accounted_peak_bytes <= cap


# --- a shard truncated while in use -------------------------------------------------------------------------------

def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_shard_truncated_mid_run_is_a_clear_error(gemma, tmp_path):
    _, source, _ = gemma
    directory = Path(shutil.copytree(source, tmp_path / "ckpt"))
    prompts = random_prompts(13, [6])
    with StreamedModel(directory, host_cache_layers=0, prefetch=1) as model:
        model.generate(prompts, 3)
        shard = Path(LayerStore(directory).layer_files(2)[-1])
        truncate(shard)
        with pytest.raises(mtijax.MtijaxError, match=f"{shard}: truncated while in use"):
            model.generate(prompts, 3)


def test_cli_prints_no_partial_output_when_a_shard_is_truncated_mid_run(gemma, tmp_path, monkeypatch, capsys):
    _, source, _ = gemma
    directory = Path(shutil.copytree(source, tmp_path / "ckpt"))
    shard = Path(LayerStore(directory).layer_files(1)[-1])
    original = RunnerStreamedModel._pass

    def pass_then_truncate(self, *args, **kwargs):  # the prefill succeeds, then the file shrinks
        result = original(self, *args, **kwargs)
        if shard.stat().st_size > 8:
            truncate(shard)
        return result

    monkeypatch.setattr(RunnerStreamedModel, "_pass", pass_then_truncate)
    status = main(["generate", "--model", str(directory), "--token-ids", "5,6,7", "--max-new-tokens", "4",
                   "--stream", "--host-cache-layers", "0", "--prefetch", "0"])
    out, err = capsys.readouterr()
    assert status == 2 and out == ""
    assert err.startswith("mtijax: error: ") and err.count("\n") == 1 and "truncated while in use" in err


# --- the command line ---------------------------------------------------------------------------------------------

def test_cli_streamed_generation_equals_resident_and_reports(gemma, capsys):
    _, directory, _ = gemma
    args = ["generate", "--model", str(directory), "--token-ids", "5,6,7,8", "--max-new-tokens", "6", "--json"]
    before = tree_checksums(directory)
    assert main(args) == 0
    resident = json.loads(capsys.readouterr().out)
    assert main([*args, "--stream", "--host-cache-layers", "2", "--prefetch", "1", "--max-device-memory", "1GB"]) == 0
    streamed = json.loads(capsys.readouterr().out)
    assert streamed["ids"] == resident["ids"]
    report = streamed["stream"]
    assert report["peak_device_bytes"] > 0 and report["total_bytes_to_device"] > 0
    assert 0 <= report["host_cache"]["hit_rate"] <= 1 and report["effective_gbps"] > 0
    assert main(args[:-1] + ["--stream"]) == 0
    out, err = capsys.readouterr()
    assert out.split() == [str(i) for i in resident["ids"]]
    assert [line.split(":")[0] for line in err.splitlines()] == ["stream"] * 3
    assert "peak device memory" in err and "effective" in err and "hit rate" in err
    assert tree_checksums(directory) == before


@pytest.mark.parametrize("flags, named", [
    (["--prefetch", "2"], "--prefetch needs --stream"),
    (["--stream", "--max-device-memory", "lots"], "argument --max-device-memory: cannot read 'lots'"),
    (["--stream", "--prefetch", "-1"], "argument --prefetch: must be >= 0"),
    (["--stream", "--max-device-memory", "1kB"], "less than one layer"),
])
def test_cli_streaming_user_errors(gemma, capsys, flags, named):
    directory = gemma[1]
    status = main(["generate", "--model", str(directory), "--token-ids", "5,6", "--max-new-tokens", "2", *flags])
    out, err = capsys.readouterr()
    assert status == 2 and out == "" and err.count("\n") == 1 and named in err


# --- random checkpoints for the benchmark --------------------------------------------------------------------------

def test_random_checkpoint_reads_back_in_mtijax_and_transformers(gemma, tmp_path):
    from transformers import Gemma3ForCausalLM

    config = gemma[2].config
    directory = write_random_checkpoint(config, tmp_path / "random", dtype="float32", shard_bytes=100_000, scale=0.2)
    assert read_hf_config(directory) == config
    assert len(list(directory.glob("*.safetensors"))) > 1
    loaded = mtijax.load(directory, tokenizer=False, progress=False)
    hf = Gemma3ForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    tokens = np.array(random_prompts(14, [8]))
    with torch.no_grad():
        expected = hf(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(resident_logits(loaded, tokens), expected, rtol=1e-4, atol=1e-4)


def test_random_olmoe_checkpoint_config_reads_back(olmoe, tmp_path):
    config = olmoe[2].config
    directory = write_random_checkpoint(config, tmp_path / "random-olmoe", shard_bytes=50_000)
    assert read_hf_config(directory) == config
    assert LayerStore(directory, "bfloat16").read_expert(1, 5)["moe"]["down_proj"].shape == (64, 32)
