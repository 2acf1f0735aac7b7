"""Injection (seed 000): blend resized teacher tensors into a student, sweep the strength, check the disk.

::

    spec = InjectionSpec(("attn/q_proj",), layers=(0,), teacher_layers=(17,))
    params = inject(student.params, teacher.params, spec, 0.2)              # params -> params, jittable
    study = run_study(student, teacher, spec, [0, 0.1, 0.2], prompts)        # one vmapped sweep
    print(table(study), study.verdict)

``blend`` (:class:`InjectionSpec`, :func:`plan`, :func:`inject`: the params
transform), ``resize`` (bilinear, nearest, pad), ``study`` (the divergence
sweep, its linearity verdict and outputs), ``integrity`` (checksums and a
bit-for-bit reload of the checkpoint after a technique) and ``command``
(``mtijax inject``) each do one job.
"""

from mtijax.injection.blend import InjectionSpec, inject, plan
from mtijax.injection.integrity import Snapshot, file_checksums, probe, snapshot, verify
from mtijax.injection.resize import METHODS, resize
from mtijax.injection.study import Study, check_alphas, run_study, table, verdict, write_outputs

__all__ = [
    "InjectionSpec", "inject", "plan", "Snapshot", "file_checksums", "probe", "snapshot", "verify", "METHODS",
    "resize", "Study", "check_alphas", "run_study", "table", "verdict", "write_outputs",
]
