"""What a set of fusion layers is made of: :class:`FusionConfig`, its presets, and ``for_model``.

A config is a frozen, hashable dataclass (a static argument of every jitted function). It does not
hold the hidden size: that comes from the base model when the parameters are made (``init_fusion``),
so one config serves any model deep enough for its positions.

Decisions where the original (``apps/llm_fusion`` of tinyaleph-py) and the issue leave room:

- ``alpha`` is the *initial blend weight* ``sigmoid(alpha_param)``. The original stored the preset's
  0.05 in the raw parameter and then applied the sigmoid, so its "minimal, alpha 0.05" preset started
  at a blend of 0.51; here it starts at 0.05, as the preset's name and comment intend. Every preset
  starts at 0.05, so the fused model starts close to the base model (the original's standard preset
  started at ``sigmoid(0.5) = 0.62``, i.e. most of the residual stream replaced by an untrained branch).
- ``norm`` defaults to ``"fusion"`` (a LayerNorm on the fusion branch, placed before the gate: see
  ``mtijax.fusion.layer``). The original's default
  ``"output"`` LayerNorms the whole residual stream leaving the layer; Gemma's residual stream has
  norms in the hundreds to thousands, so that rescales what every later block adds to by orders of
  magnitude. It is available, not the default.
- The Kuramoto coupling is ``"causal"`` by default (token i couples to tokens j <= i), so the fused
  model stays a causal language model and incremental decoding is exact; ``"sequence"`` is the
  original's every-token-to-every-token coupling (see ``mtijax.fusion.kuramoto``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from mtijax.config import ModelConfig
from mtijax.errors import MtijaxError

COMPONENTS = ("prime", "quaternion", "kuramoto", "prsc", "smf", "coherence_gate")
"""Component names in the order a fusion layer applies them."""
MODES = ("parallel", "sequential", "residual")
NORMS = ("output", "fusion", "none")
PRESETS = ("minimal", "standard", "full")


@dataclasses.dataclass(frozen=True)
class FusionConfig:
    """Which base layers get a fusion layer, which components it runs, and their constants.

    Attributes:
      positions: base layers whose output residual stream passes through a fusion layer.
      components: a subset of :data:`COMPONENTS`. None at all leaves the norm and ``W_o``: in parallel or
        residual mode a plain linear adapter, the control for what the resonance components add.
      mode: ``parallel`` (``h + s W_o x``), ``sequential`` (``x``) or ``residual`` (``(1 - s) h + s W_o x``),
        with ``s = sigmoid(alpha_param)``.
      norm: LayerNorm on the layer's ``output``, on the ``fusion`` branch ``x`` before ``W_o``, or ``none``.
      alpha: initial ``s`` in (0, 1); ``learnable_alpha`` makes ``alpha_param`` a parameter.
      num_primes, prime_quaternion, learnable_phases: prime projection (quaternion or complex amplitudes).
      kuramoto_coupling: ``K0`` (``K = K0 sigmoid(coupling_scale)``). kuramoto_steps, kuramoto_dt: Euler steps.
      kuramoto_sign: ``attractive`` (``+ sin(theta_j - theta_i)``, the documented model) or ``original``
        (``sin(theta_i - theta_j)``, what the original code computes).
      kuramoto_scope: ``causal`` or ``sequence`` (see the module docstring).
      kuramoto_blend: initial raw ``beta`` (output ``h + sigmoid(beta) r W [cos, sin]``).
      max_positions: rows of the quaternion layer's learned position table (later positions use the last row).
      gate_threshold: initial raw ``tau`` (``gate = sigmoid(steepness (C - sigmoid(tau)))``).
      prsc_mix: initial raw ``c`` of the PRSC blend; prsc_weight: the fixed weight of its output.
      smf_slots, smf_dim, smf_decay, smf_weight, smf_importance: the memory bank.
    """

    positions: tuple[int, ...]
    components: tuple[str, ...] = ("prime", "quaternion", "kuramoto", "coherence_gate")
    mode: str = "residual"
    norm: str = "fusion"
    alpha: float = 0.05
    learnable_alpha: bool = True
    num_primes: int = 25
    prime_quaternion: bool = True
    learnable_phases: bool = True
    kuramoto_coupling: float = 1.0
    kuramoto_steps: int = 5
    kuramoto_dt: float = 0.01
    kuramoto_sign: str = "attractive"
    kuramoto_scope: str = "causal"
    kuramoto_blend: float = 0.1
    max_positions: int = 1000
    gate_threshold: float = 0.7
    gate_steepness: float = 10.0
    prsc_mix: float = 0.1
    prsc_weight: float = 0.1
    smf_slots: int = 1000
    smf_dim: int = 16
    smf_decay: float = 0.01
    smf_weight: float = 0.05
    smf_importance: float = 0.8

    def __post_init__(self) -> None:
        object.__setattr__(self, "positions", tuple(int(p) for p in self.positions))
        object.__setattr__(self, "components", tuple(self.components))
        unknown = [c for c in self.components if c not in COMPONENTS]
        if unknown:
            raise MtijaxError(f"unknown fusion component {unknown[0]!r}; the components are {', '.join(COMPONENTS)}")
        if not self.positions:
            raise MtijaxError("a fusion config needs at least one position")
        if len(set(self.positions)) != len(self.positions) or any(p < 0 for p in self.positions):
            raise MtijaxError(f"fusion positions must be distinct layer indices >= 0, got {list(self.positions)}")
        for name, value, allowed in (("mode", self.mode, MODES), ("norm", self.norm, NORMS),
                                     ("kuramoto_sign", self.kuramoto_sign, ("attractive", "original")),
                                     ("kuramoto_scope", self.kuramoto_scope, ("causal", "sequence"))):
            if value not in allowed:
                raise MtijaxError(f"fusion {name} must be one of {', '.join(allowed)}, got {value!r}")
        if not 0 < self.alpha < 1:
            raise MtijaxError(f"fusion alpha is the initial blend weight and must be in (0, 1), got {self.alpha}")
        for name in ("num_primes", "kuramoto_steps", "max_positions", "smf_slots", "smf_dim"):
            if getattr(self, name) < 1:
                raise MtijaxError(f"fusion {name} must be >= 1, got {getattr(self, name)}")

    @property
    def alpha_logit(self) -> float:
        """The raw parameter whose sigmoid is ``alpha``."""
        return math.log(self.alpha / (1 - self.alpha))

    def uses(self, component: str) -> bool:
        """Whether ``component`` is switched on."""
        return component in self.components

    def replace(self, **changes: Any) -> "FusionConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict that :meth:`from_json` reads back."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "FusionConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise MtijaxError(f"unknown fusion config field {unknown[0]!r}")
        return cls(**data)

    @classmethod
    def minimal(cls, num_layers: int = 12) -> "FusionConfig":
        """One layer at the middle of the model: prime projection (16 primes, complex amplitudes) and the gate."""
        return cls(positions=spread(num_layers, "minimal"), components=("prime", "coherence_gate"),
                   num_primes=16, prime_quaternion=False)

    @classmethod
    def standard(cls, num_layers: int = 12) -> "FusionConfig":
        """Prime projection, quaternion rotation, Kuramoto and the gate at 3 positions spread over depth."""
        return cls(positions=spread(num_layers, "standard"))

    @classmethod
    def full(cls, num_layers: int = 12) -> "FusionConfig":
        """All six components at 6 positions spread over depth."""
        return cls(positions=spread(num_layers, "full"), components=COMPONENTS)


def spread(num_layers: int, preset: str) -> tuple[int, ...]:
    """Fusion positions of ``preset`` for a model of ``num_layers`` layers.

    ``minimal``: the middle layer (``L // 2``). ``standard`` and ``full``: ``k = 3`` or ``6`` positions at
    ``round(L i / k)`` for ``i = 1..k``, the last clamped to ``L - 1`` (for the original's 12 layers:
    ``4, 8, 11`` and ``2, 4, 6, 8, 10, 11``, its own choices); a shallow model gets fewer, distinct, positions.
    """
    if num_layers < 1:
        raise MtijaxError(f"a model needs at least one layer, got {num_layers}")
    if preset == "minimal":
        return (num_layers // 2,)
    counts = {"standard": 3, "full": 6}
    if preset not in counts:
        raise MtijaxError(f"unknown fusion preset {preset!r}; the presets are {', '.join(PRESETS)}")
    k = counts[preset]
    return tuple(sorted({min(math.floor(num_layers * i / k + 0.5), num_layers - 1) for i in range(1, k + 1)}))


def for_model(config: ModelConfig, preset: str = "standard", **changes: Any) -> FusionConfig:
    """The preset ``preset`` with its positions spread over ``config``'s depth (any Gemma 3 or OLMoE);
    ``changes`` override fields (e.g. ``mode="parallel"``)."""
    if preset not in PRESETS:
        raise MtijaxError(f"unknown fusion preset {preset!r}; the presets are {', '.join(PRESETS)}")
    fusion = getattr(FusionConfig, preset)(config.num_layers)
    fusion = fusion.replace(**changes) if changes else fusion
    check_against_model(fusion, config)
    return fusion


def check_against_model(fusion: FusionConfig, config: ModelConfig) -> None:
    """Raise if a fusion position lies outside ``config``'s layers."""
    outside = [p for p in fusion.positions if p >= config.num_layers]
    if outside:
        raise MtijaxError(f"fusion position {outside[0]} is outside the model: it has layers "
                          f"0..{config.num_layers - 1}")
