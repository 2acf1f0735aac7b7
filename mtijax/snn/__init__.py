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

__all__ = [
    "COLLAPSE_EFFECTIVE_UNITS", "COLLAPSE_TOP_SHARE", "Collapse", "collapse", "dominant_band", "dominant_units",
    "network_null", "permutation_test", "similarity", "activation_driver", "embedding_driver", "l2_normalise",
    "make_driver", "plot_best_unit", "plot_raster", "telemetry", "write_telemetry", "gate_telemetry",
    "write_gate_telemetry", "SEED_GATE", "SOFTMAX_LIMIT", "gate_logits", "gate_scan", "spiking_gate",
    "Network", "Routing", "simulate", "simulate_batch", "stack_frames", "RouteStudy", "route_prompts", "Surrogate",
    "heaviside", "make_surrogate", "identity_synapses", "model_synapses", "random_synapses", "shuffled_synapses",
    "ALIF", "GIF", "LIF", "UnitState"
]
