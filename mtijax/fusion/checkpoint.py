"""Fusion checkpoints: orbax for the params, SMF memory and optimiser state; safetensors for export.

A checkpoint is a directory::

    fusion.json    the fusion config, the base model it fits (architecture, hidden size, depth, name),
                   the train config, the step, the training history, and whether the optimiser state is inside
    state/         an orbax checkpoint of {"params", "memory" (when there is SMF), "opt_state" (optional), "step"}

Nothing of the base model is saved. Restoring checks the base model first (hidden size, depth) and then
restores into the exact structure a fresh ``init_fusion`` and optimiser would have, so a restored state
resumes training bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mtijax.config import ModelConfig
from mtijax.errors import MtijaxError
from mtijax.fusion.config import FusionConfig, check_against_model
from mtijax.fusion.training import TrainConfig, TrainState
from mtijax.fusion.wrapper import Variables, variable_shapes

META = "fusion.json"
STATE = "state"


class Checkpoint(NamedTuple):
    """A restored checkpoint: the configs, the train state (``opt_state`` None when it was not saved), and the
    metadata of ``fusion.json``."""

    fusion: FusionConfig
    train: TrainConfig | None
    state: TrainState
    meta: dict[str, Any]

    @property
    def variables(self) -> Variables:
        return {"params": self.state.params, "memory": self.state.memory}


def save(directory: str | Path, state: TrainState, fusion: FusionConfig, config: ModelConfig, *,
         train: TrainConfig | None = None, history: list[dict[str, float]] | None = None, model: str | None = None,
         include_optimizer: bool = True, extra: dict[str, Any] | None = None) -> Path:
    """Write ``state`` (without ``opt_state`` unless ``include_optimizer``) to ``directory``, replacing what is there;
    ``extra`` adds entries to ``fusion.json`` (e.g. an evaluation)."""
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    tree = {"params": state.params, "step": state.step}
    if state.memory:
        tree["memory"] = state.memory
    if include_optimizer:
        tree["opt_state"] = state.opt_state
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory / STATE, tree, force=True)
    checkpointer.wait_until_finished()
    meta = {"fusion": fusion.to_json(),
            "base": {"architecture": config.architecture, "hidden_size": config.hidden_size,
                     "num_layers": config.num_layers, "model": model},
            "train": None if train is None else train.to_json(), "step": int(state.step),
            "has_optimizer_state": include_optimizer, **(extra or {}), "history": history or []}
    (directory / META).write_text(json.dumps(meta, indent=1))
    return directory


def read_meta(directory: str | Path) -> dict[str, Any]:
    """The ``fusion.json`` of a checkpoint directory."""
    path = Path(directory) / META
    if not path.is_file():
        raise MtijaxError(f"{directory} is not a fusion checkpoint (no {META})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise MtijaxError(f"{path} is not valid JSON: {e}") from None


def restore(directory: str | Path, config: ModelConfig | None = None) -> Checkpoint:
    """Restore a checkpoint, checked against base model ``config`` when given (a hidden size or depth mismatch
    is an error)."""
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    meta = read_meta(directory)
    try:
        fusion = FusionConfig.from_json(meta["fusion"])
        hidden = int(meta["base"]["hidden_size"])
        train = None if meta.get("train") is None else TrainConfig.from_json(meta["train"])
    except (KeyError, TypeError, ValueError) as e:
        raise MtijaxError(f"{directory / META} is not a fusion checkpoint description ({e!r})") from None
    if config is not None:
        if hidden != config.hidden_size:
            raise MtijaxError(f"the fusion checkpoint {directory} was trained for hidden size {hidden}; "
                              f"the base model has hidden size {config.hidden_size}")
        check_against_model(fusion, config)
    shapes = variable_shapes(fusion, hidden)
    target: dict[str, Any] = {"params": shapes["params"], "step": jax.ShapeDtypeStruct((), jnp.int32)}
    if shapes["memory"]:
        target["memory"] = shapes["memory"]
    if meta.get("has_optimizer_state"):
        optimizer = (train or TrainConfig()).optimizer()
        target["opt_state"] = jax.eval_shape(optimizer.init, shapes["params"])
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), target)
    try:
        tree = ocp.StandardCheckpointer().restore(directory / STATE, target)
    except (ValueError, FileNotFoundError, KeyError) as e:
        raise MtijaxError(f"cannot restore the fusion checkpoint {directory}: {str(e).splitlines()[0]}") from None
    tree = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), tree)  # uncommitted, like fresh arrays: no recompile
    state = TrainState(tree["params"], tree.get("opt_state"), tree.get("memory", {}), tree["step"])
    return Checkpoint(fusion, train, state, meta)


def export_safetensors(path: str | Path, variables: Variables, fusion: FusionConfig, hidden_size: int) -> Path:
    """Write the fusion params (and SMF memory) as one safetensors file, names like
    ``params/layers/6/prime/proj/kernel``; the metadata holds the fusion config and hidden size."""
    from safetensors.numpy import save_file

    tensors = {}
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
        name = "/".join(str(getattr(k, "key", k)) for k in key_path)
        tensors[name] = np.ascontiguousarray(np.asarray(leaf))
    path = Path(path)
    save_file(tensors, str(path), metadata={"fusion_config": json.dumps(fusion.to_json()),
                                            "hidden_size": str(hidden_size), "format": "mtijax-fusion"})
    return path


def load_safetensors(path: str | Path) -> tuple[FusionConfig, Variables, int]:
    """Read a file written by :func:`export_safetensors`: ``(fusion config, variables, hidden size)``."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata() or {}
        if meta.get("format") != "mtijax-fusion":
            raise MtijaxError(f"{path} is not an mtijax fusion export")
        fusion = FusionConfig.from_json(json.loads(meta["fusion_config"]))
        hidden = int(meta["hidden_size"])
        flat = {name: f.get_tensor(name) for name in f.keys()}
    shapes = variable_shapes(fusion, hidden)
    leaves = []
    for key_path, shape in jax.tree_util.tree_flatten_with_path(shapes)[0]:
        name = "/".join(str(getattr(k, "key", k)) for k in key_path)
        if name not in flat:
            raise MtijaxError(f"{path} has no tensor {name}")
        if flat[name].size != int(np.prod(shape.shape)):
            raise MtijaxError(f"{path}: tensor {name} has shape {list(flat[name].shape)}, expected {list(shape.shape)}")
        leaves.append(jnp.asarray(flat[name].reshape(shape.shape), shape.dtype))  # safetensors stores scalars as [1]
    return fusion, jax.tree.unflatten(jax.tree.structure(shapes), leaves), hidden
