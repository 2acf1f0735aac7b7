"""Speed of mtijax's spiking units against peers measured in the same run, on the same device.

Two workloads:

* **seed**: the seed's run, 2048 GIF units ("walkers") x 10,000 ticks driven by
  one constant L2-normalised input through a 2048 x 2048 synaptic matrix (random,
  std 0.04 like real q-projections), for a batch of 1 and of 8 inputs. Peers:
  the same equations as a PyTorch loop over ticks (on the GPU when there is one)
  and as a NumPy loop (CPU). Every implementation records the best unit of
  every tick and the spikes.
* **lif**: the Open Neuromorphic SNN library benchmark's layer, a 16,384-unit
  linear layer into LIF units (leak 0.9, threshold 1, reset by subtraction),
  batch 16, 500 ticks, forward only, float32. Peers: spyx (``spyx.nn.run`` of a
  ``Sequential(Linear, LIF)``, jitted as ``spyx.bench`` does) and snnTorch
  (``nn.Linear`` + ``snn.Leaky``, one step per tick, as its tutorials do). The
  published anchor (forward + backward, RTX 4090) is spyx 0.076 s vs snnTorch
  3.08 s. mtijax computes the input currents of all ticks as one matmul (the
  layer has no recurrence) and then scans the units over ticks.

Matmuls are full float32 everywhere (JAX ``highest`` precision, no TF32 in
PyTorch). Times are medians over ``--repeats`` runs after a warm-up run (JAX
compile time reported separately), each synchronised on its output. A peer
that cannot be imported is recorded as unavailable and skipped.

    python experiments/bench_snn.py [--quick] [--peers DIR] [--out FILE.json]

``--peers DIR`` appends a directory of installed peer packages to ``sys.path``
(e.g. ``pip install --no-deps --target /tmp/peers .whl/snn/*.whl``).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave GPU memory for PyTorch in the same run

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mtijax.snn import GIF, LIF, Network, simulate_batch  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def median_time(fn, repeats: int) -> tuple[float, float, object]:
    """(first-call seconds, median seconds of ``repeats`` more calls, last output); ``fn`` synchronises."""
    start = time.perf_counter()
    out = fn()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return first, statistics.median(times), out


def peer(name: str) -> tuple[object | None, str]:
    """The imported module, or None and why not."""
    try:
        module = importlib.import_module(name)
    except Exception as e:  # any import failure makes the peer unavailable, recorded as such
        return None, f"unavailable: {type(e).__name__}: {e}"
    return module, getattr(module, "__version__", "unknown version")


# --- the seed's workload ---------------------------------------------------------------------------------------

def seed_inputs(units: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    synapses = (rng.normal(size=(units, units)) * 0.04).astype(np.float32)
    frames = rng.normal(size=(batch, 1, units)).astype(np.float32)
    return synapses, frames / np.linalg.norm(frames, axis=-1, keepdims=True)


def gif_torch(torch, synapses: np.ndarray, frames: np.ndarray, ticks: int, device: str):
    """The GIF equations as a PyTorch loop over ticks: best unit per tick and spikes ``[ticks, B, units]``."""
    w = torch.from_numpy(synapses).to(device)
    current = torch.from_numpy(frames[:, 0]).to(device) @ w  # [B, units], constant input
    f = lambda x: torch.tensor(x, dtype=torch.float32, device=device)  # noqa: E731
    leak, gain, drive, decay, theta0, fatigue, reset, readout = map(f, (0.92, 0.75, 0.05, 0.94, 0.65, 0.22, 0.35,
                                                                        0.22))
    v = torch.zeros_like(current)
    a = torch.zeros_like(current)
    r = torch.zeros_like(current, dtype=torch.int32)
    best = torch.empty((ticks, current.shape[0]), dtype=torch.int64, device=device)
    spikes = torch.empty((ticks, *current.shape), dtype=torch.bool, device=device)
    zero = f(0.0)
    for t in range(ticks):
        refractory = r > 0
        a = decay * a
        v_new = leak * v + gain * current - drive * a
        theta = theta0 + fatigue * a
        spiked = ~refractory & (v_new >= theta)
        v = torch.where(refractory, zero, torch.where(spiked, v_new - reset * theta, v_new))
        a = torch.where(spiked, a + 1, a)
        r = torch.where(spiked, torch.full_like(r, 2), torch.clamp(r - 1, min=0))
        best[t] = torch.argmax(v - readout * a, dim=-1)
        spikes[t] = spiked
    return best, spikes


def gif_numpy(synapses: np.ndarray, frames: np.ndarray, ticks: int):
    """The GIF equations as a NumPy loop over ticks (vectorised over units and the batch)."""
    f = np.float32
    current = frames[:, 0] @ synapses
    v, a = np.zeros_like(current), np.zeros_like(current)
    r = np.zeros(current.shape, np.int32)
    best = np.empty((ticks, current.shape[0]), np.int64)
    spikes = np.empty((ticks, *current.shape), bool)
    for t in range(ticks):
        refractory = r > 0
        a = f(0.94) * a
        v_new = f(0.92) * v + f(0.75) * current - f(0.05) * a
        theta = f(0.65) + f(0.22) * a
        spiked = ~refractory & (v_new >= theta)
        v = np.where(refractory, f(0), np.where(spiked, v_new - f(0.35) * theta, v_new))
        a = np.where(spiked, a + f(1), a)
        r = np.where(spiked, 2, np.maximum(r - 1, 0))
        best[t] = np.argmax(v - f(0.22) * a, axis=-1)
        spikes[t] = spiked
    return best, spikes


def seed_workload(units: int, ticks: int, batches: list[int], unrolls: list[int], repeats: int, torch,
                  device: str) -> list[dict]:
    rows = []
    for batch in batches:
        synapses, frames = seed_inputs(units, batch)
        net = Network(jnp.asarray(synapses), GIF())
        row = {"workload": "seed", "units": units, "ticks": ticks, "batch": batch}
        best_jax = None
        for unroll in unrolls:
            def run_jax():
                out = simulate_batch(net, jnp.asarray(frames), ticks, unroll=unroll)
                return jax.block_until_ready(out)
            first, median, out = median_time(run_jax, repeats)
            row[f"mtijax_unroll{unroll}_s"] = median
            row[f"mtijax_unroll{unroll}_compile_s"] = first - median
            best_jax = np.asarray(out.best_unit)  # [B, ticks]
        row["mtijax_s"] = min(row[f"mtijax_unroll{u}_s"] for u in unrolls)
        if torch is not None:
            def run_torch():
                best, spikes = gif_torch(torch, synapses, frames, ticks, device)
                if device == "cuda":
                    torch.cuda.synchronize()
                return best
            _, row["torch_loop_s"], best_torch = median_time(run_torch, max(1, repeats // 2))
            row["torch_agreement"] = float(np.mean(best_torch.cpu().numpy().T == best_jax))
        _, row["numpy_loop_s"], (best_np, _) = median_time(lambda: gif_numpy(synapses, frames, ticks), 1)
        row["numpy_agreement"] = float(np.mean(best_np.T == best_jax))
        for name in ("mtijax", "torch_loop", "numpy_loop"):
            if f"{name}_s" in row:
                row[f"{name}_ticks_per_s"] = ticks / row[f"{name}_s"]
        rows.append(row)
    return rows


# --- the LIF layer ---------------------------------------------------------------------------------------------

def lif_inputs(units: int, ticks: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    weight = (rng.normal(size=(units, units)) / np.sqrt(units)).astype(np.float32)  # [in, out]
    x = rng.normal(size=(ticks, batch, units)).astype(np.float32)
    return weight, x


def run_peer(row: dict, name: str, measure) -> None:
    """Record a peer's ``{name}_s``, ``{name}_spike_rate`` (and compile time); a peer that fails while running
    is recorded as failed, so one broken peer does not lose the rest of the run."""
    try:
        row.update({f"{name}_{key}": value for key, value in measure().items()})
    except Exception as e:  # a peer's own failure is a result to record, not a reason to stop
        row[f"{name}_version"] += f" (failed: {type(e).__name__}: {e})"


def time_spyx(weight: np.ndarray, x: np.ndarray, repeats: int) -> dict:
    """spyx's ``Sequential(Linear, LIF)`` run over the ticks with ``spyx.nn.run``, jitted as ``spyx.bench`` does."""
    import spyx.nn
    from flax import nnx

    units = weight.shape[0]
    rngs = nnx.Rngs(0)
    linear = nnx.Linear(units, units, use_bias=False, rngs=rngs)
    linear.kernel.value = jnp.asarray(weight)
    model = spyx.nn.Sequential(linear, spyx.nn.LIF((units,), beta=0.9, threshold=1.0, rngs=rngs))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    forward = jax.jit(lambda p, xs: spyx.nn.run(nnx.merge(graphdef, p, rest), xs)[0])
    xs = jnp.asarray(x)
    first, median, spikes = median_time(lambda: jax.block_until_ready(forward(params, xs)), repeats)
    return {"s": median, "compile_s": first - median, "spike_rate": float(jnp.mean(spikes))}


