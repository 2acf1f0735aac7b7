"""User errors through the ``mtijax`` command.

Every user error (a missing or damaged checkpoint, a bad flag, a token id
outside the vocabulary, a prompt without a tokenizer) makes ``mtijax`` exit
with status 2 and print exactly one line, ``mtijax: error: ...``, that names
what is wrong and where, without a traceback. The checkpoint on disk is
never touched. Each broken checkpoint is a copy of the tiny grouped-query
checkpoint, damaged in one way.

The table at the end gives every subcommand the bad input a careless user
gives it. Where the error needs only the flags, the config or the tokenizer,
the tensor readers are made to fail (``no_weights``), so the error is shown
to come before a weight is read.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from pathlib import Path
from typing import Callable, Sequence

import gguf
import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from mtijax.cli import main
from mtijax.weights.gguf_file import GGUFFile, GGUFTensor
from mtijax.weights.safetensors_file import SafetensorsFile
from tests.conftest import tree_checksums

TENSOR = "model.layers.2.self_attn.k_proj.weight"
"""The tensor the damaged checkpoints spoil: 2 kv heads x head_dim 16 = 32 rows of hidden size 64."""


def generate_args(model: Path | str, *extra: str) -> list[str]:
    """``mtijax generate`` of two tokens after a three-token prompt."""
    return ["generate", "--model", str(model), "--token-ids", "5,6,7", "--max-new-tokens", "2", *extra]


def user_error(capsys, argv: list[str], files: Path | Sequence[Path] | None = None) -> str:
    """Run ``mtijax argv``, check it fails as a user error and leaves the directories ``files`` as they were
    (and makes no file in them); the error line."""
    roots = [] if files is None else [files] if isinstance(files, Path) else list(files)
    before = [tree_checksums(root) for root in roots]
    status = main(argv)
    out, err = capsys.readouterr()
    assert status == 2
    assert out == ""
    assert err.startswith("mtijax: error: ") and err.endswith("\n") and err.count("\n") == 1, err
    assert [tree_checksums(root) for root in roots] == before, "a file on disk changed"
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
    config = edit_config(checkpoint, model_type="falcon")
    argv = generate_args(checkpoint) if command == "generate" else ["info", "--model", str(checkpoint)]
    line = user_error(capsys, argv, checkpoint)
    assert "unknown architecture 'falcon'" in line and str(config) in line


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
    """Cut in the tensor data: the first tensor whose data is cut is named, in plain words."""
    path = tmp_path / "truncated.gguf"
    data = tiny_gguf.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    line = user_error(capsys, generate_args(path), tmp_path)
    tensors = gguf.GGUFReader(tiny_gguf).tensors
    first_cut = next(t for t in tensors if t.data_offset + t.n_bytes > len(data) // 2)
    assert f"{path}: truncated at tensor {first_cut.name!r}" in line
    assert "Error" not in line


def test_gguf_cut_inside_its_header_is_named(capsys, tiny_gguf, tmp_path):
    path = tmp_path / "header.gguf"
    path.write_bytes(tiny_gguf.read_bytes()[:100])
    line = user_error(capsys, generate_args(path), tmp_path)
    assert f"{path}: truncated GGUF file: it ends inside its header" in line and "Error" not in line


@pytest.mark.parametrize("architecture, named", [
    ("falcon", "unknown GGUF architecture 'falcon'"),
    ("llama", "GGUF models of architecture 'llama' are not supported yet"),  # read from Hugging Face directories
])
def test_gguf_of_another_architecture_is_named(capsys, tiny_gqa, tmp_path, architecture, named):
    path = write_gguf(tmp_path / f"{architecture}.gguf", tiny_gqa[0], architecture=architecture)
    line = user_error(capsys, ["info", "--model", str(path)], tmp_path)
    assert str(path) in line and named in line


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


# --- every subcommand, given bad input -------------------------------------------------------------------------

class WeightsRead(Exception):
    """A test that must fail before the weights are read read a tensor."""


@pytest.fixture
def no_weights(monkeypatch):
    """Every tensor reader (safetensors, GGUF) raises :class:`WeightsRead`; headers can still be read."""
    def refuse(*args, **kwargs):
        raise WeightsRead("a tensor was read")

    monkeypatch.setattr(SafetensorsFile, "get", refuse)
    monkeypatch.setattr(SafetensorsFile, "read_into", refuse)
    monkeypatch.setattr(GGUFFile, "read", refuse)
    monkeypatch.setattr(GGUFTensor, "data", property(refuse))


@dataclasses.dataclass(frozen=True)
class Inputs:
    """What the table's commands read, and the existing paths they are wrongly told to write."""

    model: Path        # the tiny checkpoint, no tokenizer
    text: Path         # the same with a byte-level tokenizer
    gguf: Path         # the tiny model as a GGUF file
    nan: Path          # a copy with a NaN in one tensor
    fusion: Path       # a fusion checkpoint of the tiny model
    narrow: Path       # a fusion checkpoint made for hidden size 32
    file: Path         # an existing file (a wrong --out for a directory)
    folder: Path       # an existing directory (a wrong --out for a file)

    @property
    def roots(self) -> list[Path]:
        """Every directory whose files must not change."""
        return [self.model, self.text, self.gguf.parent, self.nan, self.fusion, self.narrow, self.file.parent]


