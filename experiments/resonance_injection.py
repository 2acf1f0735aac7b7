"""Seed 000's "Resonance Injection", reproduced end to end on a model that ships here.

The seed blended Gemma 3 27B's layer-0 ``q_proj`` (bilinearly resized) into
Gemma 3 12B's layer 0 at alpha 0 ... 0.5 and tabulated the final-logit norm
and its L2 divergence from the un-injected run. Only one real Gemma ships
here (the embedded 270M), so the default teacher is that same checkpoint's
*last* layer (17), injected into layer 0: real weights with different
statistics. ``--teacher`` takes any other checkpoint of the same family
(its tensors are resized to the student's shapes).

    python experiments/resonance_injection.py [--teacher DIR|FILE] [--teacher-layer N]

Writes ``experiments/results/resonance_injection/{study.json,study.csv,divergence.png}``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import mtijax
import mtijax.injection.study
import mtijax.metrics
from machine import describe
from mtijax.injection.study import table, write_outputs
from seed_claims import INJECTION_TABLE as SEED_TABLE
PROMPTS = ("The capital of France is", "def fibonacci(n):", "Once upon a time", "The derivative of a constant is")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", default=None, help="teacher checkpoint (default: the embedded 270M itself)")
    parser.add_argument("--teacher-layer", type=int, default=None, help="default: the teacher's last layer")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "resonance_injection"))
    args = parser.parse_args()

    student = mtijax.load()
    teacher = student if args.teacher is None else mtijax.load(args.teacher, tokenizer=False)
    teacher_layer = teacher.config.num_layers - 1 if args.teacher_layer is None else args.teacher_layer
    spec = mtijax.InjectionSpec(("attn/q_proj",), (0,), (teacher_layer,), "bilinear", align_corners=False)
    prompts = [student.tokenizer(p)["input_ids"] for p in PROMPTS]
    study = mtijax.run_study(student, teacher, spec, [row[0] for row in SEED_TABLE], prompts, max_new_tokens=16)
    study.setup.update(describe(), prompt_texts=list(PROMPTS))
    for row in study.rows:
        row["texts"] = [student.tokenizer.decode(ids) for ids in row["continuations"]]
    write_outputs(study, args.out)

    print(f"student {student.source}, layer 0 attn/q_proj <- teacher {teacher.source}, layer {teacher_layer}\n")
    print(table(study))
    print(study.verdict)
    seed_fit = mtijax.metrics.linear_fit([r[0] for r in SEED_TABLE], [r[2] for r in SEED_TABLE])
    seed_exp = mtijax.metrics.power_exponent([r[0] for r in SEED_TABLE], [r[2] for r in SEED_TABLE])
    print(f"\nseed 000's own table, read the same way: {mtijax.injection.study.verdict(seed_fit, seed_exp)}")
    integrity = study.integrity
    print(f"integrity: checksums {'unchanged' if integrity['checksums_unchanged'] else 'CHANGED'}, reloaded "
          f"tensors {'unchanged' if integrity['arrays_unchanged'] else 'CHANGED'}, probe difference "
          f"{integrity['probe_diff']}")
    for text, prompt in zip(study.rows[-1]["texts"], PROMPTS):
        print(f"alpha {study.rows[-1]['alpha']}: {prompt!r} -> {text!r}")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
