"""User errors through the ``mtijax`` command.

Every user error (a missing or damaged checkpoint, a bad flag, a token id
outside the vocabulary, a prompt without a tokenizer) makes ``mtijax`` exit
with status 2 and print exactly one line, ``mtijax: error: ...``, that names
what is wrong and where, without a traceback. The checkpoint on disk is
never touched. Each broken checkpoint is a copy of the tiny grouped-query
checkpoint, damaged in one way.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from mtijax.cli import main
from tests.conftest import tree_checksums

TENSOR = "model.layers.2.self_attn.k_proj.weight"
"""The tensor the damaged checkpoints spoil: 2 kv heads x head_dim 16 = 32 rows of hidden size 64."""


def generate_args(model: Path | str, *extra: str) -> list[str]:
    """``mtijax generate`` of two tokens after a three-token prompt."""
    return ["generate", "--model", str(model), "--token-ids", "5,6,7", "--max-new-tokens", "2", *extra]


def user_error(capsys, argv: list[str], files: Path | None = None) -> str:
    """Run ``mtijax argv``, check it fails as a user error and leaves ``files`` as they were; the error line."""
    before = tree_checksums(files) if files is not None else None
    status = main(argv)
    out, err = capsys.readouterr()
    assert status == 2
    assert out == ""
    assert err.startswith("mtijax: error: ") and err.endswith("\n") and err.count("\n") == 1, err
    if files is not None:
        assert tree_checksums(files) == before, "the checkpoint on disk changed"
    return err


@pytest.fixture
def checkpoint(tiny_gqa, tmp_path) -> Path:
    """A private copy of the tiny multi-shard checkpoint, free to damage."""
    return Path(shutil.copytree(tiny_gqa[1], tmp_path / "tiny"))


def shard_of(directory: Path, tensor: str) -> Path:
    """The shard file ``model.safetensors.index.json`` names for ``tensor``."""
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    return directory / index["weight_map"][tensor]


def rewrite_shard(directory: Path, tensor: str, change) -> Path:
    """Rewrite the shard holding ``tensor`` after ``change(tensors)`` edits its dict of arrays in place."""
    path = shard_of(directory, tensor)
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})
    return path


def edit_config(directory: Path, **fields) -> Path:
    """Overwrite fields of ``config.json``; returns its path."""
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))
    return path


# --- Hugging Face checkpoints ----------------------------------------------------------------------------------

def test_missing_model_path_is_named(capsys, tmp_path):
    missing = tmp_path / "no-such-model"
    line = user_error(capsys, generate_args(missing), tmp_path)
    assert str(missing) in line


def test_missing_shard_file_is_named(capsys, checkpoint):
    shard = shard_of(checkpoint, TENSOR)
    shard.unlink()
    line = user_error(capsys, generate_args(checkpoint), checkpoint)
    assert str(shard) in line and "missing" in line


@pytest.mark.parametrize("garbage_at", [0, 8], ids=["header-length", "header-json"])
def test_corrupt_shard_is_named(capsys, checkpoint, garbage_at):
    """Garbage over the 8-byte header length, or over the start of the JSON header after it."""
    shard = shard_of(checkpoint, TENSOR)
    data = bytearray(shard.read_bytes())
    data[garbage_at:garbage_at + 16] = b"\xff\xfe not a header!"
    shard.write_bytes(bytes(data))
    line = user_error(capsys, generate_args(checkpoint), checkpoint)
    assert str(shard) in line and "corrupt" in line


def test_truncated_shard_is_named(capsys, checkpoint):
    shard = shard_of(checkpoint, TENSOR)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    line = user_error(capsys, generate_args(checkpoint), checkpoint)
    assert str(shard) in line and "truncated" in line


def test_tensor_missing_from_its_shard_is_named(capsys, checkpoint):
    """The index still names the shard, but the shard no longer holds the tensor."""
    shard = rewrite_shard(checkpoint, TENSOR, lambda tensors: tensors.pop(TENSOR))
    line = user_error(capsys, generate_args(checkpoint), checkpoint)
    assert repr(TENSOR) in line and str(shard) in line and "missing" in line


def test_config_disagreeing_with_tensor_shapes_names_first_mismatch(capsys, checkpoint):
    """config.json says intermediate_size 96; the first MLP tensor read, gate_proj [128, 64], disagrees."""
    edit_config(checkpoint, intermediate_size=96)
    gate = "model.layers.0.mlp.gate_proj.weight"
    line = user_error(capsys, generate_args(checkpoint), checkpoint)
    assert repr(gate) in line and str(shard_of(checkpoint, gate)) in line
    assert "[128, 64]" in line and "[96, 64]" in line


def test_tensor_of_wrong_shape_is_named(capsys, checkpoint):
    shard = rewrite_shard(checkpoint, TENSOR, lambda tensors: tensors.update({TENSOR: tensors[TENSOR][:31]}))
    line = user_error(capsys, generate_args(checkpoint), checkpoint)
    assert repr(TENSOR) in line and str(shard) in line
    assert "[31, 64]" in line and "[32, 64]" in line


def test_nan_in_a_tensor_is_named(capsys, checkpoint):
    def poison(tensors):
        tensors[TENSOR][3, 4] = np.nan

    shard = rewrite_shard(checkpoint, TENSOR, poison)
    line = user_error(capsys, generate_args(checkpoint), checkpoint)
    assert repr(TENSOR) in line and str(shard) in line and "NaN" in line


@pytest.mark.parametrize("command", ["generate", "info"])
def test_unknown_architecture_is_named(capsys, checkpoint, command):
    config = edit_config(checkpoint, model_type="llama")
    argv = generate_args(checkpoint) if command == "generate" else ["info", "--model", str(checkpoint)]
    line = user_error(capsys, argv, checkpoint)
    assert "unknown architecture 'llama'" in line and str(config) in line


@pytest.mark.parametrize("fields, named", [
    ({"num_key_value_heads": 3}, "3 kv heads"),
    ({"vocab_size": "many"}, "vocab_size"),
    ({"num_hidden_layers": 5}, "4 layer types for 5 layers"),
    ({"rope_parameters": None, "rope_scaling": "linear"}, "RoPE"),
    ({"rope_parameters": {"full_attention": {"rope_type": "yarn", "factor": 8.0}}}, "'yarn'"),
], ids=["kv-heads", "not-a-number", "layer-types", "rope-not-an-object", "rope-type"])
def test_malformed_config_values_name_the_field_and_file(capsys, checkpoint, fields, named):
    config = edit_config(checkpoint, **fields)
    line = user_error(capsys, generate_args(checkpoint), checkpoint)
    assert str(config) in line and named in line


def test_config_that_is_not_json_is_named(capsys, checkpoint):
    config = checkpoint / "config.json"
    config.write_text('{"model_type": "gemma3_text",')
    line = user_error(capsys, generate_args(checkpoint), checkpoint)
    assert str(config) in line and "JSON" in line


def test_single_safetensors_file_is_not_taken_for_a_model(capsys, checkpoint):
    """``--model`` takes the checkpoint directory; one of its shards is neither that nor a GGUF file."""
    shard = shard_of(checkpoint, TENSOR)
    line = user_error(capsys, generate_args(shard), checkpoint)
    assert str(shard) in line and "not a GGUF file" in line


# --- flags and prompts -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, named", [
    (["--temperature", "-1"], ["--temperature", "-1"]),
    (["--max-new-tokens", "abc"], ["--max-new-tokens", "'abc'"]),
    (["--token-ids", "1,x"], ["--token-ids", "'1,x'"]),
    (["--dtype", "float8"], ["--dtype", "'float8'"]),
    (["--no-such-flag"], ["--no-such-flag"]),
], ids=["negative-temperature", "non-integer-count", "non-integer-token", "unknown-dtype", "unknown-flag"])
def test_bad_flag_value_names_the_flag(capsys, tiny_gqa, flags, named):
    directory = tiny_gqa[1]
    line = user_error(capsys, generate_args(directory, *flags), directory)
    assert all(word in line for word in named), line


def test_token_id_outside_the_vocabulary_is_named(capsys, tiny_gqa):
    directory = tiny_gqa[1]
    argv = ["generate", "--model", str(directory), "--token-ids", "5,256,7"]
    line = user_error(capsys, argv, directory)
    assert "token id 256" in line and "0..255" in line


def test_text_prompt_needs_a_tokenizer(capsys, tiny_gqa):
    """The tiny checkpoints have no tokenizer, so only --token-ids can prompt them."""
    directory = tiny_gqa[1]
    line = user_error(capsys, ["generate", "--model", str(directory), "Hello"], directory)
    assert str(directory) in line and "no tokenizer" in line and "--token-ids" in line


# --- GGUF files ------------------------------------------------------------------------------------------------

def write_gguf(path: Path, hf_model, architecture: str = "gemma3") -> Path:
    """``hf_model`` as an F32 GGUF file, with the tensor names and ``w + 1`` norms of llama.cpp's converter."""
    config = hf_model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, config.num_hidden_layers)
    writer = gguf.GGUFWriter(path, architecture)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_sliding_window(config.sliding_window)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    for name, tensor in hf_model.state_dict().items():
        if name == "lm_head.weight":  # tied to the embedding
            continue
        value = tensor.numpy()
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight",)),
                          value + 1 if name.endswith("norm.weight") else value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tiny_gqa, tmp_path_factory) -> Path:
    """The tiny grouped-query model as a GGUF file (read-only: tests damage copies)."""
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", tiny_gqa[0])


