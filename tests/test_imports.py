"""``import mtijax`` loads the core only: the techniques, and the libraries only they need, load on first use.

Each check runs in a fresh interpreter, since this process has imported everything already.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TECHNIQUE_LIBRARIES = ("optax", "orbax", "matplotlib", "pyarrow", "torch", "transformers")


def fresh_python(code: str) -> str:
    """stdout of ``code`` run by a new interpreter from the repository root."""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize("module", ["mtijax", "mtijax.cli"])
def test_importing_the_package_or_the_cli_imports_no_technique_library(module):
    code = f"import {module}, sys; print(sorted(m for m in {TECHNIQUE_LIBRARIES!r} if m in sys.modules))"
    assert fresh_python(code).strip() == "[]"


def test_technique_names_resolve_on_first_use():
    code = """
import json, sys
import mtijax
first = "optax" in sys.modules
names = {
    "fusion": mtijax.fusion.__name__, "snn": mtijax.snn.__name__, "patching": mtijax.patching.__name__,
    "streaming": mtijax.streaming.__name__, "injection": mtijax.injection.__name__,
    "StreamedModel": mtijax.StreamedModel.__module__, "LayerStore": mtijax.LayerStore.__module__,
    "inject": mtijax.inject.__module__, "InjectionSpec": mtijax.InjectionSpec.__module__,
    "run_study": mtijax.run_study.__module__, "capture": mtijax.capture.__module__,
    "patch_spec": mtijax.patch_spec.__module__, "generate_patched": mtijax.generate_patched.__module__,
}
packages_only = "optax" in sys.modules
train_step = mtijax.fusion.train_step
print(json.dumps({"optax_before": first, "optax_with_the_packages": packages_only,
                  "optax_after_a_training_name": "optax" in sys.modules, "names": names,
                  "all_resolve": all(hasattr(mtijax, n) for n in mtijax.__all__),
                  "fusion_and_snn_resolve": all(hasattr(mtijax.fusion, n) for n in mtijax.fusion.__all__)
                                            and all(hasattr(mtijax.snn, n) for n in mtijax.snn.__all__)}))
"""
    out = json.loads(fresh_python(code))
    assert (out["optax_before"], out["optax_with_the_packages"], out["optax_after_a_training_name"]) == (
        False, False, True)
    assert out["fusion_and_snn_resolve"] is True
    assert out["all_resolve"] is True
    assert out["names"] == {
        "fusion": "mtijax.fusion", "snn": "mtijax.snn", "patching": "mtijax.patching",
        "streaming": "mtijax.streaming", "injection": "mtijax.injection",
        "StreamedModel": "mtijax.streaming.runner", "LayerStore": "mtijax.streaming.store",
        "inject": "mtijax.injection.blend", "InjectionSpec": "mtijax.injection.blend",
        "run_study": "mtijax.injection.study", "capture": "mtijax.patching.capture",
        "patch_spec": "mtijax.patching.spec", "generate_patched": "mtijax.patching.generation",
    }


def test_an_unknown_name_is_an_attribute_error():
    import mtijax

    with pytest.raises(AttributeError, match="no attribute 'nonesuch'"):
        mtijax.nonesuch
