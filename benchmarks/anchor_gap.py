"""How far below the requested budget should a budget-conditioned conversion generate its masks?

    python -m benchmarks.anchor_gap cache/conversions/smollm2-135m-p0.3-1-log-e8

For every budget p and gap g, the conversion generates its experts for max(lo, p - g) and the mask
threshold widens them to exactly p (g = 0: generated at p itself), then the result is evaluated
against the dense model. The windows are validation windows: held-out windows *after* the first
--skip-windows (default 60), which the quality benchmark and `evaluate` report on, so the chosen
gap is not tuned on the reported text. Writes cache/results/anchor_gap.json.
"""
from __future__ import annotations

import argparse
import copy
import shlex
import sys
import time
from pathlib import Path

import torch

from tomoe_core.convert import read_metadata
from tomoe_core.data import cache_dir, cached_stream, windows as make_windows
from tomoe_core.evaluate import evaluate_variants, logits_fn
from tomoe_core.io import atomic_write_json, safe_name
from tomoe_core.masked import MaskedModel
from tomoe_core.models import load_dense
from tomoe_core.pipeline import anchor_budget, machine_info, materialise_at


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("conversion", type=Path, help="a budget-conditioned conversion folder")
    p.add_argument("--budgets", type=float, nargs="+", default=[0.4, 0.5, 0.7])
    p.add_argument("--gaps", type=float, nargs="+", default=[0.0, 0.05, 0.1, 0.15, 0.2])
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
    dense, tokenizer = load_dense(meta["model"], log=lambda *a: None)
    stream = cached_stream(tokenizer, "wiki", "heldout", None, safe_name(Path(meta["model"]).name))
    held = make_windows(stream, args.window, args.skip_windows + args.windows)[args.skip_windows:]
    if held.shape[0] < args.windows:
        p.error(f"the held-out text has only {args.skip_windows + held.shape[0]} windows of {args.window}")
    t0 = time.time()
    rows = []
    for budget in args.budgets:
        variants, info = {}, {}
        for gap in args.gaps:
            at = anchor_budget(meta["budget_range"], budget, gap)
            if any(abs(i["generated_at"] - at) < 1e-9 for i in info.values()):
                continue  # the range's floor: a larger gap generates at the same budget
            moe, _meta, seconds = materialise_at(args.conversion, budget, layout="memory",
                                                 dense=copy.deepcopy(dense), log=lambda *a: None, anchor_gap=gap)
            variants[f"gap {gap:g}"] = logits_fn(moe, lambda moe=moe: moe.set_routing(None))
            info[f"gap {gap:g}"] = {"budget": budget, "gap": gap, "generated_at": at, "materialise_seconds": round(seconds, 2)}
        base = MaskedModel(copy.deepcopy(dense), 1)
        res = evaluate_variants(logits_fn(base, lambda: base.set_masks(None)), variants, held)
        for name, r in res.items():
            if name == "dense":
                continue
            rows.append({**info[name], "perplexity": r.perplexity, "kl_to_dense": r.kl_to_dense,
                         "top1_agreement": r.top1_agreement})
            print(f"p={budget:g} {name:>9} (generated at {info[name]['generated_at']:.2f}): perplexity "
                  f"{r.perplexity:8.2f}  KL {r.kl_to_dense:.3f}  agreement {r.top1_agreement:.3f}", flush=True)
        print(f"p={budget:g} dense perplexity {res['dense'].perplexity:.2f}", flush=True)
    best = {}
    for r in rows:
        if r["budget"] not in best or r["perplexity"] < best[r["budget"]]["perplexity"]:
            best[r["budget"]] = r
    result = {"kind": "anchor-gap", "conversion": str(args.conversion), "model": meta["model"],
              "text": "wiki (held-out split), validation windows", "window": args.window,
              "windows": int(held.shape[0]), "skip_windows": args.skip_windows, "machine": machine_info("cpu"),
              "command": "python -m benchmarks.anchor_gap " + " ".join(shlex.quote(a) for a in argv),
              "seconds": round(time.time() - t0, 1), "rows": rows,
              "best_gap": {f"{b:g}": r["gap"] for b, r in best.items()}}
    atomic_write_json(args.output, result)
    print(f"best gap per budget: {result['best_gap']}; written to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
