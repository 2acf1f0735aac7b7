"""Telemetry columns named after corinth-canal's (timestamp, firing rate in Hz, membrane dv/dt, routing entropy)
follow its definitions, checked on runs and weights whose values are known by hand."""

from __future__ import annotations

import csv
import math

import jax.numpy as jnp
import numpy as np
import pytest

from mtijax.snn import LIF, Network, export, simulate


def test_membrane_dv_dt_is_the_change_of_the_clipped_mean_potential_per_second():
    """One LIF unit below its threshold under a constant drive ``gain * I = 0.3`` with leak 0.9 from rest:
    ``v_t = 0.3 * (1 - 0.9^(t+1)) / 0.1``, which passes 1 (where the potentials are clipped) at tick 3."""
    net = Network(jnp.ones((1, 1), jnp.float32), LIF(leak=0.9, gain=0.3, threshold=100.0))
    columns = export.telemetry(simulate(net, jnp.ones((1, 1), jnp.float32), 8))
    v = 0.3 * (1 - 0.9 ** np.arange(1, 9)) / 0.1
    potential = np.minimum(v, 1.0)
    np.testing.assert_allclose(columns["mean_potential"], potential, rtol=1e-6)
    want = np.concatenate([[0.0], np.diff(potential) / 1e-3])
    np.testing.assert_allclose(columns["membrane_dv_dt"], want, rtol=1e-4, atol=1e-3)
    assert columns["membrane_dv_dt"][1] == pytest.approx(270.0, rel=1e-4) and columns["membrane_dv_dt"][-1] == 0
    np.testing.assert_allclose(columns["mean_dvdt"][:3], np.diff(np.concatenate([[0.0], v]))[:3], rtol=1e-5)
    np.testing.assert_array_equal(columns["timestamp_ms"], np.arange(1, 9))


def test_firing_rate_in_hertz_counts_spikes_per_unit_per_millisecond_tick():
    """Leak 0 and threshold 1: units driven by 2 and 1.5 spike on every tick, those by 0.5 and 0 never."""
    net = Network(jnp.asarray([[2.0, 0.5, 1.5, 0.0]], jnp.float32), LIF(leak=0.0, gain=1.0, threshold=1.0))
    columns = export.telemetry(simulate(net, jnp.ones((1, 1), jnp.float32), 5))
    np.testing.assert_array_equal(columns["population_rate"], np.full(5, 0.5, np.float32))
    np.testing.assert_allclose(columns["avg_pop_firing_rate_hz"], np.full(5, 500.0), rtol=1e-6)


@pytest.mark.parametrize("weights, want", [
    ([0.25, 0.25, 0.25, 0.25], 1.0), ([0.5, 0.5, 0.0, 0.0], 0.5), ([1.0, 0.0, 0.0, 0.0], 0.0),
    ([0.5, 0.5, math.nan, -1.0], 0.5), ([0.7, 0.2, 0.1], -(0.7 * math.log(0.7) + 0.2 * math.log(0.2)
                                                        + 0.1 * math.log(0.1)) / math.log(3)),
    ([1.0], 0.0),
])
def test_routing_entropy_by_hand(weights, want):
    assert float(export.routing_entropy(np.asarray(weights))) == pytest.approx(want, rel=1e-6, abs=1e-7)


def test_gate_telemetry_has_one_row_per_valid_position(tmp_path):
    logits = np.zeros((2, 1, 3, 4), np.float32)  # equal logits: uniform weights, entropy 1
    logits[1, 0, 2] = [30.0, 0.0, 0.0, 0.0]  # nearly one-hot: entropy about 0
    valid = np.asarray([[True, False, True]])
    columns = export.gate_telemetry(jnp.asarray(logits), valid)
    assert columns["layer"].tolist() == [0, 0, 1, 1] and columns["position"].tolist() == [0, 2, 0, 2]
    np.testing.assert_allclose(columns["routing_entropy"][:3], 1.0, rtol=1e-6)
    assert columns["routing_entropy"][3] < 1e-6
    written = export.write_gate_telemetry(jnp.asarray(logits), tmp_path / "gate", valid)
    with open(written[0]) as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(export.GATE_COLUMNS) and len(rows) == 4
    assert float(rows[0]["routing_entropy"]) == pytest.approx(1.0, rel=1e-6)


def test_parquet_reads_back_exactly_what_was_written_and_agrees_with_the_csv(tmp_path):
    import pyarrow.parquet as pq

    net = Network(jnp.asarray(np.random.default_rng(0).normal(size=(4, 8)), jnp.float32))
    runs = [simulate(net, jnp.full((2, 4), s, jnp.float32), 30) for s in (0.5, 2.0)]
    csv_path, parquet_path = export.write_telemetry(runs, tmp_path / "telemetry")
    table = pq.read_table(parquet_path)
    assert table.column_names == list(export.COLUMNS) and table.num_rows == 60
    for prompt, run in enumerate(runs):
        for name, want in export.telemetry(run, prompt).items():
            got = table.column(name).to_numpy()[prompt * 30:(prompt + 1) * 30]
            assert got.dtype == want.dtype, name
            np.testing.assert_array_equal(got, want)
    assert table.column("best_unit").to_numpy().tolist() != [0] * 60
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    for name in export.COLUMNS:
        np.testing.assert_allclose([float(r[name]) for r in rows], table.column(name).to_numpy(), rtol=1e-8)
