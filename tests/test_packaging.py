"""pyproject.toml: `pip install .` and `pip install -e .` make tomoe_core and analysis importable from
anywhere. Installed with --no-deps into a throwaway venv that borrows this environment's packages."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SKIP = shutil.ignore_patterns(".git", ".venv", "cache", "__pycache__", "build", "*.egg-info", "test-artifacts",
                              ".pytest_cache", ".hypothesis", "node_modules")


def _venv_borrowing_our_packages(path: Path) -> Path:
    """A fresh venv (no pip of its own) whose site-packages comes first, then this environment's."""
    base = Path(getattr(sys, "_base_executable", sys.executable))
    subprocess.run([str(base), "-m", "venv", "--without-pip", str(path)], check=True, timeout=300)
    python = path / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def _run(cmd: list, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600, **kwargs)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_package_installs_and_editable_installs_and_imports_from_another_directory(tmp_path):
    source = tmp_path / "checkout"
    shutil.copytree(ROOT, source, ignore=SKIP)
    venv = tmp_path / "venv"
    python = _venv_borrowing_our_packages(venv)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    probe = "import tomoe_core, analysis; print(tomoe_core.__file__); print(analysis.__file__)"
    for editable, home in ((False, venv), (True, source)):
        _run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps",
              *(["-e"] if editable else []), source])
        core, analysis = map(Path, _run([python, "-c", probe], cwd=elsewhere, env=env).stdout.split())
        assert home in core.parents and home in analysis.parents, (editable, core, analysis)
    done = _run([venv / "bin" / "tomoe", "export", "--help"], cwd=elsewhere, env=env)
    assert "--hub-ready" in done.stdout
