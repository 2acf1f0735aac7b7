"""Integrity checks: a technique must leave the checkpoint on disk and the model's behaviour untouched.

Seed 000 called this "pristine": SHA-256 of every checkpoint file before and
after, and a baseline probe (the L2 norm of a fixed prompt's final logits)
run before and after, whose difference must be exactly 0 for a pure transform.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from mtijax.config import ModelConfig
from mtijax.metrics import logit_norm
from mtijax.models.decoder import Params, forward


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
