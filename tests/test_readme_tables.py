"""The README's results tables are the render of the committed results (``experiments/report.py``).

A table is edited by changing its results file or its renderer and running
``python experiments/report.py --write``, never by hand: these tests fail otherwise.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).parent.parent / "experiments"


@pytest.fixture(scope="module")
def report():
    """``experiments/report.py`` as a module (it puts ``experiments/`` on ``sys.path`` for its own imports)."""
    spec = importlib.util.spec_from_file_location("report", EXPERIMENTS / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_readme_tables_are_the_render_of_the_committed_results(report):
    readme = report.README.read_text()
    assert report.render_readme(readme) == readme, "README.md differs: run python experiments/report.py --write"


def test_every_table_has_a_readme_region_and_every_region_a_table(report):
    regions = {name for name, _ in report.REGION.findall(report.README.read_text())}
    assert regions == set(report.TABLES)


def test_check_fails_when_a_rendered_number_is_edited_by_hand(report, tmp_path, capsys):
    readme = tmp_path / "README.md"
    text = report.README.read_text()
    assert "| 0.50 | 2239.56 | 529.65 | 4398.01 |" in text
    readme.write_text(text.replace("| 0.50 | 2239.56 | 529.65 | 4398.01 |", "| 0.50 | 2239.56 | 529.65 | 4398.00 |"))
    assert report.main(["--check", "--readme", str(readme)]) == 1
    assert "-| 0.50 | 2239.56 | 529.65 | 4398.00 |" in capsys.readouterr().out
    assert report.main(["--write", "--readme", str(readme)]) == 0
    assert readme.read_text() == text


def test_check_fails_when_a_results_file_changes(report, tmp_path):
    """The render follows the data: a different measured value gives a different README."""
    results = tmp_path / "results"
    shutil.copytree(report.RESULTS, results, ignore=shutil.ignore_patterns("*.png", "telemetry.csv"))
    study = json.loads((results / "resonance_injection" / "study.json").read_text())
    study["rows"][-1]["kl"] = 0.5
    (results / "resonance_injection" / "study.json").write_text(json.dumps(study))
    readme = tmp_path / "README.md"
    readme.write_text(report.README.read_text())
    assert report.main(["--check", "--readme", str(readme), "--results", str(results)]) == 1


def test_a_table_without_its_results_file_keeps_its_region(report, tmp_path):
    """A table whose results do not exist yet (a benchmark not run) leaves its region as it is."""
    text = "intro\n<!-- report:fusion_gpu -->\nnot measured yet\n<!-- /report:fusion_gpu -->\n"
    for name in set(report.TABLES) - {"fusion_gpu"}:
        text += f"<!-- report:{name} -->\n<!-- /report:{name} -->\n"
    assert report.render("fusion_gpu", tmp_path) is None
    assert "not measured yet" in report.render_readme(text, tmp_path)


def test_an_unknown_region_is_an_error(report, tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(report.README.read_text() + "\n<!-- report:nonesuch -->\n<!-- /report:nonesuch -->\n")
    assert report.main(["--check", "--readme", str(readme)]) == 2
    assert "README regions without a registered table: nonesuch" in capsys.readouterr().err
