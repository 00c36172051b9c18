"""The package imports lazily: its torch-free parts load without torch, and its public names still work."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout


def test_torch_free_modules_import_without_torch():
    out = _run("import sys; import tomoe_core, tomoe_core.jobs, tomoe_core.paths, tomoe_core.config, tomoe_core.io; "
               "import analysis.catalog, analysis.continuations; print('torch' in sys.modules, "
               "'transformers' in sys.modules)")
    assert out.split() == ["False", "False"]


def test_public_names_load_on_first_use_and_register_the_model_type():
    out = _run("import tomoe_core; f = tomoe_core.load_converted; from transformers import AutoConfig; "
               "print(f.__module__, type(AutoConfig.for_model('tomoe')).__name__, 'load_dense' in dir(tomoe_core))")
    assert out.split() == ["tomoe_core.convert", "ToMoEConfig", "True"]
    bad = subprocess.run([sys.executable, "-c", "import tomoe_core; tomoe_core.nope"], cwd=ROOT, capture_output=True,
                         text=True)
    assert bad.returncode != 0 and "has no attribute 'nope'" in bad.stderr
