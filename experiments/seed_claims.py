"""The seeds' own published numbers, which the experiments and the README tables set beside the measurements.

Each constant is transcribed from the seed document named in its comment; none was measured here.
"""

from __future__ import annotations

# seed 000, "Resonance Injection": Gemma 3 27B's layer-0 q_proj into Gemma 3 12B's layer 0, through a forward
# pass without Gemma's sqrt(d) embedding scale and (1 + w) norms: (alpha, output norm, divergence).
INJECTION_TABLE = (
    (0.00, 2677.11, 0.00), (0.05, 2656.39, 25.25), (0.10, 2632.94, 53.67),
    (0.20, 2575.34, 122.98), (0.35, 2447.07, 276.53), (0.50, 2239.56, 529.65),
)

# seed 002, fusion layers: the forward-time and memory overhead it states for each preset.
FUSION_TIME_OVERHEAD = {"minimal": 0.05, "standard": 0.15, "full": 0.25}
FUSION_MEMORY_OVERHEAD = {"minimal": 0.02, "standard": 0.05, "full": 0.08}