def test_intact_gguf_generates(capsys, tiny_gguf):
    """The control for the damaged copies below: the file they are cut from works."""
    before = tree_checksums(tiny_gguf.parent)
    status = main(["generate", "--model", str(tiny_gguf), "--token-ids", "5,6,7", "--max-new-tokens", "1",
                   "--json"])
    out, err = capsys.readouterr()
    assert status == 0, err
    assert json.loads(out)["prompt_ids"] == [5, 6, 7]
    assert tree_checksums(tiny_gguf.parent) == before


def test_corrupt_gguf_is_named(capsys, tmp_path):
    path = tmp_path / "random.gguf"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    line = user_error(capsys, generate_args(path), tmp_path)
    assert str(path) in line and "not a GGUF file" in line


def test_truncated_gguf_is_named(capsys, tiny_gguf, tmp_path):
    path = tmp_path / "truncated.gguf"
    data = tiny_gguf.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    line = user_error(capsys, generate_args(path), tmp_path)
    assert str(path) in line and "truncated" in line


def test_gguf_of_another_architecture_is_named(capsys, tiny_gqa, tmp_path):
    path = write_gguf(tmp_path / "llama.gguf", tiny_gqa[0], architecture="llama")
    line = user_error(capsys, ["info", "--model", str(path)], tmp_path)
    assert str(path) in line and "unknown GGUF architecture 'llama'" in line


