"""Injection (seed 000): blend a resized teacher tensor into a student, and measure how the output moves.

``inject(student, teacher, spec, alpha)`` sets, for each tensor and layer the
spec names, ``W = (1 - alpha) * W_student + alpha * resize(W_teacher)``; the
study sweeps alpha and reports the logits' norm, L2 and KL divergence and
top-1 agreement against the un-injected student. Every number checked here
comes from PyTorch (``interpolate``, the Hugging Face weights), numpy, or
hand-written expectations, never from the code under test.

The student is the tiny grouped-query checkpoint of ``conftest`` (4 layers,
hidden size 64). The main teacher is another tiny Gemma 3 with a different
hidden size, head size, MLP width *and* depth (6 layers), so every injected
tensor is resized along both axes; the "twin" has the student's shapes and
other weights, for exact alpha = 1 checks.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mtijax
from mtijax.cli import main
from mtijax.errors import MtijaxError
from mtijax.generate import pad_prompts
from mtijax.injection.blend import InjectionSpec, inject, plan
from mtijax.injection.integrity import probe, snapshot, verify
from mtijax.injection.resize import resize
from mtijax.injection.study import Study, _sweep_logits, run_study, verdict, write_outputs
from mtijax.metrics import linear_fit, power_exponent
from mtijax.models.decoder import forward
from tests.conftest import make_hf_model, tree_checksums, write_checkpoint
from tests.olmoe_fixtures import make_olmoe_model

PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12]]
ALPHAS = [0.0, 0.05, 0.1, 0.2, 0.35, 0.5]
"""The CLI's default sweep."""
STUDY_SPEC = InjectionSpec(("attn/q_proj", "mlp/*"), (0, 3))
"""Four tensors in two student layers; by relative depth these take the teacher's layers 0 and 5."""


def make_teacher():
    """A random Gemma 3 of another shape: hidden 96 (not 64), head size 24 (not 16), MLP 160 (not 128),
    6 layers (not 4)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(1)
    config = Gemma3TextConfig(vocab_size=256, hidden_size=96, intermediate_size=160, max_position_embeddings=512,
                              pad_token_id=0, bos_token_id=2, eos_token_id=1, num_hidden_layers=6,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=24, sliding_window=6,
                              sliding_window_pattern=3)
    model = Gemma3ForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    return model


@pytest.fixture(scope="module")
def student(tiny_gqa):
    """The tiny grouped-query checkpoint loaded by mtijax: ``(hf_model, directory, Model)``."""
    return tiny_gqa[0], tiny_gqa[1], mtijax.load(tiny_gqa[1], progress=False)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """The differently shaped teacher, written multi-shard by transformers: ``(hf_model, directory, Model)``."""
    hf = make_teacher()
    directory = write_checkpoint(hf, tmp_path_factory.mktemp("teacher"))
    return hf, directory, mtijax.load(directory, progress=False)


@pytest.fixture(scope="module")
def twin(tmp_path_factory):
    """A teacher of the student's own shapes and other weights: ``(hf_model, directory, Model)``."""
    hf = make_hf_model("gqa", seed=1)
    directory = write_checkpoint(hf, tmp_path_factory.mktemp("twin"))
    return hf, directory, mtijax.load(directory, progress=False)


@pytest.fixture(scope="module")
def olmoe_dir(tmp_path_factory) -> Path:
    """A tiny OLMoE checkpoint written by transformers (a teacher of the wrong architecture)."""
    return write_checkpoint(make_olmoe_model("e8_top1_gqa"), tmp_path_factory.mktemp("olmoe"))


def hf_matrix(hf_model, layer: int, module: str) -> np.ndarray:
    """``model.layers[layer].<module>.weight`` of a transformers model, transposed to mtijax's ``[in, out]``."""
    weight = hf_model.model.layers[layer].get_submodule(module).weight
    return weight.detach().numpy().T


