"""Shared fixtures: tiny random Gemma 3 checkpoints written by transformers, and the real 270M GGUF.

Tiny models are written with ``save_pretrained(max_shard_size=...)`` so every
one of them is multi-shard, exactly as a large Hugging Face checkpoint is.
Their weights are redrawn with a larger spread than transformers' init (and
norms away from zero) so the parity tests exercise every parameter.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

os.environ.setdefault("MTIJAX_COMPILATION_CACHE", "0")  # compiles stay in memory: no cross-test disk state
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    # LLVM at -O0 compiles the suite's thousands of small CPU programs about 30% faster; matrix products run in
    # precompiled Eigen kernels either way, and every comparison is against transformers or another mtijax run.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
os.environ.setdefault("MTIJAX_CACHE", str(Path(__file__).parent.parent / ".pytest_cache" / "mtijax"))

TINY_CONFIGS = {
    # grouped-query attention, sliding window shorter than the prompts, default rope
    "gqa": dict(num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                sliding_window=6, sliding_window_pattern=2),
    # multi-query attention, odd layer count, linear RoPE scaling on global layers, qpas != head_dim
    "mqa_linear_rope": dict(num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                            sliding_window=5, query_pre_attn_scalar=24,
                            layer_types=["sliding_attention", "sliding_attention", "full_attention",
                                         "sliding_attention", "full_attention"],
                            rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0,
                                                                "rope_theta": 1_000_000.0},
                                             "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}),
    # multi-head attention (kv heads == heads), odd layer count, final-logit softcapping
    "mha_softcap": dict(num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2, head_dim=32,
                        sliding_window=4, sliding_window_pattern=3, final_logit_softcapping=30.0),
}


def make_hf_model(variant: str, seed: int = 0):
    """A random ``Gemma3ForCausalLM`` (CPU, float32) for one of ``TINY_CONFIGS``."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    config = Gemma3TextConfig(vocab_size=256, hidden_size=64, intermediate_size=128, max_position_embeddings=512,
                              pad_token_id=0, bos_token_id=2, eos_token_id=1, **TINY_CONFIGS[variant])
    model = Gemma3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(-0.5, 0.5)
            elif "embed" in name:  # small, or the tied head just repeats the last token
                p.normal_(0.0, 0.02)
            else:
                p.normal_(0.0, 0.5)
    return model


def write_checkpoint(model, directory: Path) -> Path:
    """``save_pretrained`` into several shards; returns the directory."""
    model.save_pretrained(directory, max_shard_size="64KB")
    assert len(list(directory.glob("*.safetensors"))) > 1, "the fixture must be multi-shard"
    return directory


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """``variant -> (hf_model, checkpoint_dir)``, each tiny configuration built once per session, on first use."""
    built: dict[str, tuple] = {}

    def get(variant: str):
        if variant not in built:
            model = make_hf_model(variant)
            built[variant] = model, write_checkpoint(model, tmp_path_factory.mktemp(f"tiny-{variant}"))
        return built[variant]

    return get


libc = ctypes.CDLL("libc.so.6")


@pytest.fixture(scope="module", autouse=True)
def release_compiled_programs():
    """After each test module, drop every compiled program (``jax.clear_caches``).

    Each XLA:CPU executable keeps about three memory maps (code, read-only data, data) until it is freed,
    and the jit caches keep every program the session compiled. Over the whole suite that passed the
    kernel's limit of 65,530 maps per process, and the next compile died with a segmentation fault.
    Modules rarely share compiled shapes, so little is recompiled. The C allocator then gives the freed
    memory back to the system (``malloc_trim``), so that a module's large fixtures (transformers' copy of the
    real model, say) do not stay in the process's resident memory under the next module's."""
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()
    libc.malloc_trim(0)


@pytest.fixture(params=sorted(TINY_CONFIGS))
def tiny(request, tiny_checkpoints):
    """``(hf_model, checkpoint_dir)`` for each tiny configuration.

    The parameter is function-scoped over the session's cache: a session-scoped parametrized fixture makes
    pytest regroup the tests of every file that uses it by parameter, so files ran (and were listed in its
    progress) three or four times, interleaved."""
    return tiny_checkpoints(request.param)


