"""``mtijax patch``: the JSON it prints, and its user errors (one line, exit 2, the checkpoint unchanged)."""

from __future__ import annotations

import json

import numpy as np

from mtijax.api import load
from mtijax.cli import main
from mtijax.patching import KVPatch, Plan, SitePatch, generate_patched
from tests.conftest import tree_checksums
from tests.test_cli_errors import user_error

SOURCE, TARGET = "5,17,9,33,81,40,12,7,99,64", "8,21,3,45,16,77,30"


def test_patch_json_reports_baseline_champion_patched_and_efficiency(tiny_gqa, capsys):
    directory = tiny_gqa[1]
    before = tree_checksums(directory)
    status = main(["patch", "--model", str(directory), "--source-ids", SOURCE, "--target-ids", TARGET,
                   "--v-layers", "2", "--resid-layers", "1", "--max-new-tokens", "6", "--seed", "3", "--json",
                   "--markers", "a,b"])
    out, err = capsys.readouterr()
    assert status == 0, err
    result = json.loads(out)
    for key in ("baseline", "champion", "patched"):
        assert set(result[key]) == {"text", "ids", "score"} and len(result[key]["ids"]) <= 6
    assert {"efficiency", "kl_from_champion", "plan", "seed"} <= set(result)
    assert result["efficiency"] is None  # no tokenizer, no text: every score is 0
    m = load(directory, progress=False)
    plan = Plan((SitePatch("resid_pre", (1,)), SitePatch("attn_v", (2,))), KVPatch("last_min"), "refeed")
    from mtijax.generate import Sampling

    expected = generate_patched(m.config, m.params, [int(t) for t in TARGET.split(",")],
                                [int(t) for t in SOURCE.split(",")], plan, seeds=[3], max_new_tokens=6,
                                sampling=Sampling(0.8))
    assert result["patched"]["ids"] == expected.ids(0)
    assert np.isfinite(result["kl_from_champion"])
    assert tree_checksums(directory) == before


def test_patch_user_errors(tiny_gqa, capsys):
    d = str(tiny_gqa[1])
    base = ["patch", "--model", d, "--source-ids", SOURCE, "--target-ids", TARGET, "--max-new-tokens", "2"]
    cases = [
        (base + ["--v-layers", "9"], "layer 9 is out of range"),
        (base + ["--kv", "0,x"], "expected all, none, or comma-separated layers"),
        (base + ["--kv", "7"], "layer 7 is out of range"),
        (base + ["--decode", "first"], "invalid choice"),
        (base + ["--v-layers", "1", "--prompt-positions", "last:40"], "outside the prompt"),
        (["patch", "--model", d, "--target-ids", TARGET], "give --source or --source-ids"),
        (["patch", "--model", d, "--source", "hello", "--target-ids", TARGET], "has no tokenizer"),
    ]
    for argv, message in cases:
        assert message in user_error(capsys, argv, tiny_gqa[1]), argv