def by_path(params) -> dict[str, jax.Array]:
    """Every leaf of a params pytree by its ``/``-joined path (``"layers/attn/q_proj"``, ``"embed"``)."""
    return {"/".join(k.key for k in path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}


def final_logits(model, params, prompt: list[int]) -> np.ndarray:
    """Final-position logits of one unpadded prompt (float64 numpy)."""
    return np.asarray(forward(model.config, params, jnp.asarray([prompt])).logits[0, -1], np.float64)


def torch_interpolate(x: np.ndarray, size: tuple[int, ...], mode: str, align_corners: bool | None = None):
    """``torch.nn.functional.interpolate`` of a matrix or vector (as one channel of a batch of one)."""
    out = F.interpolate(torch.from_numpy(np.array(x))[None, None], size=size, mode=mode, align_corners=align_corners)
    return out[0, 0].numpy()


# --- inject ----------------------------------------------------------------------------------------------------

def test_alpha_zero_gives_the_students_logits_bit_for_bit(student, teacher):
    """Even with every layer tensor of every layer blended toward a teacher of other width and depth."""
    s, t = student[2], teacher[2]
    spec = InjectionSpec(("*",), (0, 1, 2, 3))
    tokens = jnp.asarray(PROMPTS[:1])
    injected = forward(s.config, inject(s.params, t.params, spec, 0.0), tokens).logits
    assert np.array_equal(np.asarray(injected), np.asarray(forward(s.config, s.params, tokens).logits))


def test_alpha_one_with_equal_shapes_gives_the_teachers_tensor_exactly(student, twin):
    """Student layer 1 takes the twin's layer 2; the other layers keep the student's own (Hugging Face weights)."""
    s, t = student[2], twin[2]
    spec = InjectionSpec(("attn/q_proj", "mlp/down_proj"), (1,), (2,))
    injected = inject(s.params, t.params, spec, 1.0)["layers"]
    for tensor, module in [("attn/q_proj", "self_attn.q_proj"), ("mlp/down_proj", "mlp.down_proj")]:
        blended = np.asarray(injected[tensor.split("/")[0]][tensor.split("/")[1]])
        assert np.array_equal(blended[1], hf_matrix(twin[0], 2, module))
        for layer in (0, 2, 3):
            assert np.array_equal(blended[layer], hf_matrix(student[0], layer, module))


@pytest.mark.parametrize("alpha", [0.3, 1.0])
def test_a_differently_shaped_teacher_is_blended_after_a_bilinear_resize(student, teacher, alpha):
    """Student layer 0 <- teacher layer 4: the teacher's [96, 96] q_proj resized to [64, 64] as torch does."""
    s, t = student[2], teacher[2]
    injected = inject(s.params, t.params, InjectionSpec(("attn/q_proj",), (0,), (4,)), alpha)
    resized = torch_interpolate(hf_matrix(teacher[0], 4, "self_attn.q_proj"), (64, 64), "bilinear", False)
    expected = (1 - alpha) * hf_matrix(student[0], 0, "self_attn.q_proj") + alpha * resized
    np.testing.assert_allclose(np.asarray(injected["layers"]["attn"]["q_proj"][0]), expected, rtol=0, atol=1e-6)


def test_alpha_zero_keeps_the_students_bits_whatever_the_teacher_holds(student, twin):
    """Not ``1 * W + 0 * T``: that turns a -0.0 weight into +0.0, and a NaN in the teacher into NaN."""
    def with_q_proj(params, q_proj):
        return {**params, "layers": {**params["layers"], "attn": {**params["layers"]["attn"], "q_proj": q_proj}}}

    s, t = student[2], twin[2]
    q_student = s.params["layers"]["attn"]["q_proj"].at[1, 0, :4].set(-0.0)
    q_teacher = t.params["layers"]["attn"]["q_proj"].at[2, 5, 7].set(jnp.nan)
    injected = inject(with_q_proj(s.params, q_student), with_q_proj(t.params, q_teacher),
                      InjectionSpec(("attn/q_proj",), (1,), (2,)), 0.0)
    bits = np.asarray(injected["layers"]["attn"]["q_proj"]).view(np.uint32)
    assert np.array_equal(bits, np.asarray(q_student).view(np.uint32))


def test_tensors_outside_the_spec_are_the_very_same_objects(student, teacher):
    s, t = student[2], teacher[2]
    before = by_path(s.params)
    after = by_path(inject(s.params, t.params, InjectionSpec(("attn/q_proj", "mlp/up_proj"), (2,)), 0.5))
    assert after.keys() == before.keys()
    changed = {path for path in after if after[path] is not before[path]}
    assert changed == {"layers/attn/q_proj", "layers/mlp/up_proj"}


def test_the_student_pytree_is_not_mutated(student, teacher):
    s, t = student[2], teacher[2]
    leaves = by_path(s.params)
    values = {path: np.array(leaf) for path, leaf in leaves.items()}
    inject(s.params, t.params, InjectionSpec(("*",), (0, 3)), 0.7)
    assert by_path(s.params).keys() == leaves.keys()
    for path, leaf in by_path(s.params).items():
        assert leaf is leaves[path], path
        assert np.array_equal(np.asarray(leaf), values[path]), path


# --- resize ----------------------------------------------------------------------------------------------------

SHAPES = [((5, 7), (9, 11)), ((9, 11), (4, 3)), ((6, 8), (10, 3)), ((6, 8), (2, 13)), ((1, 5), (3, 5)),
          ((4, 6), (1, 1))]
SHAPE_IDS = ["up-both", "down-both", "up-down", "down-up", "from-one-row", "to-one-value"]


@pytest.mark.parametrize("align_corners", [False, True], ids=["half-pixel", "align-corners"])
@pytest.mark.parametrize("source, target", SHAPES, ids=SHAPE_IDS)
def test_bilinear_matches_torch(source, target, align_corners):
    x = np.random.default_rng(0).standard_normal(source).astype(np.float32)
    got = np.asarray(resize(jnp.asarray(x), target, "bilinear", align_corners))
    np.testing.assert_allclose(got, torch_interpolate(x, target, "bilinear", align_corners), rtol=0, atol=1e-6)


@pytest.mark.parametrize("align_corners", [False, True], ids=["half-pixel", "align-corners"])
@pytest.mark.parametrize("source, target", [(7, 12), (12, 5)], ids=["up", "down"])
def test_a_vector_is_resized_linearly_as_torch_does(source, target, align_corners):
    """Norm weights are vectors: ``bilinear`` on a rank-1 tensor is torch's ``linear``."""
    x = np.random.default_rng(1).standard_normal(source).astype(np.float32)
    got = np.asarray(resize(jnp.asarray(x), (target,), "bilinear", align_corners))
    np.testing.assert_allclose(got, torch_interpolate(x, (target,), "linear", align_corners), rtol=0, atol=1e-6)


@pytest.mark.parametrize("source, target", SHAPES, ids=SHAPE_IDS)
def test_nearest_matches_torch_exactly(source, target):
    x = np.random.default_rng(2).standard_normal(source).astype(np.float32)
    got = np.asarray(resize(jnp.asarray(x), target, "nearest"))
    assert np.array_equal(got, torch_interpolate(x, target, "nearest"))


@pytest.mark.parametrize("target", [(3, 9), (8, 4)], ids=["truncate-rows-pad-columns", "pad-rows-truncate-columns"])
def test_pad_keeps_the_leading_block_and_fills_zeros(target):
    x = np.arange(1, 36, dtype=np.float32).reshape(5, 7)
    expected = np.zeros(target, np.float32)
    rows, cols = min(5, target[0]), min(7, target[1])
    expected[:rows, :cols] = x[:rows, :cols]
    assert np.array_equal(np.asarray(resize(jnp.asarray(x), target, "pad")), expected)


@pytest.mark.parametrize("method", ["bilinear", "nearest", "pad"])
@pytest.mark.parametrize("align_corners", [False, True], ids=["half-pixel", "align-corners"])
def test_resizing_to_the_same_shape_is_the_identity(method, align_corners):
    x = np.random.default_rng(3).standard_normal((6, 4)).astype(np.float32)
    assert np.array_equal(np.asarray(resize(jnp.asarray(x), (6, 4), method, align_corners)), x)


def test_a_27b_o_proj_resizes_to_the_12b_shape():
    """Gemma 3 27B's o_proj ``[4096, 5376]`` to 12B's ``[4096, 3840]``: float32 values in [0, 1.4), checked
    against torch on the first and last rows."""
    x = jnp.arange(4096 * 5376, dtype=jnp.float32).reshape(4096, 5376) / 2.0**24
    y = resize(x, (4096, 3840))
    assert y.shape == (4096, 3840) and y.dtype == jnp.float32
    for rows in (slice(0, 3), slice(4093, 4096)):
        expected = torch_interpolate(np.asarray(x[rows]), (3, 3840), "bilinear", False)
        np.testing.assert_allclose(np.asarray(y[rows]), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape, method, named", [
    ((4,), "bilinear", "rank-2"),
    ((2, 3, 4), "nearest", "rank 3"),
    ((4, 4), "bicubic", "'bicubic'"),
], ids=["rank-down", "rank-up", "unknown-method"])
def test_bad_resize_requests_raise(shape, method, named):
    with pytest.raises(MtijaxError, match=named):
        resize(jnp.zeros((3, 5)), shape, method)


