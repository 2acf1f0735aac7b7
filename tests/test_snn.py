"""Spiking units (seed 003): the unit models against a hand-computed trace and an independent NumPy loop,
drivers, batching, seeds, the collapse detector, the analyses, telemetry export and bad input.

Exactness: the NumPy loops below compute in float32 in the order the unit
docstrings give, and the test synapses and frames are multiples of 1/64 with
few terms, so every input current is exact in any summation order. Spikes
and winners must then agree exactly, tick for tick; membranes to a few ulp
(XLA contracts some multiply-adds into FMAs).
"""

from __future__ import annotations

import csv
import json

import jax.numpy as jnp
import numpy as np
import pytest

import mtijax
from mtijax.cli import main
from mtijax.snn import analysis, export
from mtijax.snn.drivers import activation_driver, embedding_driver, parse_driver
from mtijax.snn.network import Network, Routing, simulate, simulate_batch, stack_frames
from mtijax.snn.synapses import identity_synapses, parse_synapses, random_synapses, shuffled_synapses
from mtijax.snn.units import ALIF, GIF, LIF, UnitState, initial_state
from tests.conftest import write_checkpoint
from tests.olmoe_fixtures import make_olmoe_model

F = np.float32


def gif_trace(current: float, ticks: int):
    """One GIF unit under a constant current: (v, a, spikes, score) per tick."""
    state, out = initial_state(1), []
    for _ in range(ticks):
        state, step = GIF().step(state, jnp.asarray([current], jnp.float32))
        out.append((float(state.v[0]), float(state.a[0]), bool(step.spikes[0]), float(step.score[0])))
    return out


def test_gif_unit_follows_the_hand_computed_trace():
    # I = 1: fires at once (0.75 >= 0.65), two refractory ticks at v = 0 while the fatigue decays, is held
    # below the fatigue-raised threshold at tick 3, fires again at tick 4, then is refractory.
    expected = [  # v, a, spiked, score = v - 0.22 a
        (0.75 - 0.35 * 0.65, 1.0, True, 0.5225 - 0.22),
        (0.0, 0.94, False, -0.22 * 0.94),
        (0.0, 0.8836, False, -0.22 * 0.8836),
        (0.75 - 0.05 * 0.830584, 0.830584, False, 0.7084708 - 0.22 * 0.830584),
        (1.362755688 - 0.35 * 0.8217647712, 1.78074896, True, 1.07513801808 - 0.22 * 1.78074896),
        (0.0, 0.94 * 1.78074896, False, -0.22 * 0.94 * 1.78074896),
    ]
    for tick, (got, want) in enumerate(zip(gif_trace(1.0, 6), expected)):
        assert got[2] == want[2], f"tick {tick}: spike"
        np.testing.assert_allclose(got[:2] + got[3:], want[:2] + want[3:], atol=2e-6, err_msg=f"tick {tick}")


def test_gif_threshold_is_inclusive_and_subthreshold_unit_settles():
    # 0.75 * I = 0.65 exactly at I = 0.65 / 0.75: v >= theta fires on the first tick.
    assert gif_trace(F(0.65) / F(0.75), 1)[0][2]
    # A weak current never fires: v converges to 0.75 I / (1 - 0.92) and a stays 0.
    trace = gif_trace(0.05, 400)
    assert not any(t[2] for t in trace)
    np.testing.assert_allclose(trace[-1][0], 0.75 * 0.05 / 0.08, rtol=1e-5)
    assert trace[-1][1] == 0.0


def test_refractory_counter_counts_down_two_ticks():
    state = initial_state(1)
    rs = []
    for _ in range(4):
        state, _ = GIF().step(state, jnp.asarray([10.0], jnp.float32))
        rs.append(int(state.r[0]))
    assert rs == [2, 1, 0, 2]


