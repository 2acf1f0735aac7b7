"""Training the spiking MoE gate's per-layer constants with surrogate gradients, on tiny random OLMoEs.

The seed's gate (decay 0.91, gain 0.18, threshold 0.75 in every layer)
routes each token on a spiking membrane driven by the router logits. Here
its constants, one set per layer, are fitted with optax (Adam) so that its
top-k agrees with the softmax router's top-k, by teacher forcing: the router
logits ``[L, B, S, E]`` are captured from the plain forward
(``mtijax.forward(..., capture=("router_logits",))``) and every layer's gate
runs over its own layer's logits (``mtijax.snn.gate_training``). The loss is
the cross-entropy of the gate's routing softmax against the router's top-k,
differentiated through the spikes by a surrogate gradient.

Models: the three tiny random OLMoEs of ``tests/olmoe_fixtures.py``
(written by transformers, loaded by mtijax), so the router has no semantics.
Tokens are uniformly random ids: training on one set of sequences, agreement
measured on another (held out). Compared on the held-out tokens: the
untrained seed gate, random constants (a control, many draws), and the gate
trained from the seed's constants with the fast-sigmoid surrogate, with the
arctan surrogate, and with no surrogate (gradients through the membranes only),
each once with all three constants free and once with the decay held at the
seed's 0.91 (so the gate keeps its memory and must tune its spikes).

    python experiments/train_spiking_gate.py [--steps 300] [--random-draws 32]

Writes ``experiments/results/train_spiking_gate/results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import mtijax  # noqa: E402
from mtijax.snn import gate_training  # noqa: E402
from tests.olmoe_fixtures import OLMOE_CONFIGS, make_olmoe_model  # noqa: E402

BATCH, LENGTH = 16, 64
TRAIN_SEED, HELD_OUT_SEED = 1, 2


def load_tiny(variant: str, directory: Path) -> mtijax.Model:
    """The fixture's random OLMoE, saved by transformers and loaded by mtijax."""
    make_olmoe_model(variant).save_pretrained(directory / variant, max_shard_size="64KB")
    return mtijax.load(directory / variant, progress=False)


def router_logits(model: mtijax.Model, seed: int) -> jax.Array:
    """Softmax-routed forward over random tokens ``[BATCH, LENGTH]``: router logits ``[L, B, S, E]``."""
    tokens = np.random.default_rng(seed).integers(2, model.config.vocab_size, size=(BATCH, LENGTH))
    out = mtijax.forward(model.config, model.params, jnp.asarray(tokens, jnp.int32), capture=("router_logits",))
    return out.captured["router_logits"].astype(jnp.float32)


def machine() -> str:
    """The CPU this ran on, e.g. ``AMD EPYC (2 cores, x86_64)``, and the jax version."""
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.exists() else []
    name = names[0] if names else platform.processor() or "CPU"
    return f"{name} ({os.cpu_count()} cores, {platform.machine()}), jax {jax.__version__} on {jax.devices()[0]}"


def rounded(x) -> list[float]:
    return np.round(np.asarray(x, np.float64), 4).tolist()


def summary(per_layer) -> dict:
    """Agreement per layer and its mean over layers."""
    return {"per_layer": rounded(per_layer), "mean": round(float(np.mean(per_layer)), 4)}


def variant_section(model: mtijax.Model, steps: int, draws: int, learning_rate: float) -> dict:
    config = model.config
    k, layers = config.num_experts_per_tok, config.num_layers
    train, held_out = router_logits(model, TRAIN_SEED), router_logits(model, HELD_OUT_SEED)
    seed = gate_training.seed_constants(layers)
    randoms = [gate_training.random_constants(jax.random.key(i), layers) for i in range(draws)]
    random_means = [float(jnp.mean(gate_training.agreement(held_out, c, k))) for c in randoms]
    result = {
        "experts": config.num_experts, "top_k": k, "layers": layers, "chance": round(k / config.num_experts, 4),
        "held_out_tokens": BATCH * LENGTH, "train_tokens": BATCH * LENGTH,
        "untrained_seed_gate": summary(gate_training.agreement(held_out, seed, k)),
        "random_constants": {"draws": draws, "mean": round(float(np.mean(random_means)), 4),
                             "std": round(float(np.std(random_means)), 4),
                             "min": round(float(np.min(random_means)), 4),
                             "max": round(float(np.max(random_means)), 4), "ranges": gate_training.RANDOM_RANGES},
    }
    for trainable, key in ((gate_training.NAMES, "trained"), (("gain", "threshold"), "trained_decay_held")):
        result[key] = {}
        for surrogate in ("fast_sigmoid", "arctan", None):
            fit = gate_training.train_gate(train, k, init=seed, steps=steps, learning_rate=learning_rate,
                                           surrogate=surrogate, trainable=trainable)
            result[key][surrogate or "none"] = {
                "held_out": summary(gate_training.agreement(held_out, fit.constants, k)),
                "train": summary(gate_training.agreement(train, fit.constants, k)),
                "loss_first": round(float(fit.losses[0]), 5), "loss_last": round(float(fit.losses[-1]), 5),
                "constants": {name: rounded(value) for name, value in fit.constants.items()},
            }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--learning-rate", type=float, default=0.02)
    parser.add_argument("--random-draws", type=int, default=32)
    parser.add_argument("--out", default=str(ROOT / "experiments" / "results" / "train_spiking_gate"))
    args = parser.parse_args()
    started, cpu_started = time.perf_counter(), time.process_time()
    with tempfile.TemporaryDirectory() as directory:
        models = {variant: load_tiny(variant, Path(directory)) for variant in sorted(OLMOE_CONFIGS)}
        variants = {variant: variant_section(model, args.steps, args.random_draws, args.learning_rate)
                    for variant, model in models.items()}
    results = {
        "what": "spiking MoE gate constants (decay, gain, threshold per layer) trained with Adam to agree with the "
                "softmax router's top-k, teacher-forced on captured router logits; agreement = mean |gate top-k & "
                "router top-k| / k on held-out random tokens of tiny random OLMoEs (tests/olmoe_fixtures.py)",
        "steps": args.steps, "learning_rate": args.learning_rate, "optimizer": "adam, full batch",
        "loss": "cross-entropy of the gate's routing softmax against the router's top-k set (1/k each)",
        "machine": machine(),
        "seconds": round(time.perf_counter() - started, 1),
        "cpu_seconds": round(time.process_time() - cpu_started, 1),
        "variants": variants,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print("held-out top-k agreement, mean over layers; trained with surrogate fast_sigmoid / arctan / none")
    print(f"{'model':<18} {'chance':>6} {'seed gate':>9} {'random':>13} {'all three free':>22} {'decay held':>22}")
    for variant, r in variants.items():
        free, held = (" / ".join(f"{r[key][s]['held_out']['mean']:.3f}" for s in ("fast_sigmoid", "arctan", "none"))
                      for key in ("trained", "trained_decay_held"))
        print(f"{variant:<18} {r['chance']:>6.3f} {r['untrained_seed_gate']['mean']:>9.3f} "
              f"{r['random_constants']['mean']:>6.3f}±{r['random_constants']['std']:.3f} {free:>22} {held:>22}")
    print(f"wrote {out / 'results.json'} ({results['seconds']} s, {results['cpu_seconds']} s of CPU, on "
          f"{results['machine']})")


if __name__ == "__main__":
    main()
