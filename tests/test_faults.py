"""Crash safety: a conversion killed with SIGKILL mid-run resumes to the same result."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from kill_worker import STEPS
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent


def _worker(workdir: Path, out: Path, env: dict) -> dict:
    """A whole run in its own one-thread process, like the killed one (thread counts change float sums)."""
    subprocess.run([sys.executable, str(HERE / "kill_worker.py"), str(workdir), str(out)], env=env, check=True)
    return load_file(str(out))


def test_sigkill_mid_run_then_resume_equals_uninterrupted(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    reference = _worker(tmp_path / "reference", tmp_path / "reference.st", env)
    workdir = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(HERE / "kill_worker.py"), str(workdir), str(tmp_path / "x.st"), "0.3"],
                            env=env)
    log = workdir / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until a few steps are done, then kill without warning
        if log.exists() and len(log.read_text().splitlines()) >= 4:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = json.loads((workdir / "checkpoint" / "state.json").read_text())["step"]
    assert 3 <= done < STEPS, f"killed after step {done}: not mid-run"
    resumed = _worker(workdir, tmp_path / "resumed.st", env)
    for key, value in reference.items():
        assert torch.equal(value, resumed[key]), key
    steps = [json.loads(line)["step"] for line in (workdir / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1)), "log must hold each step once after resume"
    assert not list(workdir.glob(".*.tmp")), "stale temporary folders were not cleaned up"