def numpy_run(kind: str, synapses: np.ndarray, frames: np.ndarray, ticks: int):
    """An independent float32 loop over ticks and units: best unit per tick, raster, final v and a."""
    units = synapses.shape[1]
    current = np.zeros((frames.shape[0], units), F)
    for s in range(frames.shape[0]):  # exact for the dyadic test values
        for i in range(units):
            current[s, i] = F(sum(float(frames[s, j]) * float(synapses[j, i]) for j in range(synapses.shape[0])))
    v, a, r = np.zeros(units, F), np.zeros(units, F), np.zeros(units, np.int32)
    best, raster = np.zeros(ticks, np.int32), np.zeros((ticks, units), bool)
    for t in range(ticks):
        x = current[t * frames.shape[0] // ticks]
        score = np.zeros(units, F)
        for i in range(units):
            if kind == "gif":
                a[i] = F(0.94) * a[i]
                if r[i] > 0:
                    v[i], r[i] = F(0), r[i] - 1
                else:
                    v[i] = F(0.92) * v[i] + F(0.75) * x[i] - F(0.05) * a[i]
                    theta = F(0.65) + F(0.22) * a[i]
                    if v[i] >= theta:
                        v[i], a[i], r[i], raster[t, i] = v[i] - F(0.35) * theta, a[i] + F(1), 2, True
                score[i] = v[i] - F(0.22) * a[i]
            elif kind == "lif":
                v[i] = F(0.9) * v[i] + F(1.0) * x[i]
                if v[i] >= F(1.0):
                    v[i], raster[t, i] = v[i] - F(1.0), True
                score[i] = v[i]
            else:  # alif
                v[i] = F(0.9) * v[i] + F(1.0) * x[i]
                theta = F(1.0) + F(1.0) * a[i]
                spiked = v[i] >= theta
                if spiked:
                    v[i], raster[t, i] = v[i] - theta, True
                a[i] = F(0.95) * a[i] + (F(1) - F(0.95)) * F(spiked)
                score[i] = v[i] - F(1.0) * a[i]
        best[t] = int(np.argmax(score))
    return best, raster, v, a


def dyadic(rng, shape, low: int, high: int) -> np.ndarray:
    """Random multiples of 1/64 in [low/64, high/64): sums of a few of their products are exact in float32."""
    return (rng.integers(low, high, size=shape) / 64).astype(F)


@pytest.mark.parametrize("kind, model", [("gif", GIF()), ("lif", LIF()), ("alif", ALIF())])
def test_network_equals_an_independent_numpy_loop_exactly(kind, model):
    rng = np.random.default_rng(1)
    synapses = dyadic(rng, (6, 20), -48, 64)
    frames = dyadic(rng, (3, 6), -16, 48)  # three tokens, shown for a third of the ticks each
    ticks = 600
    want_best, want_raster, want_v, want_a = numpy_run(kind, synapses, frames, ticks)
    routing = simulate(Network(jnp.asarray(synapses), model), jnp.asarray(frames), ticks, raster_bin=1)
    assert want_raster.sum() > 100 and len(set(want_best.tolist())) > 2, "the test network must be active"
    np.testing.assert_array_equal(np.asarray(routing.best_unit), want_best)
    np.testing.assert_array_equal(np.asarray(routing.raster), want_raster.astype(np.uint8))
    # XLA fuses some multiply-adds into one rounding (FMA), which this unfused loop does not: the membranes
    # and adaptations may differ in the last bits, never enough to move a spike or a winner.
    np.testing.assert_allclose(np.asarray(routing.final.v), want_v, rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(routing.final.a), want_a, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(routing.spike_counts), want_raster.sum(0))
    np.testing.assert_allclose(np.asarray(routing.population_rate), want_raster.mean(1), rtol=1e-6)
    binned = simulate(Network(jnp.asarray(synapses), model), jnp.asarray(frames), ticks, raster_bin=25)
    np.testing.assert_array_equal(np.asarray(binned.raster), want_raster.reshape(24, 25, 20).sum(1))
    np.testing.assert_array_equal(np.asarray(binned.best_unit), want_best)


def test_telemetry_series_mean_dvdt_and_adaptation():
    rng = np.random.default_rng(2)
    net = Network(jnp.asarray(dyadic(rng, (4, 8), -32, 64)))
    frames = jnp.asarray(dyadic(rng, (1, 4), 0, 64))
    long = simulate(net, frames, 50, raster_bin=1)
    # v after tick t is the final v of a t + 1 tick run; mean dv/dt telescopes to mean v(T) - mean v(0) = mean v(T)
    np.testing.assert_allclose(np.sum(np.asarray(long.mean_dvdt)), np.mean(np.asarray(long.final.v)), atol=1e-5)
    short = simulate(net, frames, 20)
    np.testing.assert_allclose(np.asarray(long.adaptation)[19], np.mean(np.asarray(short.final.a)), rtol=1e-6)


def test_vmapped_batch_equals_one_by_one():
    rng = np.random.default_rng(3)
    net = Network(random_synapses(0, 16, 40, scale=0.3))
    drivers = [jnp.asarray(rng.normal(size=(s, 16)).astype(F)) for s in (1, 4, 7)]
    frames, counts = stack_frames(drivers)
    batch = simulate_batch(net, frames, 300, counts, raster_bin=1)
    for i, driver in enumerate(drivers):
        alone = simulate(net, driver, 300, raster_bin=1)
        for name in ("best_unit", "raster", "spike_counts", "population_rate"):
            np.testing.assert_array_equal(np.asarray(getattr(batch, name)[i]), np.asarray(getattr(alone, name)),
                                          err_msg=f"prompt {i}: {name}")
        for name in ("mean_dvdt", "adaptation"):  # float sums of another batch shape round in another order
            np.testing.assert_allclose(np.asarray(getattr(batch, name)[i]), np.asarray(getattr(alone, name)),
                                       rtol=1e-5, atol=1e-6, err_msg=f"prompt {i}: {name}")


def test_same_seed_same_raster_and_another_seed_another():
    frames = jnp.asarray(np.random.default_rng(4).normal(size=(2, 32)).astype(F))

    def raster(seed):
        return np.asarray(simulate(Network(random_synapses(seed, 32, 64, scale=0.4)), frames, 400).raster)

    np.testing.assert_array_equal(raster(7), raster(7))
    assert not np.array_equal(raster(7), raster(8))


def test_synapse_constructors():
    w = random_synapses(3, 512, 256)
    assert w.dtype == jnp.float32 and w.shape == (512, 256)
    np.testing.assert_allclose(float(jnp.std(w)), 512 ** -0.5, rtol=0.02)
    s = shuffled_synapses(w, 1)
    np.testing.assert_array_equal(np.sort(np.asarray(s).ravel()), np.sort(np.asarray(w).ravel()))
    assert not np.array_equal(np.asarray(s), np.asarray(w))
    np.testing.assert_array_equal(np.asarray(identity_synapses(4, 3)), np.eye(4, 3))


# --- the collapse detector -----------------------------------------------------------------------------------

def fake_routing(best: list[int], spikes: list[int]) -> Routing:
    """A routing with the given winners and per-unit spike counts (the detector reads nothing else)."""
    z = jnp.zeros(len(best), jnp.float32)
    state = UnitState(*(jnp.zeros(len(spikes)),) * 2, jnp.zeros(len(spikes), jnp.int32))
    return Routing(best_unit=jnp.asarray(best, jnp.int32), population_rate=z, mean_dvdt=z, adaptation=z,
                   mean_potential=z, raster=jnp.zeros((1, len(spikes))), spike_counts=jnp.asarray(spikes), final=state)


def test_collapse_detector_thresholds():
    one = analysis.collapse(fake_routing([5] * 95 + [1] * 5, [0] * 5 + [40] + [1] * 58))
    assert one.flagged and one.top_unit == 5 and one.top_share == 0.95 and "95%" in one.reason
    spread = analysis.collapse(fake_routing(list(range(64)) * 2, [3] * 64))
    assert not spread.flagged and spread.routing_entropy == pytest.approx(1.0)
    # one unit holding nearly all spikes is a collapse even when the winners are spread
    hog = analysis.collapse(fake_routing(list(range(64)) * 2, [1000] + [0] * 62 + [1]))
    assert hog.flagged and "the spikes come from" in hog.reason
    silent = analysis.collapse(fake_routing(list(range(64)), [0] * 64))
    assert np.isnan(silent.spike_entropy) and not silent.flagged


def test_scaled_up_input_collapses_and_the_normalised_one_does_not():
    # Real-sized weights: a 256-wide driver into 512 units, entries of std 0.04 (as Gemma 3 270M's q_proj).
    rng = np.random.default_rng(5)
    net = Network(random_synapses(11, 256, 512, scale=0.04))
    raw = rng.normal(size=(1, 256)).astype(F) * 3
    normalised = mtijax.snn.l2_normalise(jnp.asarray(raw))
    np.testing.assert_allclose(float(jnp.linalg.norm(normalised)), 1.0, rtol=1e-6)
    calm = analysis.collapse(simulate(net, normalised, 3000))
    assert not calm.flagged, calm
    # Un-normalised and blown up (a float16 buffer read as float32 gives such magnitudes): every unit with a
    # positive current fires in lock-step, refractory ticks tie, and the read-out cycles through two units.
    blasted = analysis.collapse(simulate(net, normalised * 1e6, 3000))
    assert blasted.flagged and blasted.effective_winners == pytest.approx(np.exp(-(2 / 3 * np.log(2 / 3) + 1 / 3 * np.log(1 / 3))))


# --- analyses ------------------------------------------------------------------------------------------------

def test_dominant_units_and_bands():
    r = fake_routing([100] * 6 + [7] * 3 + [120], [1] * 128)
    assert analysis.dominant_units(r, 2) == [(100, 0.6), (7, 0.3)]
    assert analysis.band_of(100, 128, 16) == 12 and analysis.dominant_band(r, 16) == 12


def test_similarity_matrices():
    a = fake_routing([0, 0, 0, 1, 1, 3], [2, 0, 1, 0])  # wins [3, 2, 0, 1]: top 2 {0, 1}, band 0 of 2
    b = fake_routing([1, 1, 2, 2, 2, 3], [0, 3, 0, 0])  # wins [0, 2, 3, 1]: top 2 {2, 1}, band 1
    sim = analysis.similarity([a, b], top=2, bands=2)
    assert sim["jaccard"][0, 1] == pytest.approx(1 / 3)
    assert sim["win_cosine"][0, 1] == pytest.approx(5 / 14)
    assert sim["rate_cosine"][0, 1] == 0.0 and sim["same_band"][0, 1] == 0.0
    assert np.all(np.diag(sim["jaccard"]) == 1) and np.array_equal(sim["win_cosine"], sim["win_cosine"].T)


def test_clustering_claim_can_pass_and_can_fail():
    labels = ["prose"] * 4 + ["code"] * 4 + ["math"] * 4
    structured = np.full((12, 12), 0.1)
    structured[4:, 4:] = 0.9  # code and math close to each other, far from prose
    np.fill_diagonal(structured, 1)
    passed = analysis.permutation_test(structured, labels, ("code", "math"), ("prose",), permutations=500)
    assert passed["statistic"] == pytest.approx(0.8) and passed["p_value"] < 0.01
    noise = np.random.default_rng(0).uniform(size=(12, 12))
    noise = (noise + noise.T) / 2
    failed = analysis.permutation_test(noise, labels, ("code", "math"), ("prose",), permutations=500)
    assert failed["p_value"] > 0.05
    assert analysis.network_null(0.3, [0.1, 0.2, 0.5])["p_value"] == pytest.approx(2 / 4)


# --- telemetry export ----------------------------------------------------------------------------------------

def test_running_entropy_by_hand():
    np.testing.assert_allclose(export.running_entropy(np.asarray([0, 0, 1, 1])),
                               [0, 0, -(2 / 3 * np.log(2 / 3) + 1 / 3 * np.log(1 / 3)), np.log(2)], atol=1e-12)


def test_telemetry_files_and_plots(tmp_path):
    net = Network(random_synapses(0, 8, 16, scale=0.5))
    runs = [simulate(net, jnp.ones((1, 8), jnp.float32) * s, 40) for s in (1.0, 2.0)]
    written = export.write_telemetry(runs, tmp_path / "t")
    with open(tmp_path / "t.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(export.COLUMNS) and len(rows) == 80
    assert [int(r["best_unit"]) for r in rows[40:]] == np.asarray(runs[1].best_unit).tolist()
    assert written == [tmp_path / "t.csv", tmp_path / "t.parquet"]
    assert export.plot_raster(runs[0], tmp_path / "r.png").stat().st_size > 0
    assert export.plot_best_unit(runs[0], tmp_path / "b.png").stat().st_size > 0


# --- drivers from a model ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_olmoe(tmp_path_factory):
    """A tiny OLMoE checkpoint (hidden 64) and mtijax's load of it."""
    directory = write_checkpoint(make_olmoe_model("e4_top2"), tmp_path_factory.mktemp("snn-olmoe"))
    return directory, mtijax.load(directory, tokenizer=False, progress=False)


def test_drivers_are_unit_norm_and_read_the_model(tiny_olmoe):
    _, model = tiny_olmoe
    ids = [5, 17, 9, 44]
    frame = embedding_driver(model.config, model.params, ids)
    raw = embedding_driver(model.config, model.params, ids, normalise=False)
    want = np.asarray(model.params["embed"])[ids].mean(0)
    np.testing.assert_allclose(np.asarray(raw[0]), want, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(frame[0]), want / np.linalg.norm(want), rtol=1e-5)
    np.testing.assert_allclose(float(jnp.linalg.norm(frame)), 1.0, rtol=1e-6)
    resid = activation_driver(model.config, model.params, ids, "resid_post", 1)
    captured = mtijax.forward(model.config, model.params, jnp.asarray([ids]), capture=("resid_post",))
    want = np.asarray(captured.captured["resid_post"][1, 0])
    np.testing.assert_allclose(np.asarray(resid), want / np.linalg.norm(want, axis=1, keepdims=True), atol=1e-6)
    assert parse_driver("resid:2") == ("resid_post", 2) and parse_driver("embeddings").layer is None


def test_cli_routes_prompts_and_writes_outputs(tiny_olmoe, tmp_path, capsys):
    directory, _ = tiny_olmoe
    status = main(["snn", "route", "--model", str(directory), "--token-ids", "5,17,9", "--token-ids", "80,3,3,7",
                   "--ticks", "200", "--driver", "resid:1", "--out", str(tmp_path / "out"), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert status == 0
    assert out["settings"]["units"] == 64 and out["settings"]["driver"] == "resid:1" and len(out["prompts"]) == 2
    assert np.asarray(out["similarity"]["jaccard"]).shape == (2, 2)
    for name in ("routing.json", "telemetry.csv", "raster_0.png", "best_unit_1.png"):
        assert (tmp_path / "out" / name).is_file()


# --- bad input -----------------------------------------------------------------------------------------------

def test_bad_input_is_a_clear_error():
    net = Network(random_synapses(0, 8, 16))
    frames = jnp.ones((1, 8), jnp.float32)
    for ticks in (0, -3):
        with pytest.raises(mtijax.MtijaxError, match="ticks must be a positive integer"):
            simulate(net, frames, ticks)
    with pytest.raises(mtijax.MtijaxError, match="driver's frames: dtype float16, not float32; cast explicitly"):
        simulate(net, frames.astype(jnp.float16), 10)
    with pytest.raises(mtijax.MtijaxError, match="synapses: dtype bfloat16"):
        simulate(Network(net.synapses.astype(jnp.bfloat16)), frames, 10)
    simulate(net, frames.astype(jnp.float16).astype(jnp.float32), 10)  # an explicit cast is accepted
    with pytest.raises(mtijax.MtijaxError, match="20 units but the driver is only 8 wide"):
        parse_synapses("identity", None, 8, 20)
    with pytest.raises(mtijax.MtijaxError, match="driver is 9 wide but the synapses read 8"):
        simulate(net, jnp.ones((1, 9), jnp.float32), 10)
    with pytest.raises(mtijax.MtijaxError, match="raster_bin must be a positive divisor"):
        simulate(net, frames, 10, raster_bin=3)
    with pytest.raises(mtijax.MtijaxError, match=r"frames must be \[S, width\]"):
        simulate(net, jnp.ones((8,), jnp.float32), 10)
    with pytest.raises(mtijax.MtijaxError, match="unknown driver"):
        parse_driver("bogus:1")


def test_cli_user_errors(tiny_olmoe, capsys):
    from tests.test_cli_errors import user_error

    directory, _ = tiny_olmoe
    base = ["snn", "route", "--model", str(directory), "--token-ids", "5,6"]
    assert "--ticks must be at least 1" in user_error(capsys, base + ["--ticks", "0"], directory)
    assert "100 units but the driver is only 64 wide" in user_error(
        capsys, base + ["--synapses", "identity", "--units", "100"], directory)
    assert "has only 64 outputs" in user_error(capsys, base + ["--units", "65"], directory)
    assert "out of range" in user_error(capsys, base + ["--driver", "resid:9"], directory)
    assert "no tensor" in user_error(capsys, base + ["--synapses", "layers/attn/nope:0"], directory)
