"""Integrity checks: a technique must leave the checkpoint on disk, and so the model it loads, untouched.

Seed 000 called this "pristine". Before a technique runs, :func:`snapshot` records
the SHA-256 of every checkpoint file and keeps the params as they were loaded.
Afterwards :func:`verify` reads the disk again: the checksums once more, and the
params reloaded from the files and compared, tensor by tensor and bit for bit,
with the pre-technique arrays. A changed byte in a file, or a file that no longer
loads, fails the check. :func:`probe` (the L2 norm of a fixed prompt's final logits)
is then run on the reloaded params and on the pre-technique ones, so that the
difference compares what the disk now gives with what it gave before.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mtijax.config import ModelConfig
from mtijax.errors import MtijaxError
from mtijax.metrics import logit_norm
from mtijax.models.decoder import Params, forward
from mtijax.weights.gguf_file import GGUFFile
from mtijax.weights.loader import load_params
from mtijax.weights.sources import HFDirectory


def file_checksums(path: str | Path) -> dict[str, str]:
    """SHA-256 of a file, or of every file under a directory, by path."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    sums = {}
    for file in files:
        digest = hashlib.sha256()
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
        sums[str(file)] = digest.hexdigest()
    return sums


def probe(config: ModelConfig, params: Params, tokens: list[int]) -> float:
    """L2 norm of the final-position logits of ``tokens`` (float32)."""
    logits = forward(config, params, jnp.asarray([tokens], jnp.int32)).logits[0, -1]
    return float(np.asarray(logit_norm(logits)))


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """A checkpoint before a technique: where it is, its files' SHA-256, and the params loaded from it."""

    path: str
    config: ModelConfig
    params: Params
    checksums: dict[str, str]


def snapshot(path: str | Path, config: ModelConfig, params: Params) -> Snapshot:
    """Record the checkpoint at ``path`` (a Hugging Face directory or a GGUF file) and the ``params`` that were
    loaded from it, before a technique runs."""
    return Snapshot(str(path), config, params, file_checksums(path))


def reload(path: str | Path, config: ModelConfig, dtype: str) -> Params:
    """The params of ``config`` read afresh from the checkpoint at ``path``, in ``dtype``."""
    path = Path(path)
    source = HFDirectory(path) if path.is_dir() else GGUFFile(path)
    return load_params(config, source, dtype, progress=False)


def _named_leaves(params: Params) -> dict[str, Any]:
    return {"/".join(str(getattr(k, "key", k)) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}


def verify(before: Snapshot) -> tuple[dict[str, Any], Params | None]:
    """Read the checkpoint of ``before`` from disk again and compare it with the snapshot.

    Returns the report and the reloaded params (None when the files no longer load). The report:
    ``checksums_unchanged``, ``files``, ``changed_files``; ``arrays_unchanged`` (every reloaded tensor equals
    its pre-technique array bit for bit), ``tensors``, ``changed_tensors`` (paths such as
    ``layers/attn/q_proj``), ``max_abs_difference`` over the changed tensors; ``reload_error`` (the message
    when the files no longer load, else None); and ``ok``, all of these together.
    """
    after = file_checksums(before.path)
    changed_files = sorted(p for p in before.checksums.keys() | after.keys()
                           if before.checksums.get(p) != after.get(p))
    old = _named_leaves(before.params)
    dtype = str(next(iter(old.values())).dtype)
    try:
        reloaded = reload(before.path, before.config, dtype)
        error = None
    except MtijaxError as e:
        reloaded, error = None, str(e)
    changed, worst = [], 0.0
    if reloaded is not None:
        for name, new in _named_leaves(reloaded).items():
            a = old[name]  # compared where they are: a host copy of a jax array would stay cached on it
            if a.shape != new.shape or not bool(jnp.array_equal(a, new)):
                changed.append(name)
                if a.shape == new.shape:
                    difference = jnp.abs(a.astype(jnp.float32) - new.astype(jnp.float32))
                    worst = max(worst, float(jnp.max(difference)))
    arrays_unchanged = reloaded is not None and not changed
    report = {"checksums_unchanged": not changed_files, "files": len(after), "changed_files": changed_files,
              "arrays_unchanged": arrays_unchanged, "tensors": len(old), "changed_tensors": changed,
              "max_abs_difference": worst, "reload_error": error,
              "ok": not changed_files and arrays_unchanged}
    return report, reloaded
