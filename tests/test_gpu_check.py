"""scripts/gpu_check.sh: every GPU check in one call that fits the device budget (runs for real only
where torch sees a CUDA device; here its plan and its refusal are checked)."""
from __future__ import annotations

import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def test_plan_runs_the_cuda_tests_and_the_gpu_speed_benchmark_within_8_minutes():
    out = subprocess.run(["bash", str(SCRIPT), "--plan"], capture_output=True, text=True, timeout=60, check=True).stdout
    steps = [line.strip() for line in out.splitlines()[1:] if line.strip()]
    assert len(steps) == 2
    assert "pytest" in steps[0] and "cuda" in steps[0] and "tests/test_moe_layouts.py" in steps[0]
    assert "benchmarks.gpu_speed" in steps[1] and "speed_benchmark-cuda.json" in steps[1]
    assert sum(int(s.split()[0]) for s in steps) <= 8 * 60


def test_without_a_gpu_it_says_so_and_exits_3(tmp_path):
    if torch.cuda.is_available():
        return
    done = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "OUT": str(tmp_path)})
    assert done.returncode == 3
    assert "no CUDA device" in done.stderr
