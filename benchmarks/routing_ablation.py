"""Does the learned routing matter? Conversions under different recipes, each evaluated three ways.

For every recipe: convert (same model, budget, steps and tokens), then evaluate on the same
held-out windows with learned routing, a uniformly random expert per token and the best single
fixed expert. Prints a table and writes cache/results/routing_ablation.json.

    python -m benchmarks.routing_ablation --steps 100 --windows 4 --window 512
    python -m benchmarks.routing_ablation --recipes paper,cluster --steps 100
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from tomoe_core.infra.locations import cache_dir
from tomoe_core.moe.atomic import atomic_write_json
from tomoe_core.infra.machine import machine_info
from tomoe_core.workflows.conversion_run import run_conversion
from tomoe_core.workflows.evaluation import run_evaluation
from tomoe_core.convert.config import ConversionConfig

RECIPES = {
    # the paper: all channels start on (offset +3), constant Gumbel noise on the masks
    "paper": dict(init="offset", noise_anneal=0.0),
    # the paper's init with the mask noise annealed to zero over 70 % of the steps
    "paper+anneal": dict(init="offset", noise_anneal=0.7),
    # k-means cluster init of routers and experts, constant noise
    "cluster": dict(init="cluster", noise_anneal=0.0),
    # the default: cluster init + annealed noise
    "cluster+anneal": dict(init="cluster", noise_anneal=0.7),
}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated subset of " + ", ".join(RECIPES))
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--tokens-per-step", type=int, default=512)
    ap.add_argument("--windows", type=int, default=4, help="held-out windows to evaluate on")
    ap.add_argument("--window", type=int, default=512, help="window length")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--existing", default="", help="comma-separated converted folders to evaluate alongside "
                                                     "(e.g. the default 400-step conversion)")
    ap.add_argument("--output", type=Path, default=cache_dir() / "results" / "routing_ablation.json",
                    help="JSON result path (default: %(default)s)")
    args = ap.parse_args(argv)
    rows = []
    out_path = args.output
    jobs = [(name, None) for name in args.recipes.split(",") if name] + \
           [(Path(f).name, Path(f)) for f in args.existing.split(",") if f]
    model = "smollm2-135m"
    for name, existing in jobs:
        t0 = time.time()
        if existing is None:
            cfg = ConversionConfig(budget=args.budget, steps=args.steps, tokens_per_step=args.tokens_per_step,
                                   device=args.device, **RECIPES[name])
            folder = cache_dir() / "ablation" / f"{name}-p{args.budget:g}-s{args.steps}"
            run_conversion(cfg, folder, show_tqdm=False, log=lambda *a: None,
                           command=f"python -m benchmarks.routing_ablation --recipes {name} --steps {args.steps}")
            settings = {**RECIPES[name], "steps": args.steps, "tokens": args.steps * args.tokens_per_step}
            model = cfg.model
        else:
            folder = existing
            meta = json.loads((folder / "tomoe.json").read_text())
            settings = {k: meta["settings"][k] for k in ("init", "noise_anneal", "steps")}
            settings["tokens"] = meta["tokens_seen"]
            model = meta["model"]
        convert_s = time.time() - t0
        res = run_evaluation(folder, window=args.window, max_windows=args.windows, baselines=(), device=args.device,
                             log=lambda *a: None)
        r = res["results"]
        fixed = next(k for k in r if k.startswith("tomoe-fixed"))
        layers = res["layers"]
        row = {"recipe": name, **settings, "convert_s": round(convert_s), "dense_ppl": r["dense"]["perplexity"],
               "learned_ppl": r["tomoe"]["perplexity"], "random_ppl": r["tomoe-random"]["perplexity"],
               "fixed_ppl": r[fixed]["perplexity"], "fixed_expert": fixed,
               "learned_kl": r["tomoe"]["kl_to_dense"], "learned_agree": r["tomoe"]["top1_agreement"],
               "random_kl": r["tomoe-random"]["kl_to_dense"],
               "mean_union": sum(l["union"] for l in layers) / len(layers),
               "mean_width": sum(sum(l["expert_widths"]) / len(l["expert_widths"]) for l in layers) / len(layers),
               "folder": str(folder)}
        row["learned_vs_random"] = row["learned_ppl"] / row["random_ppl"] - 1
        rows.append(row)
        print(json.dumps(row), flush=True)
        atomic_write_json(out_path, {"kind": "routing_ablation", "machine": machine_info(args.device),
                                     "model": model, "text": "wiki held-out", "window": args.window,
                                     "windows": args.windows, "budget": args.budget, "rows": rows})
    print(f"\n{'recipe':<28}{'steps':>6}{'learned':>9}{'random':>9}{'fixed':>9}{'vs rnd':>8}{'KL':>8}{'agree':>7}"
          f"{'union':>7}{'width':>7}")
    for r in rows:
        print(f"{r['recipe']:<28}{r['steps']:>6}{r['learned_ppl']:>9.1f}{r['random_ppl']:>9.1f}{r['fixed_ppl']:>9.1f}"
              f"{100 * r['learned_vs_random']:>7.0f}%{r['learned_kl']:>8.3f}{r['learned_agree']:>7.3f}"
              f"{r['mean_union']:>7.2f}{r['mean_width']:>7.2f}")
    print(f"written to {out_path}")


if __name__ == "__main__":
    main()
