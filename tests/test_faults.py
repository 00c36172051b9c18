"""Crash safety: a conversion killed with SIGKILL mid-run resumes to the same result."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from kill_worker import STEPS, run

HERE = Path(__file__).resolve().parent


def test_sigkill_mid_run_then_resume_equals_uninterrupted(tmp_path):
    reference = run(tmp_path / "reference")
    workdir = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
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
    resumed = run(workdir)
    for key, value in reference.items():
        assert torch.equal(value, resumed[key]), key
    steps = [json.loads(line)["step"] for line in (workdir / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1)), "log must hold each step once after resume"
    assert not list(workdir.glob(".*.tmp")), "stale temporary folders were not cleaned up"