# --- plan: which teacher layer feeds which student layer --------------------------------------------------------

def test_default_pairing_is_by_relative_depth(student, teacher):
    """4 student layers onto 6 teacher layers: l -> round(l * 5 / 3)."""
    triples = plan(student[2].params, teacher[2].params, InjectionSpec(("attn/q_proj",), (0, 1, 2, 3)))
    assert triples == [("attn/q_proj", 0, 0), ("attn/q_proj", 1, 2), ("attn/q_proj", 2, 3), ("attn/q_proj", 3, 5)]


def test_default_pairing_of_equal_depths_is_the_same_layer(student, twin):
    triples = plan(student[2].params, twin[2].params, InjectionSpec(("attn/k_proj",), (1, 3)))
    assert triples == [("attn/k_proj", 1, 1), ("attn/k_proj", 3, 3)]


def test_explicit_teacher_layers_and_patterns(student, teacher):
    triples = plan(student[2].params, teacher[2].params, InjectionSpec(("mlp/*",), (0, 3), (4, 1)))
    assert triples == [(f"mlp/{name}", s, t) for name in ("down_proj", "gate_proj", "up_proj")
                       for s, t in [(0, 4), (3, 1)]]


# --- the vmapped sweep -----------------------------------------------------------------------------------------

def test_the_vmapped_sweep_equals_a_loop_of_single_alpha_forwards(student, teacher):
    s, t = student[2], teacher[2]
    alphas = [0.0, 0.25, 0.5, 1.0]
    tokens, positions, _ = pad_prompts(PROMPTS, s.config.pad_token_id)
    tokens, positions = jnp.asarray(tokens), jnp.asarray(positions)
    swept, reference = _sweep_logits(s.config, STUDY_SPEC, s.params, t.params, jnp.asarray(alphas, jnp.float32),
                                     tokens, positions)
    assert swept.shape == (4, 2, 256) and reference.shape == (2, 256)
    for i, alpha in enumerate(alphas):
        one = forward(s.config, inject(s.params, t.params, STUDY_SPEC, alpha), tokens, positions).logits[:, -1]
        np.testing.assert_allclose(np.asarray(swept[i]), np.asarray(one), rtol=1e-5, atol=1e-5, err_msg=alpha)
    plain = forward(s.config, s.params, tokens, positions).logits[:, -1]
    np.testing.assert_allclose(np.asarray(reference), np.asarray(plain), rtol=1e-5, atol=1e-5)