# --- info, and presets without weights -------------------------------------------------------------------------

def test_info_on_a_checkpoint_reports_its_shapes_and_size(capsys, tiny_gqa):
    directory = tiny_gqa[1]
    before = tree_checksums(directory)
    status = main(["info", "--model", str(directory), "--json"])
    out, err = capsys.readouterr()
    assert status == 0, err
    summary = json.loads(out)
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    assert {k: summary[k] for k in ("layers", "hidden_size", "intermediate_size", "heads", "kv_heads", "head_dim",
                                    "vocab_size", "sliding_window")} == {
        "layers": 4, "hidden_size": 64, "intermediate_size": 128, "heads": 4, "kv_heads": 2, "head_dim": 16,
        "vocab_size": 256, "sliding_window": 6}
    assert summary["parameters"] == index["metadata"]["total_parameters"]  # as counted by transformers
    assert summary["bytes_on_disk"] == sum(p.stat().st_size for p in directory.glob("*.safetensors"))
    assert tree_checksums(directory) == before


def test_info_on_a_preset_needs_no_weights(capsys):
    status = main(["info", "--model", "gemma3-12b", "--json"])
    out, err = capsys.readouterr()
    assert status == 0, err
    summary = json.loads(out)
    assert (summary["layers"], summary["hidden_size"], summary["heads"], summary["kv_heads"]) == (48, 3840, 16, 8)
    assert "source" not in summary and "bytes_on_disk" not in summary


def test_generate_with_a_preset_says_it_has_no_weights(capsys):
    line = user_error(capsys, generate_args("gemma3-12b"))
    assert "gemma3-12b" in line and "preset without embedded weights" in line