@pytest.fixture(scope="session")
def tiny_gqa(tiny_checkpoints):
    """``(hf_model, checkpoint_dir)`` of the grouped-query tiny model only."""
    return tiny_checkpoints("gqa")


def tree_checksums(directory: Path) -> dict[str, str]:
    """SHA-256 of every file under ``directory``."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def real_model():
    """The embedded Gemma 3 270M loaded by mtijax (float32), with its tokenizer: the one load of the real model
    in the session (every test of the real 270M shares it)."""
    import gc

    from mtijax.api import load

    model = load(progress=False)
    gc.collect()
    libc.malloc_trim(0)  # the dequantising load's freed host buffers (0.7 GB) go back to the system
    return model


@pytest.fixture(scope="module")
def gguf_parsed_once():
    """For one module, ``gguf.GGUFReader`` of a path (same size and modification time) is parsed once and shared.

    transformers parses the GGUF file for the config, again for the weights, and again for the tokenizer; each
    parse builds a numpy view of every one of the 262k vocabulary strings (about 40 s on this machine). The
    reader is read-only, so transformers' own conversion runs unchanged on the shared parse. The parse reads
    the file into memory first (the reader's views of a plain array cost a third of its views of a memory map:
    9 s instead of 26 s here). Only the transformers loads of the real model use this
    (``with gguf_parsed_once(): ...``); mtijax's readers never see it. The parses are dropped with the module."""
    import gguf

    original, readers = gguf.GGUFReader, {}

    def in_memory(path, mode="r"):
        return np.fromfile(path, dtype=np.uint8)

    def shared(path, mode="r"):
        stat = os.stat(path)
        key = (os.fspath(path), mode, stat.st_size, stat.st_mtime_ns)
        if key not in readers:
            with mock.patch.object(np, "memmap", in_memory):
                readers[key] = original(path, mode)
        return readers[key]

    @contextlib.contextmanager
    def opened():
        gguf.GGUFReader = shared
        try:
            yield
        finally:
            gguf.GGUFReader = original

    yield opened
    readers.clear()


@pytest.fixture(scope="module")
def real_hf_model(gguf_parsed_once):
    """The same GGUF file loaded by transformers (dequantised to float32); module-scoped, so its memory is given
    back after the module that compares against it."""
    from transformers import AutoModelForCausalLM

    from mtijax.weights.default import default_model_path

    path = default_model_path()
    with gguf_parsed_once():
        return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                    dtype=torch.float32).eval()


def random_prompts(seed: int, lengths, vocab: int = 256) -> list[list[int]]:
    """Token id lists of the given lengths (ids 3.. so no pad/eos/bos)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, size=n).tolist() for n in lengths]


def left_padded(prompts) -> tuple[np.ndarray, np.ndarray]:
    """``tokens, positions [B, S]`` int32 of token id lists: each row right-aligned, padding id 0 at position -1."""
    width = max(map(len, prompts))
    tokens = np.zeros((len(prompts), width), np.int32)
    positions = np.full((len(prompts), width), -1, np.int32)
    for row, ids in enumerate(prompts):
        tokens[row, width - len(ids):] = ids
        positions[row, width - len(ids):] = np.arange(len(ids))
    return tokens, positions


def add_byte_tokenizer(directory: Path) -> Path:
    """Save a byte-level tokenizer into a checkpoint directory (ids 3..255 are bytes 0..252; 0, 1, 2 are pad,
    EOS and BOS, as the tiny configs say); returns the directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = bytes_to_unicode()
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, **{chars[b]: b + 3 for b in range(253)}}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>",
                            pad_token="<pad>").save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_with_tokenizer(tiny_gqa, tmp_path_factory) -> Path:
    """A copy of the grouped-query tiny checkpoint with a byte-level tokenizer (read-only: tests damage copies)."""
    import shutil

    return add_byte_tokenizer(Path(shutil.copytree(tiny_gqa[1], tmp_path_factory.mktemp("tok") / "tiny")))