# --- the study -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def study(student, teacher):
    """The default sweep of ``STUDY_SPEC`` over both prompts, continuing each by two tokens."""
    return run_study(student[2], teacher[2], STUDY_SPEC, ALPHAS, PROMPTS, max_new_tokens=2)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def test_study_rows_agree_with_numpy_metrics_of_unpadded_forwards(student, teacher, study):
    """Each row's means over the prompts, recomputed in float64 from each prompt's own unpadded forward."""
    s, t = student[2], teacher[2]
    reference = np.stack([final_logits(s, s.params, p) for p in PROMPTS])
    assert [row["alpha"] for row in study.rows] == ALPHAS
    for row in study.rows:
        injected = inject(s.params, t.params, STUDY_SPEC, row["alpha"])
        logits = np.stack([final_logits(s, injected, p) for p in PROMPTS])
        log_p, log_q = log_softmax(reference), log_softmax(logits)
        assert row["output_norm"] == pytest.approx(np.linalg.norm(logits, axis=-1).mean(), rel=1e-5)
        assert row["divergence"] == pytest.approx(np.linalg.norm(logits - reference, axis=-1).mean(), abs=1e-5)
        # the study's KL is float32: its log-probabilities near log(1/256) carry errors of a few 1e-7
        assert row["kl"] == pytest.approx((np.exp(log_p) * (log_p - log_q)).sum(-1).mean(), rel=1e-3, abs=1e-6)
        assert row["top1_agreement"] == (logits.argmax(-1) == reference.argmax(-1)).mean()
        # greedy: each continuation starts with its prompt's most likely next token, and runs 2 tokens
        assert [c[0] for c in row["continuations"]] == logits.argmax(-1).tolist()
        assert [len(c) for c in row["continuations"]] == [2, 2]
    assert study.rows[-1]["divergence"] > 1.0  # the sweep does move the output


