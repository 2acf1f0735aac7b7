"""Fusion checkpoints (orbax), exact resumption, safetensors export, and the ``mtijax fuse`` command.

The API tests share the configuration, training settings and tiny model of ``tests/test_fusion_model.py``.
The command-line tests train the minimal preset on a copy of the tiny checkpoint given a byte-level
tokenizer, on a text file the test writes.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from mtijax.api import load
from mtijax.cli import main
from mtijax.errors import MtijaxError
from mtijax.fusion import (export_safetensors, init_fusion, init_train_state, load_safetensors, restore_checkpoint,
                           save_checkpoint, train, variables_of)
from tests.conftest import add_byte_tokenizer, tree_checksums
from tests.test_cli_errors import user_error
from tests.test_fusion_model import ALL_ON, TRAIN, WINDOWS

TEXT = " ".join(["The quick brown fox jumps over the lazy dog while the cat sleeps by the warm fire."] * 12)


@pytest.fixture(scope="module")
def model(tiny_gqa):
    return load(tiny_gqa[1], progress=False)


@pytest.fixture(scope="module")
def runs(model):
    """Training of 4 steps without a break, and the first 2 of them."""
    start = init_train_state(init_fusion(ALL_ON, model.config, jax.random.key(0)), TRAIN)
    whole = train(model.config, model.params, ALL_ON, start, WINDOWS, TRAIN, progress=False)
    half = train(model.config, model.params, ALL_ON, start, WINDOWS, TRAIN, until=2, progress=False)
    return whole, half


def assert_same_tree(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_orbax_round_trip_restores_params_optimizer_state_and_memory(model, runs, tmp_path):
    state = runs[1].state
    save_checkpoint(tmp_path / "ckpt", state, ALL_ON, model.config, train=TRAIN, history=runs[1].history)
    restored = restore_checkpoint(tmp_path / "ckpt", model.config)
    assert_same_tree(restored.state, state)
    assert restored.fusion == ALL_ON and restored.train == TRAIN and restored.meta["history"] == runs[1].history
    size = sum(f.stat().st_size for f in (tmp_path / "ckpt").rglob("*") if f.is_file())
    fusion_bytes = sum(np.asarray(x).nbytes for x in jax.tree.leaves(state.params))
    assert size < 4 * fusion_bytes + 200_000  # params, two Adam moments, memory: no base weights


def test_resumed_training_equals_uninterrupted_training(model, runs, tmp_path):
    whole, half = runs
    save_checkpoint(tmp_path / "ckpt", half.state, ALL_ON, model.config, train=TRAIN, history=half.history)
    restored = restore_checkpoint(tmp_path / "ckpt", model.config)
    resumed = train(model.config, model.params, ALL_ON, restored.state, WINDOWS, TRAIN,
                    history=restored.meta["history"], progress=False)
    assert_same_tree(resumed.state, whole.state)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in whole.history]


def test_checkpoint_without_optimizer_state(model, runs, tmp_path):
    save_checkpoint(tmp_path / "ckpt", runs[1].state, ALL_ON, model.config, include_optimizer=False)
    restored = restore_checkpoint(tmp_path / "ckpt", model.config)
    assert restored.state.opt_state is None
    assert_same_tree(restored.variables, variables_of(runs[1].state))


def test_safetensors_export_round_trip(runs, tmp_path):
    variables = variables_of(runs[0].state)
    path = export_safetensors(tmp_path / "fusion.safetensors", variables, ALL_ON, 64)
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        assert "params/layers/1/prime/proj/kernel" in f.keys() and "memory/layers/3/smf/bank" in f.keys()
    fusion, restored, hidden = load_safetensors(path)
    assert fusion == ALL_ON and hidden == 64
    assert_same_tree(restored, variables)


def test_restore_refuses_another_base_model(model, runs, tmp_path):
    save_checkpoint(tmp_path / "ckpt", runs[1].state, ALL_ON, model.config)
    with pytest.raises(MtijaxError, match="was trained for hidden size 64; the base model has hidden size 32"):
        restore_checkpoint(tmp_path / "ckpt", dataclasses.replace(model.config, hidden_size=32))
    shallow = dataclasses.replace(model.config, num_layers=2, layer_types=model.config.layer_types[:2])
    with pytest.raises(MtijaxError, match=r"fusion position 3 is outside the model: it has layers 0\.\.1"):
        restore_checkpoint(tmp_path / "ckpt", shallow)
    with pytest.raises(MtijaxError, match="is not a fusion checkpoint"):
        restore_checkpoint(tmp_path, model.config)


# the command line ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def with_tokenizer(tiny_gqa, tmp_path_factory) -> Path:
    """A copy of the tiny checkpoint with a byte-level tokenizer (ids 3..255 are bytes 0..252)."""
    return add_byte_tokenizer(Path(shutil.copytree(tiny_gqa[1], tmp_path_factory.mktemp("fuse") / "tiny")))


@pytest.fixture(scope="module")
def trained(with_tokenizer, tmp_path_factory):
    """``mtijax fuse train`` of the minimal preset: (checkpoint directory, printed JSON, model checksums)."""
    work = tmp_path_factory.mktemp("fuse-train")
    (work / "text.txt").write_text(TEXT)
    before = tree_checksums(with_tokenizer)
    status = main(["fuse", "train", "--model", str(with_tokenizer), "--preset", "minimal", "--text",
                   str(work / "text.txt"), "--steps", "2", "--batch-size", "2", "--seq-len", "16", "--warmup", "0",
                   "--held-out-windows", "2", "--out", str(work / "ckpt"), "--json"])
    return work / "ckpt", status, before


def test_cli_train_writes_a_checkpoint_and_reports_perplexities(trained, with_tokenizer, capsys):
    directory, status, before = trained
    assert status == 0
    assert tree_checksums(with_tokenizer) == before, "the base checkpoint changed"
    assert {p.name for p in directory.iterdir()} >= {"fusion.json", "state", "loss_curve.png"}
    meta = json.loads((directory / "fusion.json").read_text())
    assert meta["fusion"]["positions"] == [2] and meta["step"] == 2 and len(meta["history"]) == 2
    for key in ("perplexity_base", "perplexity_fused_before", "perplexity_fused_after"):
        assert 1 < meta["evaluation"][key] < 1000


@pytest.fixture(scope="module")
def all_on_checkpoint(runs, model, with_tokenizer, tmp_path_factory) -> Path:
    """The 4-step training run saved as a checkpoint of the tokenizer-carrying copy of the tiny model."""
    directory = tmp_path_factory.mktemp("all-on") / "ckpt"
    save_checkpoint(directory, runs[0].state, ALL_ON, model.config, train=TRAIN, model=str(with_tokenizer))
    return directory


def test_cli_generate_prints_the_stability_readings_per_step(all_on_checkpoint, capsys):
    """(Top-1 sampling at 10 tokens, as tests/test_fusion_model.py generates, so the compiled steps are shared.)"""
    capsys.readouterr()
    sampling = ["--temperature", "0.9", "--top-k", "1", "--max-new-tokens", "10"]
    assert main(["fuse", "generate", "--checkpoint", str(all_on_checkpoint), "--token-ids", "40,41,42",
                 *sampling]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["step", "token", "S", "lambda", "C", "r", "T", "stable"]
    steps = [line.split()[0] for line in lines[1:-1]]
    assert steps == [str(i) for i in range(len(steps))] and 1 <= len(steps) <= 10
    assert all(line.split()[-1] in ("yes", "no") for line in lines[1:-1])
    assert main(["fuse", "generate", "--checkpoint", str(all_on_checkpoint), "--auto-temperature",
                 "--stop-on-instability", "--json", *sampling, "The fox"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["ids"]) <= len(result["trace"]["temperature"]) <= 10
    assert all(0.3 <= t <= 1.5 for t in result["trace"]["temperature"])


def test_cli_export(trained, tmp_path, capsys):
    assert main(["fuse", "export", "--checkpoint", str(trained[0]), "--out", str(tmp_path / "f.safetensors")]) == 0
    fusion, variables, hidden = load_safetensors(tmp_path / "f.safetensors")
    assert fusion.positions == (2,) and hidden == 64


def test_cli_user_errors(trained, with_tokenizer, tmp_path, capsys):
    broken = Path(shutil.copytree(trained[0], tmp_path / "other-width"))
    meta = json.loads((broken / "fusion.json").read_text())
    meta["base"]["hidden_size"] = 32
    (broken / "fusion.json").write_text(json.dumps(meta))
    err = user_error(capsys, ["fuse", "generate", "--checkpoint", str(broken), "--token-ids", "5,6"], broken)
    assert "was trained for hidden size 32; the base model has hidden size 64" in err
    err = user_error(capsys, ["fuse", "generate", "--checkpoint", str(tmp_path / "none"), "--token-ids", "5"])
    assert "is not a fusion checkpoint" in err
    train_args = ["fuse", "train", "--model", str(with_tokenizer), "--out", str(tmp_path / "x"), "--steps", "1",
                  "--warmup", "0"]
    assert "fusion position 9 is outside the model: it has layers 0..3" in user_error(
        capsys, [*train_args, "--positions", "9"], with_tokenizer)
    assert "unknown fusion component 'resonance'" in user_error(
        capsys, [*train_args, "--components", "prime,resonance"], with_tokenizer)
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_committed_checkpoint_generates_on_the_real_270m(real_model):
    """The checkpoint under checkpoints/ restores for the embedded Gemma 3 270M and generates with finite
    readings; its recorded evaluation is there."""
    from mtijax.fusion import Decoding, generate_fused

    directory = Path(__file__).parent.parent / "checkpoints" / "gemma3-270m-standard"
    restored = restore_checkpoint(directory, real_model.config)
    assert restored.fusion.positions == (6, 12, 17) and restored.state.opt_state is None
    assert restored.meta["evaluation"]["perplexity_fused_after"] > 1
    prompt = real_model.tokenizer("In Python, a decorator is")["input_ids"]
    result = generate_fused(real_model.config, real_model.params, restored.fusion, restored.variables, [prompt], 4,
                            decoding=Decoding())
    assert result.lengths[0] == 4 and np.isfinite(result.trace.entropy).all()
    assert 0 < result.trace.coherence[0].min() <= result.trace.coherence[0].max() <= 1
