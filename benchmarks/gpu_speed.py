"""Prepared GPU speed benchmark: CUDA, bf16, decode at batch 1 and 16, the same table as the CPU one.

    python -m benchmarks.gpu_speed                 # on a machine with a CUDA build of torch
    python -m benchmarks.gpu_speed --dry-run       # anywhere: tiny random model (on CPU without a GPU)

Everything else (budgets, repeats, layouts, output schema) is `benchmarks.speed`; its options
apply here too. Writes cache/results/speed_benchmark-cuda.json.

The GPU machine needs what the CPU run reads from cache/ (git ignores it): the dense checkpoint
cache/models/smollm2-135m, the token cache cache/tokens, and cache/speed (the untrained masks;
rebuilt there if absent, about a minute) or cache/conversions for trained ones. Run with a
CUDA build of torch, and triton for the indexed layout's kernels (`tomoe_core.moe.gather_triton`;
without triton it runs the pure-torch fallback, and the table's last line names the backend).

Not yet run on a GPU (none was available when it was written). What to expect: batch-1 decode
of a model this small is launch-bound; the indexed layout reads the token's expert id on the
device (no host synchronisation per layer, unlike the other layouts' batch-1 path, which reads
the chosen expert back) and skips the rows outside the expert. Its Triton kernels were checked
against the pure-torch reference in Triton's CPU interpreter
(tests/test_moe_layouts.py::test_triton_kernels_match_the_torch_reference_in_the_interpreter),
and tests/test_moe_layouts.py::test_cuda_indexed_layout_matches_masked_model runs on a GPU.
"""
from __future__ import annotations

from benchmarks.speed import main

GPU_DEFAULTS = {"device": "cuda", "dtype": "bfloat16", "batch_sizes": [1, 16], "repeats": 7, "new_tokens": 64,
                "threads": [1]}  # threads: host CPU threads (the clock is wall time on CUDA)

if __name__ == "__main__":
    raise SystemExit(main(description=__doc__, defaults=GPU_DEFAULTS))