def time_snntorch(snntorch, torch, weight: np.ndarray, x: np.ndarray, repeats: int, device: str) -> dict:
    """snnTorch's ``nn.Linear`` + ``snn.Leaky``, one step per tick under ``torch.no_grad``."""
    units, ticks = weight.shape[0], x.shape[0]
    fc = torch.nn.Linear(units, units, bias=False).to(device)
    with torch.no_grad():
        fc.weight.copy_(torch.from_numpy(weight.T))
    lif = snntorch.Leaky(beta=0.9, threshold=1.0, reset_mechanism="subtract").to(device)
    xt = torch.from_numpy(x).to(device)

    def run():
        with torch.no_grad():
            mem = lif.reset_mem()
            spikes = []
            for t in range(ticks):
                spk, mem = lif(fc(xt[t]), mem)
                spikes.append(spk)
            out = torch.stack(spikes)
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    _, median, spikes = median_time(run, repeats)
    rate = float(spikes.float().mean())
    del spikes, xt
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"s": median, "spike_rate": rate}


def lif_workload(units: int, ticks: int, batch: int, repeats: int, torch, device: str) -> dict:
    weight, x = lif_inputs(units, ticks, batch)
    row = {"workload": "lif", "units": units, "ticks": ticks, "batch": batch}

    net = Network(jnp.asarray(weight), LIF(leak=0.9, gain=1.0, threshold=1.0))
    frames = jnp.asarray(np.swapaxes(x, 0, 1))  # [B, ticks, units]: one frame per tick

    def run_mtijax():
        return jax.block_until_ready(simulate_batch(net, frames, ticks, raster_bin=1))

    first, row["mtijax_s"], out = median_time(run_mtijax, repeats)
    row["mtijax_compile_s"] = first - row["mtijax_s"]
    row["mtijax_spike_rate"] = float(jnp.mean(out.raster.astype(jnp.float32)))
    del out

    spyx, row["spyx_version"] = peer("spyx")
    if spyx is not None:
        run_peer(row, "spyx", lambda: time_spyx(weight, x, repeats))
    snntorch, row["snntorch_version"] = peer("snntorch")
    if snntorch is not None and torch is not None:
        run_peer(row, "snntorch", lambda: time_snntorch(snntorch, torch, weight, x, repeats, device))
    for name in ("mtijax", "spyx", "snntorch"):
        if f"{name}_s" in row:
            row[f"{name}_ticks_per_s"] = ticks / row[f"{name}_s"]
    return row


