"""Every pair of techniques in one generation call, checked against a reference built another way.

The techniques: injection (params -> params), static patches (every call), persistent step patches
(a value per decode call), fusion layers (grafts with a carry) and the spiking gate (a router hook
with membranes). The reference of a greedy generation is teacher forcing: one full forward over the
prompt and the generated tokens, with the same interventions laid out per position, whose argmax at
every generated position must be the generated token. (Pairs with streaming are in
``tests/test_streaming*.py``: streamed runs equal resident runs.)
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtijax
from mtijax import fusion as fusion_lib
from mtijax.config import Gemma3Config, OlmoeConfig
from mtijax.engine import Interventions, StepPatch
from mtijax.fusion.decode import grafts
from mtijax.interventions import Patch
from mtijax.snn.gate import spiking_gate

TECHNIQUES = ("inject", "patch", "step_patch", "fusion", "gate")
NEW = 6
GEMMA = Gemma3Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=2,
                     num_kv_heads=1, head_dim=16, query_pre_attn_scalar=16, sliding_window=4,
                     layer_types=("sliding_attention", "sliding_attention", "full_attention"),
                     eos_token_ids=(1,))
OLMOE = OlmoeConfig(vocab_size=128, hidden_size=32, intermediate_size=16, num_layers=3, num_heads=4,
                    num_kv_heads=2, num_experts=8, num_experts_per_tok=2, eos_token_ids=(1,))
PROMPT = [5, 17, 9, 44, 3, 81, 12]


def params_of(config, seed: int):
    return mtijax.init_params(config, jax.random.key(seed), scale=0.6)


def fusion_of(config):
    fusion = fusion_lib.for_model(config, "standard", mode="parallel")
    variables = fusion_lib.init_fusion(fusion, config, jax.random.key(7))
    variables = jax.tree.map(lambda v: v * 4 if v.ndim >= 2 else v, variables)  # a branch strong enough to matter
    return fusion, variables


class Composed:
    """One combination of techniques, usable both by the engine and by a full forward."""

    def __init__(self, config, chosen: tuple[str, ...]):
        self.config, self.chosen = config, chosen
        d, n = config.hidden_size, config.num_layers
        rng = np.random.default_rng(3)
        self.params = params_of(config, 0)
        if "inject" in chosen:
            spec = mtijax.InjectionSpec(tensors=("attn/*",), layers=(1,))
            self.params = mtijax.inject(self.params, params_of(config, 1), spec, 0.7)
        self.steer = jnp.asarray(rng.normal(size=(n, 1, 1, d)) * 3, jnp.float32)
        self.steer_mask = jnp.asarray([0.0, 1.0, 0.0])
        self.step_values = jnp.asarray(rng.normal(size=(n, 1, NEW, d)) * 3, jnp.float32)
        self.step_mask = jnp.asarray([1.0, 0.0, 1.0])
        self.fusion = fusion_of(config) if "fusion" in chosen else None
        self.gate = spiking_gate(config) if "gate" in chosen else None

    def interventions(self) -> Interventions:
        patches, step, graft = {}, {}, {}
        if "patch" in self.chosen:
            patches["resid_mid"] = Patch(self.steer, self.steer_mask, "add")
        if "step_patch" in self.chosen:
            step["resid_post"] = StepPatch(self.step_values, jnp.ones((NEW,)), self.step_mask, "replace")
        if self.fusion is not None:
            graft = grafts(*self.fusion)
        return Interventions(patches=patches, step_patches=step, grafts=graft, router=self.gate)

    def teacher_forced_argmax(self, text: list[int]) -> np.ndarray:
        """Argmax of one full forward over ``text`` with the same interventions at every position."""
        s = len(text)
        tokens = jnp.asarray([text], jnp.int32)
        patches = {}
        if "patch" in self.chosen:
            patches["resid_mid"] = Patch(self.steer, self.steer_mask, "add")
        if "step_patch" in self.chosen:  # decode call t feeds position len(PROMPT) - 1 + t
            first = len(PROMPT) - 1
            values = jnp.zeros((self.config.num_layers, 1, s, self.config.hidden_size))
            values = values.at[:, :, first:first + NEW].set(self.step_values[:, :, :s - first])
            at = jnp.zeros((s,)).at[first:].set(1.0)
            patches["resid_post"] = Patch(values, self.step_mask[:, None, None] * at[None, None, :], "replace")
        if self.fusion is not None:
            out = fusion_lib.fused_forward(self.config, self.params, *self.fusion, tokens, patches=patches,
                                           router=self.gate)
        else:
            out = mtijax.forward(self.config, self.params, tokens, patches=patches, router=self.gate)
        return np.argmax(np.asarray(out.logits[0]), axis=-1)


PAIRS = [pair for pair in itertools.combinations(TECHNIQUES, 2)]


@pytest.mark.parametrize("pair", PAIRS, ids=["+".join(p) for p in PAIRS])
def test_pair_in_one_generation_equals_the_teacher_forced_full_forward(pair):
    config = OLMOE if "gate" in pair else GEMMA
    composed = Composed(config, pair)
    gen = mtijax.generate(config, composed.params, [PROMPT], NEW, stop_ids=(), interventions=composed.interventions())
    text = PROMPT + gen.ids(0)
    want = composed.teacher_forced_argmax(text[:-1])[len(PROMPT) - 1:]
    np.testing.assert_array_equal(gen.ids(0), want)
    plain = mtijax.generate(config, params_of(config, 0), [PROMPT], NEW, stop_ids=())
    assert plain.ids(0) != gen.ids(0), f"{pair} must change the continuation (or this test cannot fail)"
