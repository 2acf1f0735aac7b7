"""Injection (seed 000): blend resized teacher tensors into a student, as a pure params -> params transform.

``inject(student, teacher, spec, alpha)`` returns new params in which, for
every layer tensor the spec names and every chosen student layer ``l``::

    W[l] = (1 - alpha) * W_student[l] + alpha * resize(W_teacher[t(l)], W_student[l].shape)

``t(l)`` is the teacher layer paired with ``l``: the spec's list, else the
same index when the two models have the same depth, else the layer at the
same relative depth, ``round(l * (L_teacher - 1) / (L_student - 1))``.
Leaves the spec does not touch are the very same arrays. ``alpha`` may be a
traced scalar, so ``jax.vmap`` over an array of alphas gives a whole sweep
from one compile. Nothing is ever written to disk.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Any

import jax
import jax.numpy as jnp

from mtijax.errors import MtijaxError
from mtijax.injection.resize import METHODS, resize

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class InjectionSpec:
    """Which tensors to blend, where from, and how to resize them (hashable: a jit static).

    Attributes:
      tensors: path patterns relative to ``params["layers"]`` (``fnmatch``):
        ``"attn/q_proj"``, ``"mlp/*"``, ``"*"`` for every layer tensor.
      layers: student layers to inject into.
      teacher_layers: the teacher layer for each student layer (same length),
        or None for the default pairing (see the module docstring).
      resize: ``"bilinear"`` (seed 000's method), ``"nearest"`` or ``"pad"``.
      align_corners: the bilinear convention (False, as seed 000's original code).
    """

    tensors: tuple[str, ...] = ("attn/q_proj",)
    layers: tuple[int, ...] = (0,)
    teacher_layers: tuple[int, ...] | None = None
    resize: str = "bilinear"
    align_corners: bool = False


def _layer_leaves(params: Params) -> dict[str, jax.Array]:
    """``{"attn/q_proj": [L, ...], ...}``: the stacked layer tensors by path."""
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params["layers"])[0]:
        flat["/".join(str(getattr(k, "key", k)) for k in path)] = leaf
    return flat


def plan(student: Params, teacher: Params, spec: InjectionSpec) -> list[tuple[str, int, int]]:
    """The ``(tensor path, student layer, teacher layer)`` triples the spec means; raises on bad specs."""
    if spec.resize not in METHODS:
        raise MtijaxError(f"unknown resize method {spec.resize!r}; methods are {', '.join(METHODS)}")
    s_leaves, t_leaves = _layer_leaves(student), _layer_leaves(teacher)
    paths = [p for p in s_leaves if any(fnmatch.fnmatchcase(p, pattern) for pattern in spec.tensors)]
    if not paths:
        raise MtijaxError(f"tensor pattern {', '.join(spec.tensors)} matches no layer tensor; "
                          f"they are {', '.join(s_leaves)}")
    missing = [p for p in paths if p not in t_leaves]
    if missing:
        raise MtijaxError(f"the teacher has no tensor {missing[0]!r}: the two models are different architectures")
    depth_s = next(iter(s_leaves.values())).shape[0]
    depth_t = next(iter(t_leaves.values())).shape[0]
    bad = [l for l in spec.layers if not 0 <= l < depth_s]
    if bad:
        raise MtijaxError(f"student layer {bad[0]} is out of range: the student has layers 0..{depth_s - 1}")
    if spec.teacher_layers is None:
        scale = (depth_t - 1) / (depth_s - 1) if depth_s > 1 else 0.0
        pairs = [(l, l if depth_s == depth_t else round(l * scale)) for l in spec.layers]
    else:
        if len(spec.teacher_layers) != len(spec.layers):
            raise MtijaxError(f"{len(spec.teacher_layers)} teacher layers for {len(spec.layers)} student layers")
        bad = [l for l in spec.teacher_layers if not 0 <= l < depth_t]
        if bad:
            raise MtijaxError(f"teacher layer {bad[0]} is out of range: the teacher has layers 0..{depth_t - 1}")
        pairs = list(zip(spec.layers, spec.teacher_layers))
    for path in paths:
        if s_leaves[path].ndim != t_leaves[path].ndim:
            raise MtijaxError(f"{path}: student {list(s_leaves[path].shape)} and teacher "
                              f"{list(t_leaves[path].shape)} differ in rank")
    return [(path, s, t) for path in paths for s, t in pairs]


def inject(student: Params, teacher: Params, spec: InjectionSpec, alpha: jax.Array | float) -> Params:
    """Student params with the spec's tensors blended toward the resized teacher's (see the module docstring).

    ``alpha`` outside [0, 1] extrapolates; drivers refuse it unless asked.
    Pure and jittable with ``spec`` static; ``alpha == 0`` returns the
    student's values bit for bit and ``alpha == 1`` the resized teacher's.
    """
    alpha = jnp.asarray(alpha, jnp.float32)
    layers = dict(student["layers"])
    t_leaves = _layer_leaves(teacher)
    for path, s_layer, t_layer in plan(student, teacher, spec):
        current = _get(layers, path)
        target = current[s_layer]
        source = resize(t_leaves[path][t_layer], target.shape, spec.resize, spec.align_corners)
        blended = ((1 - alpha) * target.astype(jnp.float32) + alpha * source.astype(jnp.float32)).astype(target.dtype)
        _set(layers, path, current.at[s_layer].set(jnp.where(alpha == 0, target, blended)))
    return {**student, "layers": layers}


def _get(tree: dict, path: str) -> jax.Array:
    for key in path.split("/"):
        tree = tree[key]
    return tree


def _set(tree: dict, path: str, value: jax.Array) -> None:
    """Set ``tree[path] = value``, copying the dicts on the way so the caller's tree is not changed."""
    keys = path.split("/")
    for key in keys[:-1]:
        tree[key] = dict(tree[key])
        tree = tree[key]
    tree[keys[-1]] = value
