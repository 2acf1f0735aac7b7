"""The divergence study of seed 000: sweep the injection strength and measure how the output moves.

For each alpha, over the probe prompts (means over prompts): the L2 norm of
the final-position logits, their L2 divergence and KL divergence from the
un-injected student's, the top-1 agreement with it, and the greedy
continuation. The metrics come from one jitted ``jax.vmap`` over all alphas
(one compile, no Python loop of forwards); the continuations, which need a
KV cache per alpha, run ``mtijax.generate`` once per alpha.

A linearity read-out fits divergence against alpha (least squares, R²) and
the growth exponent ``p`` of ``divergence ~ alpha ** p``; the verdict calls the
response linear when R² >= ``LINEAR_R2`` and ``|p - 1| <= LINEAR_EXPONENT_TOL``, and
undetermined when fewer than two alphas > 0 moved the output (no exponent).
Integrity (``mtijax.injection.integrity``): before the sweep, the checksums of the student's and the teacher's
files and their params as loaded; after it, the files read again, their params reloaded and compared
bit for bit with the ones from before, and the baseline probe run on the reloaded student.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mtijax.api import Model
from mtijax.errors import MtijaxError
from mtijax.generate import generate, pad_prompts
from mtijax.injection.blend import InjectionSpec, inject, plan
from mtijax.injection.integrity import probe, snapshot, verify
from mtijax.metrics import kl_divergence, l2_divergence, linear_fit, logit_norm, power_exponent, top1_agreement
from mtijax.models.decoder import forward

LINEAR_R2 = 0.99
LINEAR_EXPONENT_TOL = 0.1


@dataclasses.dataclass
class Study:
    """What :func:`run_study` measured (``rows`` one dict per alpha; see :meth:`to_json`)."""

    rows: list[dict[str, Any]]
    fit: dict[str, float]
    exponent: float
    verdict: str
    integrity: dict[str, Any]
    setup: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        """``{"rows", "fit", "exponent", "verdict", "integrity", "setup"}``, JSON-ready (strict JSON: an
        undefined exponent is None, not NaN)."""
        return {**dataclasses.asdict(self), "exponent": None if math.isnan(self.exponent) else self.exponent}


def check_alphas(alphas: Sequence[float], allow_extrapolation: bool) -> np.ndarray:
    """``alphas`` as a float64 array: non-empty and finite, inside [0, 1] unless ``allow_extrapolation``."""
    alphas = np.asarray(alphas, np.float64)
    if alphas.ndim != 1 or alphas.size == 0 or not np.isfinite(alphas).all():
        raise MtijaxError("alphas must be a non-empty list of finite numbers")
    outside = alphas[(alphas < 0) | (alphas > 1)]
    if outside.size and not allow_extrapolation:
        raise MtijaxError(f"alpha {outside[0]:g} is outside [0, 1] (pass --allow-extrapolation to extrapolate)")
    return alphas


@jax.jit(static_argnames=("config", "spec"))
def _sweep_logits(config, spec: InjectionSpec, student, teacher, alphas, tokens, positions):
    """Final-position logits ``[A, P, V]`` for every alpha and the student's own ``[P, V]``, from one vmapped
    forward: the student's run as one more alpha = 0, so a difference between the two is the injection's alone,
    not that of a differently compiled forward (which moves the logits by about 1e-6)."""
    def one(alpha):
        return forward(config, inject(student, teacher, spec, alpha), tokens, positions).logits[:, -1]
    logits = jax.vmap(one)(jnp.concatenate([jnp.zeros((1,), alphas.dtype), alphas]))
    return logits[1:], logits[0]


def verdict(fit: dict[str, float], exponent: float) -> str:
    """A plain sentence: was divergence linear in alpha, within the stated tolerance?"""
    if math.isnan(exponent):
        return ("UNDETERMINED: fewer than two alphas > 0 moved the output, so there is no growth exponent "
                f"(R^2 = {fit['r2']:.4f})")
    linear = fit["r2"] >= LINEAR_R2 and abs(exponent - 1) <= LINEAR_EXPONENT_TOL
    shape = "linearly" if linear else ("faster than linearly" if exponent > 1 else "slower than linearly")
    return (f"{'LINEAR' if linear else 'NOT LINEAR'}: divergence grows {shape} in alpha "
            f"(R^2 = {fit['r2']:.4f}, growth exponent {exponent:.2f}; linear means R^2 >= {LINEAR_R2} "
            f"and exponent within 1 +/- {LINEAR_EXPONENT_TOL})")


def run_study(student: Model, teacher: Model, spec: InjectionSpec, alphas: Sequence[float],
              prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 16,
              allow_extrapolation: bool = False) -> Study:
    """Sweep ``alphas`` for ``spec`` and measure (see the module docstring). Nothing is written to disk."""
    if student.config.architecture != teacher.config.architecture:
        raise MtijaxError(f"cannot inject between architectures: the teacher is {teacher.config.architecture}, "
                          f"the student {student.config.architecture}")
    alphas = check_alphas(alphas, allow_extrapolation)
    triples = plan(student.params, teacher.params, spec)
    models = [student] if teacher.source == student.source else [student, teacher]
    snapshots = [snapshot(m.source, m.config, m.params) for m in models]
    probe_before = probe(student.config, student.params, list(prompts[0]))

    tokens, positions, _ = pad_prompts(prompts, student.config.pad_token_id)
    tokens, positions = jnp.asarray(tokens), jnp.asarray(positions)
    logits, reference = _sweep_logits(student.config, spec, student.params, teacher.params,
                                      jnp.asarray(alphas, jnp.float32), tokens, positions)
    norm = np.asarray(logit_norm(logits)).mean(-1)
    l2 = np.asarray(l2_divergence(logits, reference[None])).mean(-1)
    kl = np.asarray(kl_divergence(logits, reference[None])).mean(-1)
    top1 = np.asarray(top1_agreement(logits, reference[None])).mean(-1)
    rows = []
    for i, alpha in enumerate(alphas):
        injected = inject(student.params, teacher.params, spec, float(alpha))
        gen = generate(student.config, injected, prompts, max_new_tokens, stop_ids=())
        rows.append({"alpha": float(alpha), "output_norm": float(norm[i]), "divergence": float(l2[i]),
                     "kl": float(kl[i]), "top1_agreement": float(top1[i]),
                     "continuations": [gen.ids(r) for r in range(len(prompts))]})

    fit = linear_fit(alphas, l2)
    exponent = power_exponent(alphas, l2)
    integrity = _integrity(snapshots, probe_before, list(prompts[0]))
    setup = {"student": student.source, "teacher": teacher.source, "tensors": list(spec.tensors),
             "pairs": sorted({(s, t) for _, s, t in triples}), "resize": spec.resize,
             "align_corners": spec.align_corners, "prompts": [list(p) for p in prompts]}
    return Study(rows, fit, exponent, verdict(fit, exponent), integrity, setup)


def _integrity(snapshots, probe_before: float, probe_tokens: list[int]) -> dict[str, Any]:
    """The disk read again after the sweep (see :func:`mtijax.injection.integrity.verify`), summed over the checkpoints;
    the probe re-run on the student's reloaded params (None when they no longer load)."""
    checks = [verify(s) for s in snapshots]
    reports = [report for report, _ in checks]
    reloaded = checks[0][1]
    probe_after = None if reloaded is None else probe(snapshots[0].config, reloaded, probe_tokens)
    probe_diff = None if probe_after is None else probe_after - probe_before
    return {"checksums_unchanged": all(r["checksums_unchanged"] for r in reports),
            "files": sum(r["files"] for r in reports),
            "changed_files": [f for r in reports for f in r["changed_files"]],
            "arrays_unchanged": all(r["arrays_unchanged"] for r in reports),
            "tensors": sum(r["tensors"] for r in reports),
            "changed_tensors": [f"{s.path}: {name}" for s, r in zip(snapshots, reports) for name in r["changed_tensors"]],
            "max_abs_difference": max(r["max_abs_difference"] for r in reports),
            "reload_errors": [r["reload_error"] for r in reports if r["reload_error"]],
            "probe_before": probe_before, "probe_after": probe_after, "probe_diff": probe_diff,
            "ok": all(r["ok"] for r in reports) and probe_diff == 0}


