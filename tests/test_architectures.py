"""The architecture records: one per family, each complete and consistent with itself."""

from __future__ import annotations

import dataclasses
import math

import jax
import pytest

import mtijax
from mtijax.interventions import ROUTING, SITES, check_sites
from mtijax.models.architecture import AXES
from mtijax.models.architectures import ARCHITECTURES, PRESETS, architecture, architecture_named

CONFIGS = {name: config for name, config in PRESETS.items()}
CONFIGS["llama-qwen2-flags"] = dataclasses.replace(PRESETS["llama3.1-8b"], qkv_bias=True, o_bias=True, qk_norm=True,
                                                   tie_word_embeddings=True)
CONFIGS["olmoe-tied"] = dataclasses.replace(PRESETS["olmoe-1b-7b"], tie_word_embeddings=True)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_param_axes_name_every_dimension_of_every_param(name):
    config = CONFIGS[name]
    arch = architecture(config)
    is_shape = lambda x: isinstance(x, tuple)
    shapes, axes = arch.param_shapes(config), arch.param_axes(config)
    assert jax.tree.structure(shapes, is_leaf=is_shape) == jax.tree.structure(axes, is_leaf=is_shape)
    sizes = {"vocab": config.vocab_size, "embed": config.hidden_size, "layers": config.num_layers,
             "heads": config.num_heads * config.head_dim, "kv_heads": config.num_kv_heads * config.head_dim,
             "head_dim": config.head_dim, "mlp": config.intermediate_size, "experts": getattr(config, "num_experts", 0)}
    for shape, names in zip(jax.tree.leaves(shapes, is_leaf=is_shape), jax.tree.leaves(axes, is_leaf=is_shape)):
        assert set(names) <= set(AXES) and len(names) == len(shape)
        assert tuple(sizes[n] for n in names) == tuple(shape), (shape, names)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_a_checkpoint_fills_every_param_exactly(name):
    """The Hugging Face (and GGUF, where read) tensor lists cover the params pytree, each leaf entry once."""
    config = CONFIGS[name]
    arch = architecture(config)
    shapes = arch.param_shapes(config)
    for fmt in ("hf", "gguf") if arch.gguf_tensors else ("hf",):
        filled: dict[tuple, int] = {}
        for slot in arch.tensors(config, fmt):
            leaf = shapes
            for key in slot.path:
                leaf = leaf[key]
            filled[slot.path] = filled.get(slot.path, 0) + math.prod(leaf[len(slot.index):])
        flat = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))[0]
        want = {tuple(k.key for k in path): math.prod(shape) for path, shape in flat}
        assert filled == want, fmt


def test_the_registry_answers_by_config_and_by_name():
    assert set(ARCHITECTURES) == {"gemma3", "olmoe", "llama"}
    for name, arch in ARCHITECTURES.items():
        assert architecture_named(name) is arch and arch.name == name
    assert mtijax.family(PRESETS["mistral-7b-v0.1"]) is ARCHITECTURES["llama"]
    odd = dataclasses.replace(PRESETS["gemma3-1b"], architecture="falcon")
    with pytest.raises(mtijax.MtijaxError, match="unknown architecture 'falcon'"):
        mtijax.family(odd)


def test_the_global_site_lists_are_the_union_of_the_records():
    assert set(SITES) | set(ROUTING) == {s for arch in ARCHITECTURES.values() for s in arch.sites}
    assert set(ROUTING) == set(ARCHITECTURES["olmoe"].capture_only)
    assert SITES.index("router_logits") == SITES.index("resid_mid") + 1  # block order survives the merge
    with pytest.raises(mtijax.MtijaxError, match="can be captured but not patched"):
        check_sites(["router_experts"], patching=True)


def test_a_site_of_another_family_is_refused_by_the_forward():
    config = mtijax.LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2,
                                num_kv_heads=1, head_dim=4, sliding_window=4)
    params = mtijax.init_params(config, jax.random.key(0))
    with pytest.raises(mtijax.MtijaxError, match="llama has no activation site 'router_logits'"):
        mtijax.forward(config, params, jax.numpy.zeros((1, 2), jax.numpy.int32), capture=("router_logits",))
