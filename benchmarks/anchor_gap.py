"""How far below the requested budget should a budget-conditioned conversion generate its masks?

    python -m benchmarks.anchor_gap cache/conversions/smollm2-135m-p0.3-1-log-e8-prior1-m0.33

The measurement of `python -m tomoe_core calibrate-anchor` (which records its choice in the
conversion) over a wider grid, written to cache/results/anchor_gap.json and left out of the
conversion: for every budget p and gap g the conversion generates its experts for max(lo, p - g)
and the mask threshold widens them to exactly p (g = 0: generated at p itself). The windows are
validation windows: held-out windows *after* the first --skip-windows (default 60), which the
quality benchmark and `evaluate` report on, so the chosen gap is not tuned on the reported text.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch

from tomoe_core.moe.modeling import read_metadata
from tomoe_core.infra.locations import cache_dir
from tomoe_core.moe.atomic import atomic_write_json
from tomoe_core.infra.machine import machine_info
from tomoe_core.workflows.anchors import format_anchor_row, record_anchor_calibration


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("conversion", type=Path, help="a budget-conditioned conversion folder")
    p.add_argument("--budgets", type=float, nargs="+", default=[0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    p.add_argument("--gaps", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.3])
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--skip-windows", type=int, default=60, help="held-out windows reserved for reporting")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--output", type=Path, default=cache_dir() / "results" / "anchor_gap.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    meta = read_metadata(args.conversion)
    if not meta.get("budget_range"):
        p.error(f"{args.conversion} is not budget-conditioned (no budget_range): nothing to anchor")

    def progress(done, total):
        print(f"\r{done}/{total} variants", end="", file=sys.stderr, flush=True)

    calib = record_anchor_calibration(args.conversion, windows=args.windows, window=args.window,
                                      skip=args.skip_windows, budgets=args.budgets, gaps=args.gaps,
                                      progress=progress, log=lambda *a: None, record=False)
    print(file=sys.stderr)
    for r in calib["rows"]:
        print(format_anchor_row(r))
    result = {"kind": "anchor-gap", "conversion": str(args.conversion), "model": meta["model"],
              "text": f"{meta.get('text') or 'wiki'} (held-out split), validation windows",
              "window": calib["window"], "windows": calib["windows"], "skip_windows": args.skip_windows,
              "machine": machine_info("cpu"),
              "command": "python -m benchmarks.anchor_gap " + " ".join(shlex.quote(a) for a in argv),
              "seconds": calib["seconds"], "rows": calib["rows"], "best_gap": calib["anchor_gaps"],
              "selected_by": "lowest KL to dense"}
    atomic_write_json(args.output, result)
    print(f"best gap per budget (lowest KL): {result['best_gap']}; written to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
