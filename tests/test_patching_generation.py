"""Generation with KV-cache replacement and persistent patches (``generate_patched``).

References: plain generation (``mtijax.generate``), the source's own
generation, a cache-free forward over the whole sequence, and what a patch at
the last layer's residual stream must do (its logits *are* the source's).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtijax.api import load
from mtijax.engine import Interventions
from mtijax.errors import MtijaxError
from mtijax.fusion import FusionConfig, FusionLayer, LayerCarry, init_fusion
from mtijax.fusion.decode import grafts
from mtijax.generate import Sampling, generate
from mtijax.interventions import Patch
from mtijax.models.decoder import forward, unembed
from mtijax.patching import KVPatch, Plan, SitePatch, capture, generate_patched
from tests.conftest import random_prompts

SAMPLED = Sampling(temperature=0.9)


@pytest.fixture(scope="module")
def model(tiny_gqa):
    return load(tiny_gqa[1], progress=False)


@pytest.fixture(scope="module")
def prompts():
    """A 10-token target, a 13-token source, and a 10-token source ending in the target's last token."""
    target, source, same = random_prompts(51, [10, 13, 10])
    same[-1] = target[-1]
    return target, source, same


def last_layer(model, decode, prompt=None):
    """A plan patching the residual stream leaving the last layer: its logits are unembed(source value)."""
    return Plan((SitePatch("resid_post", (model.config.num_layers - 1,), prompt=prompt, decode=decode),))


N = 8
"""New tokens in every test (one compiled step shape; prompts of 10-13 tokens share one bucket)."""


