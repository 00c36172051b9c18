"""Prepared GPU speed benchmark: CUDA, bf16, decode at batch 1 and 16, the same table as the CPU one.

    python -m benchmarks.gpu_speed                 # on a machine with a CUDA build of torch
    python -m benchmarks.gpu_speed --dry-run       # anywhere: tiny random model (on CPU without a GPU)

Everything else (budgets, repeats, layouts, output schema) is `benchmarks.speed`; its options
apply here too. Writes cache/results/speed_benchmark-cuda.json.

The GPU machine needs what the CPU run reads from cache/ (git ignores it): the dense checkpoint
cache/models/smollm2-135m, the token cache cache/tokens, and cache/speed (the untrained masks;
rebuilt there if absent, about a minute) or cache/conversions for trained ones. Run with a
CUDA build of torch. Expected there, not yet measured: batch-1 decode is launch-bound at this
model size, and the MoE's one host sync per layer (reading the chosen expert) can cost what
the smaller matmuls save; batch 16 sorts tokens and runs up to E matmul groups per layer.
"""
from __future__ import annotations

from benchmarks.speed import main

GPU_DEFAULTS = {"device": "cuda", "dtype": "bfloat16", "batch_sizes": [1, 16], "repeats": 7, "new_tokens": 64}

if __name__ == "__main__":
    raise SystemExit(main(description=__doc__, defaults=GPU_DEFAULTS))
