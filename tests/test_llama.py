"""The Llama line (Llama 3, Mistral, Qwen 2, Qwen 3) agrees with transformers (CPU, float32).

Each tiny checkpoint is written by ``save_pretrained`` into several shards and read by ``mtijax.load``, the
loader every model goes through. Together they cover Llama 3.1's RoPE scaling (with an original context short
enough that its three frequency bands all occur), a Mistral sliding window shorter than the prompt,
Qwen 2's q/k/v biases with linear RoPE scaling and a tied head, and Qwen 3's per-head q/k norms with a
head_dim that is not hidden / heads.
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import mtijax
from mtijax.cli import main
from mtijax.config import config_from_hf
from mtijax.generate import Sampling
from mtijax.patching import KVPatch, Plan, SitePatch, generate_patched
from tests.conftest import random_prompts, tree_checksums, write_checkpoint

COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=96, max_position_embeddings=256,
              bos_token_id=2, eos_token_id=1, pad_token_id=0)
VARIANTS = {
    "llama3": ("LlamaForCausalLM", "LlamaConfig", dict(
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        rope_parameters={"rope_type": "llama3", "rope_theta": 10_000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
    "mistral": ("MistralForCausalLM", "MistralConfig", dict(
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=5)),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", dict(
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
        rope_parameters={"rope_type": "linear", "rope_theta": 1_000_000.0, "factor": 2.0})),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", dict(
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32)),
}
PROMPT_LENGTH = 13  # longer than Mistral's window of 5


def make_model(variant: str, seed: int = 0):
    """A random transformers model of ``variant``, weights drawn wide enough that every parameter matters."""
    import transformers

    model_class, config_class, extra = VARIANTS[variant]
    torch.manual_seed(seed)
    config = getattr(transformers, config_class)(**COMMON, **extra)
    model = getattr(transformers, model_class)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif "embed" in name:
                p.normal_(0.0, 0.5 if config.tie_word_embeddings else 0.05)
            else:
                p.normal_(0.0, 0.3)
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """``get(variant) -> (hf_model, directory, mtijax.Model)``, each built once, on first use."""
    built: dict[str, tuple] = {}

    def get(variant: str):
        if variant not in built:
            hf = make_model(variant)
            directory = write_checkpoint(hf, tmp_path_factory.mktemp(f"llama-{variant}"))
            built[variant] = hf, directory, mtijax.load(directory, progress=False)
        return built[variant]

    return get


def test_each_model_type_reads_its_variant(checkpoints):
    configs = {v: checkpoints(v)[2].config for v in VARIANTS}
    assert {c.architecture for c in configs.values()} == {"llama"}
    assert configs["llama3"].rope_type == "llama3" and configs["llama3"].rope_original_max_position == 32
    assert configs["mistral"].sliding_window == 5 and set(configs["mistral"].layer_types) == {"sliding_attention"}
    assert configs["qwen2"].qkv_bias and not configs["qwen2"].o_bias and configs["qwen2"].tie_word_embeddings
    assert configs["qwen3"].qk_norm and configs["qwen3"].head_dim == 32
    qwen2 = checkpoints("qwen2")[2].params
    assert "unembed" not in qwen2 and "q_bias" in qwen2["layers"]["attn"]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_match_transformers(checkpoints, variant):
    hf, _, model = checkpoints(variant)
    tokens = np.array(random_prompts(1, [PROMPT_LENGTH, PROMPT_LENGTH]))
    with torch.no_grad():
        expected = hf(torch.tensor(tokens)).logits.numpy()
    got = np.asarray(mtijax.forward(model.config, model.params, jnp.asarray(tokens)).logits)
    assert np.abs(expected).max() > 1.0, "the reference logits should not be near zero"
    np.testing.assert_allclose(got, expected, atol=2e-4 * np.abs(expected).max(), rtol=0)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_greedy_generation_matches_transformers(checkpoints, variant):
    hf, _, model = checkpoints(variant)
    prompt = random_prompts(2, [PROMPT_LENGTH - 4])[0]
    with torch.no_grad():
        expected = hf.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False,
                               eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    got = mtijax.generate(model.config, model.params, [prompt], 10, stop_ids=()).tokens[0].tolist()
    assert got == expected
    assert len(set(expected)) > 2, "the reference continuation should not be degenerate"


def test_patch_cli_runs_on_mistral(checkpoints, capsys):
    _, directory, model = checkpoints("mistral")
    before = tree_checksums(directory)
    source, target = random_prompts(4, [PROMPT_LENGTH, 9])
    status = main(["patch", "--model", str(directory), "--source-ids", ",".join(map(str, source)),
                   "--target-ids", ",".join(map(str, target)), "--resid-layers", "1", "--v-layers", "0",
                   "--max-new-tokens", "5", "--seed", "3", "--json"])
    out, err = capsys.readouterr()
    assert status == 0, err
    result = json.loads(out)
    plan = Plan((SitePatch("resid_pre", (1,)), SitePatch("attn_v", (0,))), KVPatch("last_min"), "refeed")
    expected = generate_patched(model.config, model.params, target, source, plan, seeds=[3], max_new_tokens=5,
                                sampling=Sampling(0.8))
    assert result["patched"]["ids"] == expected.ids(0)
    assert tree_checksums(directory) == before



@pytest.mark.parametrize("fields, window, layer_types", [
    ({"model_type": "mistral", "sliding_window": None}, None, ("full_attention",) * 4),
    ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 8, "max_window_layers": 2}, 8,
     ("full_attention",) * 2 + ("sliding_attention",) * 2),
    ({"model_type": "qwen3", "use_sliding_window": False, "sliding_window": 8}, None, ("full_attention",) * 4),
])
def test_the_window_follows_each_model_types_rule(fields, window, layer_types):
    config = config_from_hf({**COMMON, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
                             **fields})
    assert (config.sliding_window, config.layer_types) == (window, layer_types)


@pytest.mark.parametrize("fields, named", [
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "RoPE type 'yarn'"),
    ({"num_key_value_heads": 3}, "3 kv heads"),
])
def test_an_unsupported_config_is_named(fields, named):
    with pytest.raises(mtijax.MtijaxError, match=f"^llama/config.json: .*{named}"):
        config_from_hf({**COMMON, "model_type": "llama", "num_attention_heads": 4, **fields}, "llama/config.json")
