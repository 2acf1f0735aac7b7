"""Activation patching (seed 001): capture a run, patch sites and the KV cache from another, during generation too.

* :func:`capture` / :class:`Capture`: every named activation and the KV cache of a run, in one call.
* :class:`PatchSpec` / :func:`patch_spec` / :func:`to_patches` / :func:`patched_forward` / :func:`sweep`:
  patches as data (site, layer mask, position rule, mode, coefficient, source), applied inside the block;
  a batch of specs runs through ``jax.vmap`` in one call.
* :func:`replace_kv`: KV-cache patching (``whole`` or the original's ``last_min``).
* :func:`generate_patched` with a :class:`Plan` of :class:`SitePatch` and :class:`KVPatch`: persistent
  patches at every decode step, KV replacement, the first-token rule, sweeps over layer masks.
* :mod:`mtijax.patching.measures`: behaviour score, efficiency, participation ratio, R_V, next-token KL.
"""

from mtijax.patching.capture import Capture, capture
from mtijax.patching.forward import layer_pairs, patched_forward, single_layers, sweep
from mtijax.patching.generation import KVPatch, PatchedGeneration, Plan, SitePatch, generate_patched
from mtijax.patching.kv import replace_kv
from mtijax.patching.measures import MARKERS, behavior_score, efficiency, participation_ratio, prompt_r_v, r_v
from mtijax.patching.spec import PatchSpec, patch_spec, to_patches

__all__ = [
    "Capture", "capture", "PatchSpec", "patch_spec", "to_patches", "patched_forward", "sweep", "single_layers",
    "layer_pairs", "replace_kv", "KVPatch", "Plan", "SitePatch", "PatchedGeneration", "generate_patched",
    "MARKERS", "behavior_score", "efficiency", "participation_ratio", "prompt_r_v", "r_v",
]