def test_alpha_zero_row_is_exactly_the_student(study):
    """The reference and the sweep run in one computation, so no compiler noise shows up as divergence."""
    zero = study.rows[0]
    assert (zero["alpha"], zero["divergence"], zero["kl"], zero["top1_agreement"]) == (0.0, 0.0, 0.0, 1.0)


def test_linear_fit_of_an_exact_line():
    x = np.linspace(0.0, 1.0, 6)
    fit = linear_fit(x, 2.5 * x - 0.3)
    assert fit["slope"] == pytest.approx(2.5) and fit["intercept"] == pytest.approx(-0.3)
    assert fit["r2"] == pytest.approx(1.0, abs=1e-12)


def test_linear_fit_r2_is_the_squared_correlation():
    """For a least-squares line, R² equals Pearson's r² (numpy's corrcoef)."""
    x = np.array(ALPHAS)
    assert linear_fit(x, x**2)["r2"] == pytest.approx(np.corrcoef(x, x**2)[0, 1] ** 2, rel=1e-12)


def test_a_quadratic_response_is_not_linear():
    x = np.array(ALPHAS)
    exponent = power_exponent(x, x**2)  # alpha = 0 has no logarithm and is left out
    assert exponent == pytest.approx(2.0, abs=1e-9)
    sentence = verdict(linear_fit(x, x**2), exponent)
    assert sentence.startswith("NOT LINEAR") and "faster than linearly" in sentence


def test_a_proportional_response_is_linear():
    x = np.array(ALPHAS)
    exponent = power_exponent(x, 3 * x)
    assert exponent == pytest.approx(1.0, abs=1e-9)
    assert verdict(linear_fit(x, 3 * x), exponent).startswith("LINEAR: divergence grows linearly")


def test_a_square_root_response_is_slower_than_linear():
    x = np.array(ALPHAS)
    exponent = power_exponent(x, np.sqrt(x))
    assert exponent == pytest.approx(0.5, abs=1e-9)
    assert "NOT LINEAR: divergence grows slower than linearly" in verdict(linear_fit(x, np.sqrt(x)), exponent)


def test_without_two_moving_alphas_the_verdict_is_undetermined():
    """One alpha > 0 leaves no growth exponent: the verdict says so rather than "slower than linearly"."""
    x = np.array([0.0, 0.5])
    exponent = power_exponent(x, 2 * x)
    assert np.isnan(exponent)
    assert verdict(linear_fit(x, 2 * x), exponent).startswith("UNDETERMINED")


def test_an_undefined_exponent_is_written_as_null():
    """``to_json`` is strict JSON: no NaN token for the missing exponent."""
    study = Study([], {"slope": 2.0, "intercept": 0.0, "r2": 1.0}, float("nan"), "UNDETERMINED", {}, {})
    assert json.loads(json.dumps(study.to_json(), allow_nan=False))["exponent"] is None


def test_the_study_leaves_checkpoints_and_behaviour_untouched(student, teacher):
    """After the sweep the study reads both checkpoints again: unchanged checksums, every reloaded tensor
    equal to what was loaded before, and the probe on the reloaded student equal to numpy's norm of the
    logits of the params loaded before the study."""
    s, t = student[2], teacher[2]
    before = {d: tree_checksums(d) for d in (student[1], teacher[1])}
    result = run_study(s, t, STUDY_SPEC, ALPHAS, PROMPTS, max_new_tokens=2)
    assert {d: tree_checksums(d) for d in (student[1], teacher[1])} == before
    integrity = result.integrity
    assert integrity["ok"] is True and integrity["checksums_unchanged"] is True and integrity["arrays_unchanged"]
    assert integrity["files"] == sum(map(len, before.values()))
    assert integrity["tensors"] == len(jax.tree.leaves(s.params)) + len(jax.tree.leaves(t.params))
    assert integrity["changed_files"] == [] and integrity["changed_tensors"] == []
    assert integrity["probe_diff"] == 0.0
    assert integrity["probe_after"] == pytest.approx(np.linalg.norm(final_logits(s, s.params, PROMPTS[0])),
                                                     rel=1e-6)