def _mtijax_version() -> str:
    """The installed mtijax version, or ``"source tree"`` when it runs from a checkout on ``PYTHONPATH``."""
    try:
        return importlib.metadata.version("mtijax")
    except importlib.metadata.PackageNotFoundError:
        return "source tree"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes (a CPU check)")
    parser.add_argument("--peers", default=None, help="a directory of peer packages to append to sys.path")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--unrolls", default="1,8", help="lax.scan unroll factors to time for the seed workload")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_snn.json"))
    args = parser.parse_args()
    if args.peers:
        sys.path.append(args.peers)
    torch, torch_version = peer("torch")
    device = "cuda" if torch is not None and torch.cuda.is_available() else "cpu"
    if torch is not None:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    unrolls = [int(u) for u in args.unrolls.split(",")]
    if args.quick:
        seed = dict(units=256, ticks=1000, batches=[1, 4])
        lif = dict(units=512, ticks=100, batch=4)
    else:
        seed = dict(units=2048, ticks=10_000, batches=[1, 8])
        lif = dict(units=16_384, ticks=500, batch=16)

    rows = seed_workload(**seed, unrolls=unrolls, repeats=args.repeats, torch=torch, device=device)
    rows.append(lif_workload(**lif, repeats=args.repeats, torch=torch, device=device))
    result = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__, "mtijax": _mtijax_version(),
              "torch": torch_version, "torch_device": device, "python": platform.python_version(),
              "quick": args.quick, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))

    print(f"{result['device']}, jax {jax.__version__}, torch {torch_version} on {device}")
    for row in rows[:-1]:
        line = (f"seed: {row['units']} GIF units x {row['ticks']} ticks, batch {row['batch']}: mtijax "
                f"{row['mtijax_s'] * 1e3:.1f} ms ({row['mtijax_ticks_per_s']:,.0f} ticks/s; "
                + ", ".join(f"unroll {u}: {row[f'mtijax_unroll{u}_s'] * 1e3:.1f} ms" for u in unrolls) + ")")
        if "torch_loop_s" in row:
            line += (f"; torch loop {row['torch_loop_s'] * 1e3:.1f} ms ({row['torch_loop_s'] / row['mtijax_s']:.1f}x"
                     f" slower, best units agree {row['torch_agreement']:.1%})")
        line += (f"; numpy loop {row['numpy_loop_s'] * 1e3:.1f} ms ({row['numpy_loop_s'] / row['mtijax_s']:.1f}x"
                 f" slower, agree {row['numpy_agreement']:.1%})")
        print(line)
    row = rows[-1]
    line = (f"lif: {row['units']} units x {row['ticks']} ticks, batch {row['batch']}: mtijax "
            f"{row['mtijax_s'] * 1e3:.1f} ms (spike rate {row['mtijax_spike_rate']:.3f})")
    for name in ("spyx", "snntorch"):
        if f"{name}_s" in row:
            line += (f"; {name} {row[f'{name}_s'] * 1e3:.1f} ms ({row[f'{name}_s'] / row['mtijax_s']:.2f}x mtijax's "
                     f"time, spike rate {row[f'{name}_spike_rate']:.3f})")
        else:
            line += f"; {name} {row[f'{name}_version']}"
    print(line)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
