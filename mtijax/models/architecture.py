"""The architecture record: everything mtijax knows about one model family, in one typed value.

Each family folder (``mtijax/models/gemma3/``, ``olmoe/``, ``llama/``) builds one :class:`Architecture` in its
``__init__.py`` and ``mtijax.models.architectures`` registers it. Code that needs a family's block, shapes,
sites or checkpoint names asks the registry for the record of a config (``architecture(config)``) instead of
importing the family's module.

Logical axis names (:data:`AXES`) name every dimension of every parameter (``Architecture.param_axes``), so
sharding is a table from these names to mesh axes.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable, Generic, Mapping, Protocol, TypeVar

import jax

from mtijax.errors import MtijaxError

if TYPE_CHECKING:
    from mtijax.weights.names import TensorSlot

AXES = ("vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "experts", "layers")
"""The logical axis names a parameter dimension can carry. A merged ``N*H`` dimension (q_proj's output) is
``heads``, a merged ``K*H`` one is ``kv_heads``; a norm over ``D`` is ``embed``, one over ``H`` is ``head_dim``."""

Params = dict[str, Any]


class ModelConfig(Protocol):
    """What every architecture's config has (each is a frozen, hashable dataclass: a ``jax.jit`` static)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    rms_norm_eps: float
    max_position_embeddings: int
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None

    @property
    def head_dim(self) -> int: ...

    @property
    def num_params(self) -> int: ...


C = TypeVar("C")


@dataclasses.dataclass(frozen=True)
class Architecture(Generic[C]):
    """One model family: its config type, block, params layout, activation sites and checkpoint formats.

    Attributes:
      name: the value of ``config.architecture`` (``"gemma3"``, ``"olmoe"``, ``"llama"``).
      config_type: the family's frozen config dataclass.
      sites: the activation sites its block passes through, in block order (``mtijax.interventions``); the one
        list of them.
      capture_only: those of ``sites`` that can be captured but not patched (OLMoE's routing decisions).
      layer_spec: ``layer_spec(config) -> {name: [L, ...] array}``, per-layer settings scanned beside the params
        (``window`` int32 and ``inv_freq [L, H/2]`` in every family).
      param_shapes: ``param_shapes(config)``: the params pytree with a shape tuple per leaf.
      param_axes: ``param_axes(config)``: the same pytree with a tuple of :data:`AXES` names per leaf.
      embed: ``embed(config, params, tokens [B, S]) -> [B, S, D]``.
      block: ``block(config, layer, spec, x, positions, cache_kv, sites, layout) -> (x, (k, v))``, one layer
        (the contract is documented on ``mtijax.models.gemma3.block``).
      unembed: ``unembed(config, params, x [..., D]) -> float32 logits [..., V]``.
      hf_model_types: the ``model_type`` values of Hugging Face ``config.json`` it reads.
      from_hf: ``from_hf(raw config.json dict, where) -> config``.
      hf_tensors: ``hf_tensors(config) -> [TensorSlot]``, every tensor of a Hugging Face checkpoint.
      gguf_architectures: the GGUF ``general.architecture`` values it claims.
      from_gguf: ``from_gguf(metadata, vocab_size, where, extra_eos) -> config``, or None: GGUF not supported yet.
      gguf_tensors: ``gguf_tensors(config) -> [TensorSlot]``, or None.
      presets: published sizes, ``name -> config``.
      summary: ``summary(config) -> dict``, the family's own lines of ``mtijax info``.
    """

    name: str
    config_type: type[C]
    sites: tuple[str, ...]
    layer_spec: Callable[[C], Mapping[str, Any]]
    param_shapes: Callable[[C], Params]
    param_axes: Callable[[C], Params]
    embed: Callable[[C, Params, jax.Array], jax.Array]
    block: Callable[..., tuple[jax.Array, tuple[jax.Array, jax.Array]]]
    unembed: Callable[[C, Params, jax.Array], jax.Array]
    hf_model_types: tuple[str, ...]
    from_hf: Callable[[Mapping[str, Any], str], C]
    hf_tensors: Callable[[C], list[TensorSlot]]
    summary: Callable[[C], dict[str, Any]]
    capture_only: tuple[str, ...] = ()
    gguf_architectures: tuple[str, ...] = ()
    from_gguf: Callable[[Mapping[str, Any], int, str, tuple[int, ...]], C] | None = None
    gguf_tensors: Callable[[C], list[TensorSlot]] | None = None
    presets: Mapping[str, C] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if set(self.capture_only) - set(self.sites):
            raise ValueError(f"{self.name}: capture-only sites {self.capture_only} are not all in {self.sites}")

    def tensors(self, config: C, fmt: str) -> list[TensorSlot]:
        """Every tensor of ``config``'s checkpoint in ``fmt`` (``"hf"`` or ``"gguf"``), in file order."""
        if fmt == "hf":
            return self.hf_tensors(config)
        if fmt == "gguf" and self.gguf_tensors is not None:
            return self.gguf_tensors(config)
        raise MtijaxError(f"no {fmt} tensor names known for architecture {self.name!r}")

