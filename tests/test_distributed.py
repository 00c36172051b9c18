"""Two CPU processes (gloo) train a tiny conversion with DistributedDataParallel.

Both ranks must end with identical hypernetwork and router weights, and the run must match a
single-process run over the same data (the same two micro-batches, accumulated) to 1e-5.
"""
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from dist_worker import tiny_run

HERE = Path(__file__).resolve().parent


def test_two_process_gloo_matches_single_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "dist_worker.py"), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    rank0 = load_file(str(tmp_path / "rank0.safetensors"))
    rank1 = load_file(str(tmp_path / "rank1.safetensors"))
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), f"ranks disagree on {key}"
    single = tiny_run(tmp_path, "single")
    worst = max(float((single[k] - rank0[k]).abs().max()) for k in single)
    print(f"max |single - ddp| over all trainable tensors: {worst:.3g}")
    assert worst < 1e-5
    # only rank 0 wrote checkpoints and the log
    assert (tmp_path / "work-ddp" / "checkpoint" / "state.json").exists()
    assert len((tmp_path / "work-ddp" / "log.jsonl").read_text().splitlines()) == 5
