"""Which initialisation makes the best conversion for the same training: side by side, same steps.

    python -m benchmarks.init_comparison --inits layerwise cluster --steps 100     # SmolLM2-135M, p = 0.5

For each --inits entry: a single-budget conversion at --budget (trained at the budget itself,
--train-gap 0, so the two inits see the same objective), initialised that way, trained --steps
steps of the default recipe, its masks finalised on the budget; then every variant is evaluated on
the quality benchmark's held-out windows (8 x 512) against dense. Reported per init: the init's
seconds and report, the training seconds, distillation loss at the first and last step, perplexity,
KL and top-1 agreement; with --steps 0 ... there is no training and the init alone is measured
(one step of learning rate 0). Output: a printed table and cache/results/init_comparison.json.
Runs one after the other in one process (alone on the machine for the seconds to compare).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.result_file import write_result
from tomoe_core.convert.config import INITS, ConversionConfig
from tomoe_core.convert.dense import load_dense, load_tokenizer
from tomoe_core.convert.masked_model import MaskedModel
from tomoe_core.convert.train import finalize_masks, train_conversion
from tomoe_core.eval.metrics import evaluate_variants
from tomoe_core.text.sources import cached_stream, special_prefix, text_windows


def convert_and_measure(init: str, args, stream: torch.Tensor, held: torch.Tensor) -> dict:
    model, tokenizer = load_dense(args.model)  # a fresh dense model: the masked one wraps its MLPs in place
    cfg = ConversionConfig(model=args.model, budget=args.budget, train_gap=0.0, num_experts=args.experts,
                           steps=max(1, args.steps), lr=args.lr if args.steps else 0.0, init=init,
                           init_tokens=args.init_tokens, seed=args.seed)
    masked = MaskedModel(model, cfg.num_experts, offset=cfg.offset, seed=cfg.seed)
    with tempfile.TemporaryDirectory() as work:
        t0 = time.time()
        summary = train_conversion(masked, stream, cfg, Path(work), show_tqdm=False, prefix=special_prefix(tokenizer))
        seconds = time.time() - t0
        log = [json.loads(line) for line in (Path(work) / "log.jsonl").read_text().splitlines()]
    masks, info = finalize_masks(masked, cfg.budget)

    def dense(ids):
        with masked.dense():
            return model(ids).logits

    def converted(ids):
        masked.set_masks(masks)
        try:
            return model(ids).logits
        finally:
            masked.set_masks(None)

    result = evaluate_variants(dense, {init: converted}, held)
    init_report = {k: v for k, v in summary["init"].items() if k != "layers"}
    if "layers" in summary["init"]:
        init_report["mean_relative_error"] = round(
            sum(l["relative_error"] for l in summary["init"]["layers"]) / len(summary["init"]["layers"]), 4)
    return {"init": init, "init_report": init_report, "seconds": round(seconds, 1), "steps": args.steps,
            "tokens_trained": args.steps * cfg.tokens_per_step, "first_distill": log[0]["distill"],
            "last_distill": log[-1]["distill"], "mask_calibration": info, "dense_perplexity": result["dense"].perplexity,
            **{k: getattr(result[init], k) for k in ("perplexity", "kl_to_dense", "top1_agreement")}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="dense model (built-in name, folder or hub id)")
    ap.add_argument("--inits", nargs="+", choices=INITS, default=["layerwise", "cluster"], help="initialisations")
    ap.add_argument("--budget", type=float, default=0.5, help="active MLP ratio p")
    ap.add_argument("--experts", type=int, default=8, help="experts per layer")
    ap.add_argument("--steps", type=int, default=100, help="training steps after the init (0: the init alone)")
    ap.add_argument("--lr", type=float, default=ConversionConfig.lr, help="learning rate")
    ap.add_argument("--init-tokens", type=int, default=ConversionConfig.init_tokens, help="calibration tokens of the init")
    ap.add_argument("--windows", type=int, default=8, help="held-out windows x 512 tokens")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", type=Path, default=None, help="JSON (default cache/results/init_comparison.json)")
    args = ap.parse_args(argv)
    tokenizer = load_tokenizer(args.model)  # the models themselves load fresh per init
    tag = Path(args.model).name
    stream = cached_stream(tokenizer, "wiki", "calibration", None, tag)
    held = text_windows(tokenizer, "wiki", "heldout", tag, 512, args.windows)
    rows = []
    for init in args.inits:
        rows.append(convert_and_measure(init, args, stream, held))
        r = rows[-1]
        print(f"{init}: perplexity {r['perplexity']:.2f} (dense {r['dense_perplexity']:.2f}), KL {r['kl_to_dense']:.3f}, "
              f"agreement {r['top1_agreement']:.3f}; distill {r['first_distill']:.3f} -> {r['last_distill']:.3f}; "
              f"init {r['init_report'].get('seconds', 0):.0f} s, all {r['seconds']:.0f} s", flush=True)
    result = {"kind": "init-comparison", "model": args.model, "text": "wiki (held-out split)", "window": 512,
              "windows": int(held.shape[0]), "rows": rows, "settings": vars(args) | {"output": str(args.output)}}
    write_result(result, "benchmarks.init_comparison", argv, args.output, "init_comparison.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
