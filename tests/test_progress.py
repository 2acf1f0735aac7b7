"""Progress on stderr: status lines around long steps, quiet under ``--json`` unless ``--verbose``."""

from __future__ import annotations

import io
import json
import re

import pytest

from mtijax import progress
from mtijax.cli import main


def test_status_says_what_runs_then_how_long_it_took():
    stream = io.StringIO()
    with progress.status("compiling", stream=stream):
        pass
    first, second = stream.getvalue().splitlines()
    assert first == "mtijax: compiling ..."
    assert re.fullmatch(r"mtijax: compiling: \d+\.\d s", second)


def test_status_is_silent_when_disabled_and_leaves_no_closing_line_on_error():
    quiet = io.StringIO()
    with progress.status("compiling", enabled=False, stream=quiet):
        pass
    assert quiet.getvalue() == ""
    failing = io.StringIO()
    with pytest.raises(ValueError), progress.status("loading", stream=failing):
        raise ValueError("bad")
    assert failing.getvalue() == "mtijax: loading ...\n"


def test_generate_json_is_quiet_unless_verbose(tiny_gqa, capsys):
    """stderr is not a terminal here, so progress shows only with ``--verbose``; stdout stays one JSON object."""
    argv = ["generate", "--model", str(tiny_gqa[1]), "--token-ids", "5,6,7", "--max-new-tokens", "2", "--json"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert err == "" and json.loads(out)["prompt_ids"] == [5, 6, 7]
    assert main([*argv, "--verbose"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["prompt_ids"] == [5, 6, 7]
    assert "loading" in err and "mtijax: compiling and running the prompt: " in err