def table(study: Study) -> str:
    """The per-alpha rows as a fixed-width text table."""
    lines = [f"{'alpha':>6} {'output norm':>12} {'divergence':>11} {'KL (nats)':>10} {'top-1 agree':>12}"]
    for row in study.rows:
        lines.append(f"{row['alpha']:>6.2f} {row['output_norm']:>12.2f} {row['divergence']:>11.2f} "
                     f"{row['kl']:>10.4f} {row['top1_agreement']:>12.2f}")
    return "\n".join(lines)


def write_outputs(study: Study, directory: str | Path) -> list[Path]:
    """``study.json``, ``study.csv`` and ``divergence.png`` under ``directory``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / "study.json", directory / "study.csv", directory / "divergence.png"]
    paths[0].write_text(json.dumps(study.to_json(), indent=2))
    with open(paths[1], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["alpha", "output_norm", "divergence", "kl", "top1_agreement"])
        for row in study.rows:
            writer.writerow([row[k] for k in ("alpha", "output_norm", "divergence", "kl", "top1_agreement")])
    alphas = np.array([r["alpha"] for r in study.rows])
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(alphas, [r["divergence"] for r in study.rows], "o-", label="measured")
    left.plot(alphas, study.fit["slope"] * alphas + study.fit["intercept"], "--",
              label=f"least squares, R$^2$={study.fit['r2']:.3f}")
    left.set(xlabel="alpha", ylabel="L2 divergence of final logits", title="Divergence from alpha = 0")
    left.legend()
    right.plot(alphas, [r["output_norm"] for r in study.rows], "o-", color="tab:orange")
    right.set(xlabel="alpha", ylabel="L2 norm of final logits", title="Output norm")
    fig.suptitle(f"{study.verdict.split(':')[0]}: R$^2$ = {study.fit['r2']:.3f}, "
                 f"growth exponent {study.exponent:.2f}", fontsize=10)
    fig.tight_layout()
    fig.savefig(paths[2], dpi=120)
    plt.close(fig)
    return paths