def test_without_a_plan_it_is_plain_generation_and_the_trace_is_each_calls_activations(model, prompts):
    """No plan: the tokens of ``mtijax.generate`` and, as call 0's logits, the prompt's next-token logits. The trace
    at call t is the activation of the token fed at t, as a cache-free forward over the whole sequence has it."""
    target, _, _ = prompts
    c = model.config
    ours = generate_patched(c, model.params, target, max_new_tokens=N, stop_ids=(), trace={"attn_v": (0, 3)})
    np.testing.assert_array_equal(ours.tokens[0], generate(c, model.params, [target], N, stop_ids=()).tokens[0])
    full = forward(c, model.params, jnp.asarray([target])).logits[0, -1]
    np.testing.assert_allclose(ours.first_logits, full, atol=1e-5, rtol=0)
    sequence = target + ours.ids(0)[:-1]
    run = capture(c, model.params, jnp.asarray([sequence]), sites=("attn_v",), layers=(0, 3))
    np.testing.assert_allclose(ours.trace["attn_v"][:, 0], run.activations["attn_v"][:, 0, len(target) - 1:],
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("which", ["same length", "longer"])
def test_whole_cache_replacement_then_decoding_is_the_sources_decoding(model, prompts, which):
    """With every layer's cache replaced by the source's (``whole``), the target's last token (recomputed at the
    source's last position) continues exactly as the source does: the source ends in the same token."""
    target, source, same = prompts
    source = same if which == "same length" else source[:-1] + target[-1:]
    ours = generate_patched(model.config, model.params, target, source, Plan(kv=KVPatch("whole")),
                            max_new_tokens=N, stop_ids=())
    theirs = generate(model.config, model.params, [source], N, stop_ids=())
    np.testing.assert_array_equal(ours.tokens[0], theirs.tokens[0])
    full = forward(model.config, model.params, jnp.asarray([source])).logits[0, -1]
    np.testing.assert_allclose(ours.first_logits, full, atol=1e-5, rtol=0)


def hooked_plan(decode, window=16, sites=("attn_v", "resid_pre")):
    """KV (``last_min``, ``refeed``) and patches at layer 2 of the given sites: the original's set-up."""
    return Plan(tuple(SitePatch(site, (2,), decode=decode, window=window) for site in sites), KVPatch("last_min"),
                "refeed")


def test_hooks_as_the_original_ran_them_change_nothing(model, prompts):
    """The original's hooks write the last 16 positions of calls of at least 16 tokens; decode steps have one, so
    KV + hooks is KV + no patch at all, bit for bit (the same compiled function: the rule is data), and KV alone
    (sampled, three seeds). A 1-token window does fire."""
    target, source, _ = prompts

    def run(plan):
        return generate_patched(model.config, model.params, target, source, plan, seeds=[0, 1, 2], max_new_tokens=N,
                                sampling=SAMPLED, stop_ids=())

    hooked, off, alone = run(hooked_plan("hook")), run(hooked_plan(None)), run(hooked_plan(None, sites=()))
    assert np.array_equal(hooked.tokens, off.tokens) and np.array_equal(hooked.first_logits, off.first_logits)
    np.testing.assert_array_equal(hooked.tokens, alone.tokens)
    np.testing.assert_allclose(hooked.first_logits, alone.first_logits, atol=1e-5, rtol=0)
    fired = run(hooked_plan("hook", window=1))
    assert np.abs(fired.first_logits - off.first_logits).max() > 1e-3


def test_decode_sources_last_mean_and_trajectory(model, prompts):
    """Patching the last layer's output at every decode step makes each step's logits those of the source value:
    ``last`` the source's next-token logits, ``mean`` unembed(mean over the source prompt), ``trajectory`` the
    source's own step t (greedy: the target then repeats the source's tokens from step 1 on)."""
    target, source, _ = prompts
    c = model.config
    run = capture(c, model.params, jnp.asarray([source]), sites=("resid_post",))
    source_gen = generate(c, model.params, [source], N, stop_ids=())
    last = generate_patched(c, model.params, target, source, last_layer(model, "last"), max_new_tokens=N,
                            stop_ids=())
    assert set(last.tokens[0, 1:]) == {int(np.argmax(run.logits[0, -1]))}
    mean_logits = unembed(c, model.params, run.activations["resid_post"][-1, 0].mean(0))
    mean = generate_patched(c, model.params, target, source, last_layer(model, "mean"), max_new_tokens=N,
                            stop_ids=())
    assert set(mean.tokens[0, 1:]) == {int(np.argmax(mean_logits))}
    lockstep = generate_patched(c, model.params, target, source, last_layer(model, "trajectory"),
                                max_new_tokens=N, stop_ids=())
    np.testing.assert_array_equal(lockstep.tokens[0, 1:], source_gen.tokens[0, 1:])
    assert lockstep.tokens[0, 0] != source_gen.tokens[0, 0], "call 0 is the target's own (a prompt call)"


def test_the_recomputed_last_prompt_token_follows_the_prompt_rule(model, prompts):
    """With ``prompt="last"`` the prefill and the recomputed last prompt token are patched (end-aligned: the
    source's last token), so the first-token logits are the source's; decode steps are left alone."""
    target, source, _ = prompts
    c = model.config
    gen = generate_patched(c, model.params, target, source, last_layer(model, None, prompt="last"),
                           max_new_tokens=N, stop_ids=())
    full = forward(c, model.params, jnp.asarray([source])).logits[0, -1]
    np.testing.assert_allclose(gen.first_logits, full, atol=1e-5, rtol=0)


def test_rows_are_seeded_runs_and_a_sweep_is_a_batch_of_single_runs(model, prompts):
    """Row r samples with seed r (two rows with one seed agree, another differs); a vmapped sweep over layer
    masks gives each mask's run."""
    target, source, _ = prompts
    c = model.config
    plan = hooked_plan("mean")
    rows = generate_patched(c, model.params, target, source, plan, seeds=[3, 4, 3], max_new_tokens=N,
                            sampling=SAMPLED, stop_ids=())
    np.testing.assert_array_equal(rows.tokens[0], rows.tokens[2])
    assert not np.array_equal(rows.tokens[0], rows.tokens[1])
    masks = {"attn_v": np.eye(c.num_layers, dtype=np.float32)[[2, 0, 1]],
             "kv": np.ones((3, c.num_layers), np.float32)}
    swept = generate_patched(c, model.params, target, source, plan, seeds=[3, 4, 3], max_new_tokens=N,
                             sampling=SAMPLED, stop_ids=(), sweep=masks)
    assert swept.tokens.shape == (3, 3, N) and swept.first_logits.shape == (3, c.vocab_size)
    np.testing.assert_array_equal(swept.tokens[0], rows.tokens)
    np.testing.assert_allclose(swept.first_logits[0], rows.first_logits, atol=1e-5, rtol=0)
    assert swept.ids(0, 1) == rows.ids(1)
    assert np.abs(swept.first_logits[1] - rows.first_logits).max() > 1e-4, "another layer, another run"


def test_extra_interventions_compose_with_the_plan_a_fusion_graft(model, prompts):
    """With a fusion layer (its Kuramoto carry and SMF memory) grafted after block 1 (``mtijax.fusion.decode.grafts``), the source is captured under
    the graft too, and every decode step of the target (``refeed``: call 0 is one) blends the last layer's
    output half-way with the source's: exactly what a cache-free forward of the grafted model over the whole
    sequence with that blend gives."""
    target, source, _ = prompts
    c = model.config
    fusion = FusionConfig(positions=(1,), components=("kuramoto", "smf"), mode="residual", alpha=0.5,
                          max_positions=64, smf_slots=8)  # the components with a carry and a memory
    variables = init_fusion(fusion, c, jax.random.key(0))
    last = c.num_layers - 1
    plan = Plan((SitePatch("resid_post", (last,), decode="last", mode="interpolate", coef=0.5),),
                first_token="refeed")
    gen = generate_patched(c, model.params, target, source, plan, max_new_tokens=N, stop_ids=(),
                           interventions=Interventions(grafts=grafts(fusion, variables)))

    collections = {"params": variables["params"]["layers"]["1"], "memory": variables["memory"]["layers"]["1"]}
    graft = {1: lambda h, positions: FusionLayer(fusion).apply(collections, h, positions,
                                                              LayerCarry.empty(fusion, 1))[0]}
    sequence, n = target + target[-1:] + gen.ids(0)[:-1], len(target)
    blend = np.zeros((c.num_layers, 1, len(sequence)), np.float32)
    blend[last, 0, n:] = 0.5

    def reference(transforms):
        value = forward(c, model.params, jnp.asarray([source]), transforms=transforms,
                        capture=("resid_post",)).captured["resid_post"][:, :, -1:]
        return forward(c, model.params, jnp.asarray([sequence]), transforms=transforms,
                       patches={"resid_post": Patch(value, jnp.asarray(blend))}).logits[0, n:]

    fused = reference(graft)
    np.testing.assert_allclose(gen.first_logits, fused[0], atol=1e-4, rtol=0)
    np.testing.assert_array_equal(gen.tokens[0], np.argmax(fused, -1))
    assert np.abs(gen.first_logits - reference({})[0]).max() > 1e-2, "the graft must matter"


def test_bad_plans_are_clear_errors(model, prompts):
    target, source, _ = prompts
    c = model.config
    cases = [
        (Plan((SitePatch("attn_v", (9,)),)), "layer 9 is out of range"),
        (Plan((SitePatch("mlp_in", (0,)),)), "has no activation site 'mlp_in'"),
        (Plan((SitePatch("attn_v", (0,), decode="first"),)), "unknown decode source"),
        (Plan((SitePatch("attn_v", (0,)), SitePatch("attn_v", (1,)))), "two patches at site 'attn_v'"),
        (Plan(kv=KVPatch("all")), "unknown KV policy"),
        (Plan(first_token="skip"), "unknown first-token rule"),
        (Plan((SitePatch("attn_v", (0,), prompt=("last", 11)),)), "outside the prompt"),
        (Plan(kv=KVPatch("whole", layers=(0, 1))), "same length"),
    ]
    for plan, message in cases:
        with pytest.raises(MtijaxError, match=message):
            generate_patched(c, model.params, target, source, plan, max_new_tokens=2)
    with pytest.raises(MtijaxError, match="give one"):
        generate_patched(c, model.params, target, None, Plan(kv=KVPatch()), max_new_tokens=2)
    with pytest.raises(MtijaxError, match="sweep masks must all be"):
        generate_patched(c, model.params, target, source, Plan(kv=KVPatch()), max_new_tokens=2,
                         sweep={"kv": np.ones((2, 3))})
    with pytest.raises(MtijaxError, match="out of range"):
        generate_patched(c, model.params, [5, 999], max_new_tokens=2)