@pytest.fixture(scope="module")
def inputs(tiny_gqa, tiny_with_tokenizer, tiny_gguf, tmp_path_factory) -> Inputs:
    from mtijax.api import load
    from mtijax.fusion import FusionConfig, TrainConfig, init_fusion, init_train_state, save_checkpoint

    work = tmp_path_factory.mktemp("bad-input")
    nan = Path(shutil.copytree(tiny_gqa[1], work / "nan"))

    def poison(tensors):
        tensors[TENSOR][3, 4] = np.nan

    rewrite_shard(nan, TENSOR, poison)
    config = load(tiny_gqa[1], tokenizer=False, progress=False).config
    fusion = FusionConfig.minimal(config.num_layers)
    state = init_train_state(init_fusion(fusion, config, jax.random.key(0)), TrainConfig(steps=2))
    save_checkpoint(work / "fusion", state, fusion, config, model=str(tiny_with_tokenizer))
    narrow = Path(shutil.copytree(work / "fusion", work / "narrow"))
    meta = json.loads((narrow / "fusion.json").read_text())
    meta["base"]["hidden_size"] = 32
    (narrow / "fusion.json").write_text(json.dumps(meta))
    outputs = work / "outputs"
    outputs.mkdir()
    (outputs / "results.txt").write_text("keep me\n")
    (outputs / "a-directory").mkdir()
    return Inputs(tiny_gqa[1], tiny_with_tokenizer, tiny_gguf, nan, work / "fusion", narrow,
                  outputs / "results.txt", outputs / "a-directory")


def _gen(model: Path, *extra: str) -> list[str]:
    return ["generate", "--model", str(model), *extra]


LONG_PROMPT = ",".join(["5"] * 600)
"""600 tokens: more than the tiny models' context of 512."""