def overwrite_first_value(directory: Path, tensor: str, value: float) -> None:
    """Write ``value`` (float32) over the first element of ``tensor`` in whichever shard of ``directory``
    holds it; the file keeps its size and header."""
    index = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    shard = directory / index[tensor]
    header = json.loads(shard.read_bytes()[8:8 + int.from_bytes(shard.read_bytes()[:8], "little")])
    assert header[tensor]["dtype"] == "F32"
    offset = 8 + int.from_bytes(shard.read_bytes()[:8], "little") + header[tensor]["data_offsets"][0]
    with open(shard, "r+b") as f:
        f.seek(offset)
        f.write(np.float32(value).tobytes())


def test_the_integrity_check_fails_when_a_checkpoint_file_changes(tiny_gqa, tmp_path):
    """One float of layer 0's q projection changed on disk, in a copy of the checkpoint, after the snapshot:
    that shard's checksum, that tensor and the probe on the reloaded params all report it."""
    directory = Path(shutil.copytree(tiny_gqa[1], tmp_path / "copy"))
    model = mtijax.load(directory, progress=False)
    before = snapshot(model.source, model.config, model.params)
    original = float(np.asarray(model.params["layers"]["attn"]["q_proj"])[0, 0, 0])
    overwrite_first_value(directory, "model.layers.0.self_attn.q_proj.weight", original + 1.5)

    report, reloaded = verify(before)
    shard = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"][
        "model.layers.0.self_attn.q_proj.weight"]
    assert report["ok"] is False and report["checksums_unchanged"] is False
    assert report["changed_files"] == [str(directory / shard)]
    assert report["arrays_unchanged"] is False and report["changed_tensors"] == ["layers/attn/q_proj"]
    assert report["max_abs_difference"] == pytest.approx(1.5)
    assert float(np.asarray(reloaded["layers"]["attn"]["q_proj"])[0, 0, 0]) == pytest.approx(original + 1.5)
    assert probe(model.config, reloaded, PROMPTS[0]) != probe(model.config, model.params, PROMPTS[0])


def test_the_integrity_check_fails_when_a_checkpoint_no_longer_loads(tiny_gqa, tmp_path):
    """A NaN written into a tensor makes the reload refuse the checkpoint: the check reports the error."""
    directory = Path(shutil.copytree(tiny_gqa[1], tmp_path / "copy"))
    model = mtijax.load(directory, progress=False)
    before = snapshot(model.source, model.config, model.params)
    overwrite_first_value(directory, "model.layers.1.mlp.down_proj.weight", float("nan"))

    report, reloaded = verify(before)
    assert reloaded is None and report["ok"] is False and report["arrays_unchanged"] is False
    assert "model.layers.1.mlp.down_proj.weight" in report["reload_error"] and "NaN" in report["reload_error"]


