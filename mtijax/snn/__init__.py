"""Spiking units driven by a model's hidden states (seed 003: corinth-canal's "walkers"), and a spiking MoE gate.

::

    net = Network(model_synapses(model.params, "layers/attn/q_proj", 0))       # the seed's GIF units
    frames = embedding_driver(model.config, model.params, ids)                 # [1, D], L2-normalised
    routing = simulate(net, frames, 10_000)                                    # one jitted lax.scan
    collapse(routing), dominant_units(routing), write_telemetry([routing], "out/telemetry")

``units`` (GIF, LIF, ALIF), ``network`` (simulate, simulate_batch: jit, vmap and
grad transforms), ``surrogate`` (surrogate gradients of the spike), ``synapses``,
``drivers``, ``analysis``, ``export``, ``gate`` (the spiking OLMoE router),
``gate_training`` (its constants fitted to the softmax router) and ``study``
(``mtijax snn route``) each do one job.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mtijax.lazy_exports import lazy_exports

# Names load on first use, so importing the package (the CLI does) imports no optax or pyarrow.
_EXPORTS = {
    "gate_training": "mtijax.snn.gate_training",
    "COLLAPSE_EFFECTIVE_UNITS": "mtijax.snn.analysis",
    "COLLAPSE_TOP_SHARE": "mtijax.snn.analysis",
    "Collapse": "mtijax.snn.analysis",
    "collapse": "mtijax.snn.analysis",
    "dominant_band": "mtijax.snn.analysis",
    "dominant_units": "mtijax.snn.analysis",
    "network_null": "mtijax.snn.analysis",
    "permutation_test": "mtijax.snn.analysis",
    "similarity": "mtijax.snn.analysis",
    "activation_driver": "mtijax.snn.drivers",
    "embedding_driver": "mtijax.snn.drivers",
    "l2_normalise": "mtijax.snn.drivers",
    "make_driver": "mtijax.snn.drivers",
    "gate_telemetry": "mtijax.snn.export",
    "plot_best_unit": "mtijax.snn.export",
    "plot_raster": "mtijax.snn.export",
    "telemetry": "mtijax.snn.export",
    "write_gate_telemetry": "mtijax.snn.export",
    "write_telemetry": "mtijax.snn.export",
    "SEED_GATE": "mtijax.snn.gate",
    "SOFTMAX_LIMIT": "mtijax.snn.gate",
    "gate_logits": "mtijax.snn.gate",
    "gate_scan": "mtijax.snn.gate",
    "spiking_gate": "mtijax.snn.gate",
    "Network": "mtijax.snn.network",
    "Routing": "mtijax.snn.network",
    "simulate": "mtijax.snn.network",
    "simulate_batch": "mtijax.snn.network",
    "stack_frames": "mtijax.snn.network",
    "RouteStudy": "mtijax.snn.study",
    "route_prompts": "mtijax.snn.study",
    "Surrogate": "mtijax.snn.surrogate",
    "heaviside": "mtijax.snn.surrogate",
    "make_surrogate": "mtijax.snn.surrogate",
    "identity_synapses": "mtijax.snn.synapses",
    "model_synapses": "mtijax.snn.synapses",
    "random_synapses": "mtijax.snn.synapses",
    "shuffled_synapses": "mtijax.snn.synapses",
    "ALIF": "mtijax.snn.units",
    "GIF": "mtijax.snn.units",
    "LIF": "mtijax.snn.units",
    "UnitState": "mtijax.snn.units",
}

if TYPE_CHECKING:
    from mtijax.snn import gate_training
    from mtijax.snn.analysis import (COLLAPSE_EFFECTIVE_UNITS, COLLAPSE_TOP_SHARE, Collapse, collapse, dominant_band,
                                     dominant_units, network_null, permutation_test, similarity)
    from mtijax.snn.drivers import activation_driver, embedding_driver, l2_normalise, make_driver
    from mtijax.snn.export import (gate_telemetry, plot_best_unit, plot_raster, telemetry, write_gate_telemetry,
                                   write_telemetry)
    from mtijax.snn.gate import SEED_GATE, SOFTMAX_LIMIT, gate_logits, gate_scan, spiking_gate
    from mtijax.snn.network import Network, Routing, simulate, simulate_batch, stack_frames
    from mtijax.snn.study import RouteStudy, route_prompts
    from mtijax.snn.surrogate import Surrogate, heaviside, make_surrogate
    from mtijax.snn.synapses import identity_synapses, model_synapses, random_synapses, shuffled_synapses
    from mtijax.snn.units import ALIF, GIF, LIF, UnitState

__getattr__, __dir__ = lazy_exports(globals(), _EXPORTS)

__all__ = [
    "COLLAPSE_EFFECTIVE_UNITS", "COLLAPSE_TOP_SHARE", "Collapse", "collapse", "dominant_band", "dominant_units",
    "network_null", "permutation_test", "similarity", "activation_driver", "embedding_driver", "l2_normalise",
    "make_driver", "plot_best_unit", "plot_raster", "telemetry", "write_telemetry", "gate_telemetry",
    "write_gate_telemetry", "SEED_GATE", "SOFTMAX_LIMIT", "gate_logits", "gate_scan", "spiking_gate",
    "Network", "Routing", "simulate", "simulate_batch", "stack_frames", "RouteStudy", "route_prompts", "Surrogate",
    "heaviside", "make_surrogate", "identity_synapses", "model_synapses", "random_synapses", "shuffled_synapses",
    "ALIF", "GIF", "LIF", "UnitState"
]