Case = tuple[Callable[[Inputs], list[str]], str, bool]
CASES: dict[str, Case] = {
    # name: (argv, a part of the error line, whether the error comes before any weight is read)
    "generate/token-id": (lambda i: _gen(i.model, "--token-ids", "5,256,7"), "token id 256 is out of range", True),
    "generate/negative-token-id": (lambda i: _gen(i.model, "--token-ids", "5,-1"), "token id -1", True),
    "generate/beyond-context": (lambda i: _gen(i.model, "--token-ids", "5,6", "--max-new-tokens", "100000"),
                                "the model's context of 512", True),
    "generate/long-prompt": (lambda i: _gen(i.model, "--token-ids", LONG_PROMPT), "the prompt (600 tokens)", True),
    "generate/gguf-beyond-context": (lambda i: _gen(i.gguf, "--token-ids", "5", "--max-new-tokens", "600"),
                                     "gemma3.context_length in", True),
    "generate/inf-temperature": (lambda i: _gen(i.model, "--token-ids", "5", "--temperature", "inf"),
                                 "argument --temperature: must be a finite number, got inf", True),
    "generate/nan-temperature": (lambda i: _gen(i.model, "--token-ids", "5", "--temperature", "nan"),
                                 "must be a finite number", True),
    "generate/top-p-zero": (lambda i: _gen(i.model, "--token-ids", "5", "--top-p", "0"), "must be in (0, 1]", True),
    "generate/no-new-tokens": (lambda i: _gen(i.model, "--token-ids", "5", "--max-new-tokens", "0"),
                               "argument --max-new-tokens: must be >= 1", True),
    "generate/prompt-and-ids": (lambda i: _gen(i.model, "hi", "--token-ids", "5"), "not both", True),
    "generate/no-prompt": (lambda i: _gen(i.model), "give a PROMPT or --token-ids", True),
    "generate/text-without-tokenizer": (lambda i: _gen(i.model, "Hello"), "has no tokenizer", True),
    "generate/text-beyond-context": (lambda i: _gen(i.text, "x" * 600), "the model's context of 512", True),
    "generate/stream-flag-without-stream": (lambda i: _gen(i.model, "--token-ids", "5", "--prefetch", "2"),
                                            "--prefetch needs --stream", True),
    "generate/stream-memory-cap": (lambda i: _gen(i.model, "--token-ids", "5", "--stream", "--max-device-memory",
                                                  "1KB"), "less than one layer", True),
    "generate/stream-token-id": (lambda i: _gen(i.model, "--token-ids", "5,256", "--stream"), "token id 256", True),
    "generate/stream-beyond-context": (lambda i: _gen(i.model, "--token-ids", "5", "--stream", "--max-new-tokens",
                                                      "512"), "context of 512", True),
    "generate/stream-nan": (lambda i: _gen(i.nan, "--token-ids", "5,6", "--stream", "--max-new-tokens", "2"),
                            "contains NaN or infinite values", False),
    "generate/nan": (lambda i: _gen(i.nan, "--token-ids", "5,6", "--max-new-tokens", "2"),
                     "contains NaN or infinite values", False),
    "info/missing-model": (lambda i: ["info", "--model", str(i.file.parent / "none")], "no such model", True),
    "inject/out-is-a-file": (lambda i: ["inject", "--student", str(i.model), "--teacher", str(i.model),
                                        "--token-ids", "5,6", "--out", str(i.file)],
                             "exists and is not a directory", True),
    "inject/out-under-a-file": (lambda i: ["inject", "--student", str(i.model), "--teacher", str(i.model),
                                           "--token-ids", "5,6", "--out", str(i.file / "study")],
                                "is a file", True),
    "inject/alpha-outside": (lambda i: ["inject", "--student", str(i.model), "--teacher", str(i.model),
                                        "--token-ids", "5,6", "--alphas", "0,2"], "outside [0, 1]", True),
    "inject/layer": (lambda i: ["inject", "--student", str(i.model), "--teacher", str(i.model), "--token-ids",
                                "5,6", "--layers", "9"], "student layer 9 is out of range", True),
    "inject/teacher-layers": (lambda i: ["inject", "--student", str(i.model), "--teacher", str(i.model),
                                         "--token-ids", "5,6", "--teacher-layers", "0,1"],
                              "2 teacher layers for 1 student layers", True),
    "inject/tensor": (lambda i: ["inject", "--student", str(i.model), "--teacher", str(i.model), "--token-ids",
                                 "5,6", "--tensor", "attn/nope"], "matches no layer tensor", True),
    "inject/token-id": (lambda i: ["inject", "--student", str(i.model), "--teacher", str(i.model), "--token-ids",
                                   "5,999"], "token id 999", True),
    "inject/no-tokenizer": (lambda i: ["inject", "--student", str(i.model), "--teacher", str(i.model)],
                            "has no tokenizer", True),
    "patch/no-prompts": (lambda i: ["patch", "--model", str(i.model)], "give --source or --source-ids", True),
    "patch/no-target": (lambda i: ["patch", "--model", str(i.model), "--source-ids", "5,6"],
                        "give --target or --target-ids", True),
    "patch/layer": (lambda i: ["patch", "--model", str(i.model), "--source-ids", "5,6", "--target-ids", "7,8",
                               "--v-layers", "9"], "layer 9 is out of range", True),
    "patch/kv-layer": (lambda i: ["patch", "--model", str(i.model), "--source-ids", "5,6", "--target-ids", "7,8",
                                  "--kv", "7"], "layer 7 is out of range", True),
    "patch/positions": (lambda i: ["patch", "--model", str(i.model), "--source-ids", "5,6", "--target-ids", "7,8",
                                   "--v-layers", "1", "--prompt-positions", "last:40"], "outside the prompt", True),
    "patch/beyond-context": (lambda i: ["patch", "--model", str(i.model), "--source-ids", "5,6", "--target-ids",
                                        "7,8", "--max-new-tokens", "1000"], "context of 512", True),
    "patch/inf-temperature": (lambda i: ["patch", "--model", str(i.model), "--source-ids", "5", "--target-ids", "7",
                                         "--temperature", "inf"], "must be a finite number", True),
    "fuse-train/warmup": (lambda i: ["fuse", "train", "--model", str(i.text), "--out", str(i.folder / "f"),
                                     "--steps", "3", "--warmup", "5"], "--warmup 5 must be below --steps 3", True),
    "fuse-train/out-is-a-file": (lambda i: ["fuse", "train", "--model", str(i.text), "--out", str(i.file)],
                                 "exists and is not a directory", True),
    "fuse-train/position": (lambda i: ["fuse", "train", "--model", str(i.text), "--out", str(i.folder / "f"),
                                       "--positions", "9"], "fusion position 9 is outside the model", True),
    "fuse-train/component": (lambda i: ["fuse", "train", "--model", str(i.text), "--out", str(i.folder / "f"),
                                        "--components", "prime,resonance"], "unknown fusion component", True),
    "fuse-train/text": (lambda i: ["fuse", "train", "--model", str(i.text), "--out", str(i.folder / "f"),
                                   "--text", str(i.folder / "none.txt")], "no such file", True),
    "fuse-train/resume-nothing": (lambda i: ["fuse", "train", "--model", str(i.text), "--out", str(i.folder),
                                             "--resume"], "is not a fusion checkpoint", True),
    "fuse-train/no-tokenizer": (lambda i: ["fuse", "train", "--model", str(i.model), "--out", str(i.folder / "f")],
                                "has no tokenizer", True),
    "fuse-generate/no-checkpoint": (lambda i: ["fuse", "generate", "--checkpoint", str(i.folder), "--token-ids",
                                               "5"], "is not a fusion checkpoint", True),
    "fuse-generate/other-width": (lambda i: ["fuse", "generate", "--checkpoint", str(i.narrow), "--token-ids", "5"],
                                  "was trained for hidden size 32", True),
    "fuse-generate/beyond-context": (lambda i: ["fuse", "generate", "--checkpoint", str(i.fusion), "--token-ids",
                                                "5", "--max-new-tokens", "1000"], "context of 512", True),
    "fuse-generate/trace-png-is-a-directory": (lambda i: ["fuse", "generate", "--checkpoint", str(i.fusion),
                                                          "--token-ids", "5", "--trace-png", str(i.folder)],
                                               "is a directory", True),
    "fuse-generate/inf-top-p": (lambda i: ["fuse", "generate", "--checkpoint", str(i.fusion), "--token-ids", "5",
                                           "--top-p", "inf"], "must be a finite number", True),
    "fuse-export/out-is-a-directory": (lambda i: ["fuse", "export", "--checkpoint", str(i.fusion), "--out",
                                                  str(i.folder)], "is a directory", True),
    "fuse-export/out-in-no-directory": (lambda i: ["fuse", "export", "--checkpoint", str(i.fusion), "--out",
                                                   str(i.folder / "none" / "f.safetensors")], "does not exist", True),
    "snn/out-is-a-file": (lambda i: ["snn", "route", "--model", str(i.model), "--token-ids", "5,6", "--out",
                                     str(i.file)], "exists and is not a directory", True),
    "snn/no-prompts": (lambda i: ["snn", "route", "--model", str(i.model)], "give at least one PROMPT", True),
    "snn/ticks": (lambda i: ["snn", "route", "--model", str(i.model), "--token-ids", "5", "--ticks", "0"],
                  "--ticks must be at least 1", True),
    "snn/driver-layer": (lambda i: ["snn", "route", "--model", str(i.model), "--token-ids", "5,6", "--driver",
                                    "resid:9"], "out of range", True),
    "snn/synapses-tensor": (lambda i: ["snn", "route", "--model", str(i.model), "--token-ids", "5,6", "--synapses",
                                       "layers/attn/nope:0"], "no tensor", True),
    "snn/units": (lambda i: ["snn", "route", "--model", str(i.model), "--token-ids", "5,6", "--units", "65"],
                  "has only 64 outputs", True),
    "snn/token-id": (lambda i: ["snn", "route", "--model", str(i.model), "--token-ids", "5,999"], "token id 999",
                     True),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gives_one_line_and_changes_no_file(name, inputs, capsys, request):
    argv_of, message, before_weights = CASES[name]
    if before_weights:
        request.getfixturevalue("no_weights")
    line = user_error(capsys, argv_of(inputs), inputs.roots)
    assert message in line, line


def test_a_short_training_run_needs_no_warmup_flag(inputs, no_weights, capsys):
    """``fuse train --steps 1``: the default warmup adapts (0 steps), so every check passes and the weights are
    read next."""
    from mtijax.fusion import TrainConfig

    assert (TrainConfig(steps=1).warmup_steps, TrainConfig(steps=50).warmup_steps, TrainConfig().warmup_steps) == \
        (0, 5, 10)
    with pytest.raises(WeightsRead):
        main(["fuse", "train", "--model", str(inputs.text), "--out", str(inputs.folder / "short"), "--steps", "1"])
    assert not (inputs.folder / "short").exists()


def test_index_entry_for_a_tensor_no_shard_holds_is_named(capsys, checkpoint):
    """An index that lists a tensor which is in none of the shards is refused when the checkpoint is opened."""
    index = checkpoint / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    shard = data["weight_map"][TENSOR]
    data["weight_map"]["model.layers.0.mlp.extra.weight"] = shard
    index.write_text(json.dumps(data))
    line = user_error(capsys, generate_args(checkpoint), checkpoint)
    assert "'model.layers.0.mlp.extra.weight' is missing" in line and shard in line


def test_every_flag_has_help_with_its_default():
    """Each option of every subcommand has help text; a default that is a value shows in the help."""
    from mtijax.cli import build_parser

    def parsers(parser):
        yield parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    yield from parsers(sub)

    for parser in parsers(build_parser()):
        text = parser.format_help()
        for action in parser._actions:
            if not action.option_strings or action.dest == "help":
                continue
            assert action.help, f"{parser.prog} {action.option_strings[0]} has no help"
            if action.default is not None and action.default is not False:
                assert "default" in parser._get_formatter()._get_help_string(action), \
                    f"{parser.prog} {action.option_strings[0]}: no default in its help"
        assert "usage:" in text


def test_generate_help_shows_defaults(capsys):
    assert main(["generate", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    for expected in ("--max-new-tokens MAX_NEW_TOKENS most tokens to generate", "(default: 32)",
                     "(default: 1.0)", "seed of the sampling (default: 0)", "0 is greedy (default: 0.0)"):
        assert expected in out, expected