def test_write_outputs_writes_json_csv_and_png(study, tmp_path):
    paths = write_outputs(study, tmp_path / "out")
    assert [p.name for p in paths] == ["study.json", "study.csv", "divergence.png"]
    saved = json.loads((tmp_path / "out" / "study.json").read_text())
    assert [r["alpha"] for r in saved["rows"]] == ALPHAS and saved["verdict"] == study.verdict
    with open(tmp_path / "out" / "study.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and [float(r["alpha"]) for r in rows] == ALPHAS
    assert [float(r["divergence"]) for r in rows] == [r["divergence"] for r in study.rows]
    png = (tmp_path / "out" / "divergence.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000


# --- the mtijax inject command ---------------------------------------------------------------------------------

def inject_args(student_dir: Path, teacher_dir: Path, *extra: str) -> list[str]:
    """``mtijax inject`` of the default sweep on the two token-id prompts, continuing each by two tokens."""
    return ["inject", "--student", str(student_dir), "--teacher", str(teacher_dir), "--token-ids", "5,6,7,8,9",
            "--token-ids", "10,11,12", "--max-new-tokens", "2", *extra]


def strict_json(text: str):
    """``json.loads`` that refuses NaN and Infinity, which are not JSON."""
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    return json.loads(text, parse_constant=refuse)


def test_inject_json_reports_rows_and_integrity(capsys, student, teacher):
    dirs = (student[1], teacher[1])
    before = [tree_checksums(d) for d in dirs]
    status = main(inject_args(*dirs, "--json"))
    out, err = capsys.readouterr()
    assert status == 0, err
    assert out.count("\n") == 1
    report = strict_json(out)
    assert [row["alpha"] for row in report["rows"]] == ALPHAS
    for row in report["rows"]:
        assert {"alpha", "output_norm", "divergence", "kl", "top1_agreement"} <= row.keys()
    assert (report["rows"][0]["divergence"], report["rows"][0]["top1_agreement"]) == (0.0, 1.0)
    assert report["integrity"]["ok"] is True and report["integrity"]["probe_diff"] == 0
    assert report["setup"]["tensors"] == ["attn/q_proj"] and report["setup"]["pairs"] == [[0, 0]]
    assert [tree_checksums(d) for d in dirs] == before


def test_inject_out_writes_the_three_files(capsys, student, teacher, tmp_path):
    status = main(inject_args(student[1], teacher[1], "--out", str(tmp_path / "study")))
    out, err = capsys.readouterr()
    assert status == 0, err
    assert "divergence grows" in out and "unchanged" in out
    assert sorted(p.name for p in (tmp_path / "study").iterdir()) == ["divergence.png", "study.csv", "study.json"]
    assert all((tmp_path / "study" / name).stat().st_size > 0 for name in ("study.csv", "study.json"))


def test_inject_extrapolates_only_when_asked(capsys, student, teacher):
    """... and reports the alphas exactly as given, however small."""
    status = main(inject_args(student[1], teacher[1], "--alphas", "0,1e-7,1.5", "--allow-extrapolation", "--json"))
    out, err = capsys.readouterr()
    assert status == 0, err
    assert [row["alpha"] for row in strict_json(out)["rows"]] == [0.0, 1e-7, 1.5]


def inject_error(capsys, argv: list[str], *directories: Path) -> str:
    """Run ``mtijax argv``; check it fails as a user error with one line and changes no checkpoint; the line."""
    before = [tree_checksums(d) for d in directories]
    status = main(argv)
    out, err = capsys.readouterr()
    assert status == 2
    assert out == ""
    assert err.startswith("mtijax: error: ") and err.endswith("\n") and err.count("\n") == 1, err
    assert [tree_checksums(d) for d in directories] == before, "a checkpoint on disk changed"
    return err


@pytest.mark.parametrize("flags, named", [
    (["--tensor", "attn/nope"], ["attn/nope", "matches no layer tensor"]),
    (["--layers", "4"], ["student layer 4", "0..3"]),
    (["--teacher-layers", "6"], ["teacher layer 6", "0..5"]),
    (["--alphas", "0,1.5"], ["alpha 1.5", "--allow-extrapolation"]),
    (["--alphas=-0.5,0"], ["alpha -0.5", "--allow-extrapolation"]),
], ids=["unknown-tensor", "student-layer", "teacher-layer", "alpha-above-one", "alpha-below-zero"])
def test_inject_user_errors(capsys, student, teacher, flags, named):
    line = inject_error(capsys, inject_args(student[1], teacher[1], *flags), student[1], teacher[1])
    assert all(word in line for word in named), line


def test_inject_refuses_a_teacher_of_another_architecture(capsys, student, olmoe_dir):
    line = inject_error(capsys, inject_args(student[1], olmoe_dir), student[1], olmoe_dir)
    assert "olmoe" in line and "gemma3" in line


# --- the real 270M ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gemma_270m(real_model):
    """The embedded Gemma 3 270M (float32) with its tokenizer: the session's one load."""
    return real_model


@pytest.mark.slow
def test_real_270m_last_query_projection_into_the_first_layer(gemma_270m):
    from mtijax.weights.default import default_model_path

    model = gemma_270m
    prompt = model.tokenizer("The capital of France is")["input_ids"]
    spec = InjectionSpec(("attn/q_proj",), (0,), (17,))
    result = run_study(model, model, spec, [0.0, 0.1], [prompt], max_new_tokens=2)
    zero, tenth = result.rows
    assert (zero["divergence"], zero["kl"], zero["top1_agreement"]) == (0.0, 0.0, 1.0)
    assert zero["continuations"][0][0] == int(final_logits(model, model.params, prompt).argmax())
    assert tenth["divergence"] > 0
    assert result.integrity["ok"] is True and result.integrity["probe_diff"] == 0.0  # the GGUF dequantised again
    assert result.integrity["files"] == 1 and result.setup["student"] == str(default_model_path())
