"""Random checkpoints in the real shapes of a config, written straight to disk, for streaming benchmarks.

:func:`write_random_checkpoint` writes a Hugging Face directory (``config.json``,
sharded ``*.safetensors`` and ``model.safetensors.index.json``) that both
mtijax and ``transformers`` read, without ever holding more than one shard's
header in memory: every tensor is filled from one pool of random values
(normal, std ``scale``) starting at a random offset, so tens of gigabytes are
written at disk speed.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np

from mtijax.config import FULL, SLIDING, Gemma3Config, ModelConfig, OlmoeConfig
from mtijax.models.decoder import family
from mtijax.weights.loader import numpy_dtype
from mtijax.weights.names import slots

_SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16"}
POOL_VALUES = 1 << 24


def _number(value: float) -> int | float:
    """An integral float as an int (transformers' config validation wants ``query_pre_attn_scalar: int``)."""
    return int(value) if float(value).is_integer() else value


def hf_config_dict(config: ModelConfig, dtype: str = "bfloat16") -> dict[str, Any]:
    """The ``config.json`` of ``config`` as transformers 5 writes it (``mtijax`` reads it back to ``config``)."""
    common = {"vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
              "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_layers,
              "num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads,
              "rms_norm_eps": config.rms_norm_eps, "max_position_embeddings": config.max_position_embeddings,
              "bos_token_id": config.bos_token_id, "eos_token_id": list(config.eos_token_ids),
              "pad_token_id": config.pad_token_id, "dtype": dtype}
    if isinstance(config, OlmoeConfig):
        return {**common, "architectures": ["OlmoeForCausalLM"], "model_type": "olmoe",
                "num_experts": config.num_experts, "num_experts_per_tok": config.num_experts_per_tok,
                "norm_topk_prob": config.norm_topk_prob, "clip_qkv": config.clip_qkv,
                "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_base},
                "tie_word_embeddings": config.tie_word_embeddings}
    assert isinstance(config, Gemma3Config)
    rope = lambda base, factor: ({"rope_type": "default", "rope_theta": base} if factor == 1.0 else
                                 {"rope_type": "linear", "factor": factor, "rope_theta": base})
    return {**common, "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
            "head_dim": config.head_dim, "query_pre_attn_scalar": _number(config.query_pre_attn_scalar),
            "sliding_window": config.sliding_window, "layer_types": list(config.layer_types),
            "rope_parameters": {FULL: rope(config.rope_global_base, config.rope_global_scaling),
                                SLIDING: rope(config.rope_local_base, config.rope_local_scaling)},
            "final_logit_softcapping": config.final_logit_softcap, "attn_logit_softcapping": config.attn_logit_softcap,
            "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True}


def _tensors(config: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    """``(stored name, stored shape)`` of every tensor of the checkpoint, in file order."""
    shapes = family(config).param_shapes(config)
    out = []
    for slot in slots(config, "hf"):
        shape = shapes
        for key in slot.path:
            shape = shape[key]
        shape = tuple(shape[len(slot.index):])
        if slot.transpose:
            shape = (*shape[:-2], shape[-1], shape[-2])
        out.append((slot.name if slot.name.startswith("lm_head.") else "model." + slot.name, shape))
    return out


def write_random_checkpoint(config: ModelConfig, directory: str | Path, *, dtype: str = "bfloat16",
                            shard_bytes: int = 2 * 10**9, scale: float = 0.02, seed: int = 0,
                            progress: bool = False) -> Path:
    """Write a random Hugging Face checkpoint of ``config`` into ``directory`` (created); returns it.

    Shards hold at most ``shard_bytes`` each (a tensor larger than that gets a shard of its own).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    np_dtype = numpy_dtype(dtype)
    rng = np.random.default_rng(seed)
    pool = (rng.standard_normal(POOL_VALUES, np.float32) * scale).astype(np_dtype)
    pool = np.concatenate([pool, pool])  # any window of up to POOL_VALUES values is contiguous
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in _tensors(config):
        nbytes = int(np.prod(shape)) * np_dtype.itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    weight_map = {}
    iterator = enumerate(shards)
    if progress:
        from tqdm.auto import tqdm
        iterator = tqdm(iterator, total=len(shards), desc=f"writing {directory}", unit="shard")
    for index, tensors in iterator:
        file_name = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {}, 0
        for name, shape in tensors:
            nbytes = int(np.prod(shape)) * np_dtype.itemsize
            header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = file_name
        head = json.dumps(header).encode()
        head += b" " * (-len(head) % 8)
        with open(directory / file_name, "wb") as f:
            f.write(struct.pack("<Q", len(head)) + head)
            for name, shape in tensors:
                left = int(np.prod(shape))
                while left:
                    n = min(left, POOL_VALUES)
                    start = int(rng.integers(0, POOL_VALUES))
                    f.write(pool[start:start + n].view(np.uint8))
                    left -= n
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps(hf_config_dict(config, dtype), indent=1))
    return directory
