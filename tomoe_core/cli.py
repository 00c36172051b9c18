"""Command line: python -m tomoe_core convert | evaluate | generate | account | export | trace."""
from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import sys
from pathlib import Path

from .lastword import DEFAULT_ITEMS
from .train import BUDGET_SAMPLING, DEFAULT_BUDGET_SAMPLING, ConversionConfig

_DEFAULTS = ConversionConfig()


def _add_convert(sub):
    p = sub.add_parser("convert", help="train a ToMoE conversion of a dense model and save it",
                       description="Convert a dense causal LM to a ToMoE mixture-of-experts. The dense weights stay "
                                   "frozen; a hypernetwork and per-layer routers are trained by distillation. "
                                   "Rerunning the same command resumes from the last checkpoint.")
    p.add_argument("--model", default=_DEFAULTS.model,
                   help="built-in name (smollm2-135m, gemma3-270m), local HF checkpoint folder, .gguf file or hub id "
                        "(default: %(default)s)")
    p.add_argument("--budget", "-p", type=float, default=_DEFAULTS.budget,
                   help="fraction of MLP parameters active per token, in (0, 1] (default: %(default)s)")
    p.add_argument("--train-gap", type=float, default=None,
                   help="single budget: train the experts for --budget minus this, then widen them to --budget by "
                        "the mask threshold (default: 0.1 for budgets of 0.5 and more, where it measured better, 0 below and "
                        "with --prune-attention; 0 trains at the budget itself; not with --budget-range, which "
                        "calibrates its anchor instead)")
    p.add_argument("--budget-range", type=float, nargs=2, metavar=("LO", "HI"), default=None,
                   help="train one budget-conditioned conversion for every budget in [LO, HI] (e.g. 0.3 1.0); "
                        "--budget is then the one the saved model is materialised at, and `rebudget` "
                        "materialises any other in seconds")
    p.add_argument("--budget-sampling", choices=BUDGET_SAMPLING, default=None,
                   help="with --budget-range: how training steps spread over the range: uniform in p, log "
                        f"(uniform in log p) or inverse (uniform in 1/p; most steps on low budgets) "
                        f"(default: {DEFAULT_BUDGET_SAMPLING})")
    p.add_argument("--experts", "-e", type=int, default=_DEFAULTS.num_experts, help="experts per layer (default: %(default)s)")
    p.add_argument("--prune-attention", action="store_true",
                   help="the paper's second stage: also prune attention (static Q/K head dims in rotary pairs, "
                        "per-token V/O experts); --budget then counts MLP + q/k/v/o projection weights "
                        "(llama, mistral, qwen2 families)")
    p.add_argument("--steps", type=int, default=_DEFAULTS.steps, help="optimiser steps (default: %(default)s)")
    p.add_argument("--tokens-per-step", type=int, default=_DEFAULTS.tokens_per_step,
                   help="calibration tokens per step (default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=_DEFAULTS.seq_len, help="tokens per calibration window (default: %(default)s)")
    p.add_argument("--lr", type=float, default=_DEFAULTS.lr, help="AdamW learning rate (default: %(default)s)")
    p.add_argument("--lam", type=float, default=_DEFAULTS.lam, help="budget penalty weight (default: %(default)s)")
    p.add_argument("--union-weight", type=float, default=_DEFAULTS.union_weight,
                   help="weight of the union-coverage term (default: %(default)s)")
    p.add_argument("--load-balance-weight", type=float, default=_DEFAULTS.load_balance_weight,
                   help="weight of the load-balance term (default: %(default)s)")
    p.add_argument("--init", choices=("cluster", "offset"), default=_DEFAULTS.init,
                   help="cluster: routers and experts start from k-means clusters of each layer's MLP inputs; "
                        "offset: the paper's init, all channels on (default: %(default)s)")
    p.add_argument("--no-init-balance", dest="init_balance", action="store_false",
                   help="cluster init: keep k-means' unequal cluster sizes instead of giving every expert an "
                        "equal share of the calibration tokens")
    p.add_argument("--prior-scale", type=float, default=_DEFAULTS.prior_scale,
                   help="cluster init: magnitude of the experts' prior mask logits; smaller lets training move "
                        "the masks further from the k-means heuristic (default: %(default)s)")
    p.add_argument("--regularise", choices=("deterministic", "sampled"), default=_DEFAULTS.regularise,
                   help="masks the budget and union terms see: the noise-free ones inference uses, or the "
                        "noisy sampled ones as in the paper (default: %(default)s)")
    p.add_argument("--noise-anneal", type=float, default=_DEFAULTS.noise_anneal,
                   help="mask noise decays to 0 over this fraction of the steps; 0 keeps it (default: %(default)s)")
    p.add_argument("--mask-noise", type=float, default=None,
                   help="amplitude of the logistic mask noise at step 0 (default: --prior-scale / 3, or 1 with "
                        "--init offset: noise that flips about 5 %% of the prior's entries)")
    p.add_argument("--distill", choices=("kl", "ce"), default=_DEFAULTS.distill,
                   help="kl: forward KL to the dense model; ce: next-token cross-entropy (default: %(default)s)")
    p.add_argument("--text", default=_DEFAULTS.text,
                   help="calibration text: 'wiki' (default corpus), a .txt file, a folder, or hf:NAME")
    p.add_argument("--seed", type=int, default=_DEFAULTS.seed, help="random seed (default: %(default)s)")
    p.add_argument("--micro-batches", type=int, default=_DEFAULTS.micro_batches,
                   help="split each step's batch into this many shards of data and noise; under torchrun the "
                        "processes share them, so use a multiple of the process count (default: %(default)s)")
    p.add_argument("--checkpoint-every", type=int, default=_DEFAULTS.checkpoint_every,
                   help="steps between checkpoints (default: %(default)s)")
    p.add_argument("--device", default=_DEFAULTS.device, help="cpu or cuda[:N] (default: %(default)s)")
    p.add_argument("--output", type=Path, default=None,
                   help="output folder (default: cache/conversions/MODEL-pBUDGET-eEXPERTS)")
    p.add_argument("--evaluate", action="store_true", help="evaluate the saved conversion afterwards")
    p.add_argument("--anchor-windows", type=int, default=None,
                   help="with --budget-range: validation windows of the held-out text (after the first 60, which "
                        "evaluate reports on) on which the finished conversion measures how far below each budget "
                        "to generate its experts before widening them (see calibrate-anchor); 0 skips it "
                        "(default: 4)")


def _item_count(text: str) -> int:
    count = int(text)
    if count < 0:
        raise argparse.ArgumentTypeError(f"{text}: a number of items, 0 or more (0 skips the metric)")
    return count


def _add_evaluate(sub):
    p = sub.add_parser("evaluate", help="perplexity, KL and agreement: dense vs conversion vs static baselines",
                       description="Evaluate on held-out text: the dense model, a conversion with learned routing, "
                                   "a random expert per token and the best single fixed expert, and static "
                                   "structured-pruning baselines at the same MLP budget. Writes a JSON result.")
    p.add_argument("conversion", nargs="?", type=Path, help="converted model folder (omit for baselines only)")
    p.add_argument("--model", default=None, help="dense model (default: the one the conversion was made from)")
    p.add_argument("--budget", type=float, default=None, help="baseline budget (default: the conversion's)")
    p.add_argument("--text", default="wiki", help="evaluation text: 'wiki' held-out split, .txt file, folder, hf:NAME")
    p.add_argument("--window", type=int, default=None, help="window length (default: min(2048, model context))")
    p.add_argument("--max-windows", type=int, default=16, help="number of windows (default: %(default)s)")
    p.add_argument("--baselines", default="magnitude,wanda-sp",
                   help="comma-separated baselines: magnitude, wanda-sp, flap, torch-pruning, or none (default: %(default)s)")
    p.add_argument("--no-routing-modes", action="store_true", help="skip the random and fixed-expert runs")
    p.add_argument("--last-word-items", type=_item_count, default=DEFAULT_ITEMS,
                   help="last-word accuracy (LAMBADA-style: greedy decoding must give every token of a sentence's "
                        "last word) on this many items of the text's held-out split; 0: skip (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: %(default)s)")
    p.add_argument("--output", type=Path, default=None, help="JSON result path (default: cache/results/eval-NAME.json)")


def _add_generate(sub):
    p = sub.add_parser("generate", help="greedy generation of dense and converted model side by side")
    p.add_argument("conversion", type=Path, help="converted model folder")
    p.add_argument("prompt", help="prompt text")
    p.add_argument("--max-new-tokens", type=int, default=40, help="tokens to generate (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: %(default)s)")
    p.add_argument("--layout", default="decode",
                   help="MoE weight layout: shared, packed, core+extras, or a use: decode, prefill, memory "
                        "(default: %(default)s: the fastest for generation that fits in memory)")


def _add_rebudget(sub):
    p = sub.add_parser("rebudget", help="materialise a conversion at another budget (seconds, no retraining)",
                       description="A budget-conditioned conversion (convert --budget-range) generates the experts "
                                   "for the new budget (labelled 'conditioned'). Any other conversion falls back to "
                                   "re-thresholding its trained mask logits so the widest experts meet the new budget "
                                   "(labelled 'threshold-moved' in tomoe.json; a conversion trained at that budget is "
                                   "expected to be better).")
    p.add_argument("conversion", type=Path, help="converted model folder that has hypernet.safetensors")
    p.add_argument("--budget", "-p", type=float, required=True, help="new fraction of MLP parameters active per token")
    p.add_argument("--output", type=Path, default=None, help="output folder (default: beside the conversion)")


def _add_calibrate_anchor(sub):
    p = sub.add_parser("calibrate-anchor",
                       help="measure and record how far below each budget a conditioned conversion generates its experts",
                       description="For every budget in the conversion's range and every gap, generate the experts "
                                   "at max(lo, p - gap), widen them to p by the mask threshold and measure KL to the "
                                   "dense model on validation windows of the held-out text (those after the first "
                                   "--skip-windows, which evaluate and benchmarks.quality report on). The gap with the "
                                   "lowest KL per budget is written to tomoe.json (anchor_gaps) and used by every "
                                   "later materialisation (rebudget, the studio's slider). convert --budget-range "
                                   "runs this at its end.")
    p.add_argument("conversion", type=Path, help="a budget-conditioned conversion folder")
    p.add_argument("--budgets", type=float, nargs="+", default=None, help="default: 0.3 0.4 ... 0.9 inside the range")
    p.add_argument("--gaps", type=float, nargs="+", default=None, help="default: 0 0.1 0.2")
    p.add_argument("--windows", type=int, default=4, help="validation windows (default: %(default)s)")
    p.add_argument("--window", type=int, default=512, help="tokens per window (default: %(default)s)")
    p.add_argument("--skip-windows", type=int, default=60,
                   help="held-out windows reserved for reporting, never used here (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: %(default)s)")
    p.add_argument("--dry-run", action="store_true", help="measure and print, but leave tomoe.json as it is")


def _add_account(sub):
    p = sub.add_parser("account", help="active parameters and FLOPs per token of a dense or converted model")
    p.add_argument("model", help="converted folder, or a dense model name/path")
    p.add_argument("--context", type=int, default=512, help="context length for attention FLOPs (default: %(default)s)")


def _add_export(sub):
    p = sub.add_parser("export", help="write a self-contained copy of a conversion that loads without tomoe_core",
                       description="Write a hub-ready folder: the conversion's weights, tokenizer and tomoe.json, "
                                   "config.json with auto_map, and the engine's modelling code copied beside them. "
                                   "Stock tools then load it in a process without tomoe_core: "
                                   "AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True), "
                                   "lm_eval --model hf --model_args pretrained=OUT,trust_remote_code=True. "
                                   "Loading runs the copied code: share exports like any code.")
    p.add_argument("conversion", type=Path, help="converted model folder")
    p.add_argument("--hub-ready", type=Path, required=True, metavar="OUT",
                   help="output folder (replaced if it exists)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="weight dtype of the export (default: the conversion's)")
    p.add_argument("--max-shard-size", default=None,
                   help="split the weights into safetensors shards of at most this size, e.g. 2GB (default: one file "
                        "up to transformers' default shard size)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tomoe_core", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_convert(sub)
    _add_evaluate(sub)
    _add_generate(sub)
    _add_rebudget(sub)
    _add_calibrate_anchor(sub)
    _add_account(sub)
    _add_export(sub)
    from .trace_cli import add_trace_parser

    add_trace_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        return _run(args, argv)
    except (ValueError, FileNotFoundError) as err:  # user errors: a message, not a traceback
        print(f"error: {err}", file=sys.stderr)
        return 2


def _run(args, argv) -> int:
    from . import pipeline

    if args.command == "convert":
        cfg = ConversionConfig(budget=args.budget, budget_range=args.budget_range, train_gap=args.train_gap,
                               budget_sampling=args.budget_sampling, num_experts=args.experts, steps=args.steps,
                               tokens_per_step=args.tokens_per_step, seq_len=args.seq_len, lr=args.lr, lam=args.lam,
                               union_weight=args.union_weight, load_balance_weight=args.load_balance_weight,
                               init=args.init, init_balance=args.init_balance, prior_scale=args.prior_scale,
                               noise_anneal=args.noise_anneal, mask_noise=args.mask_noise,
                               regularise=args.regularise, distill=args.distill, text=args.text,
                               seed=args.seed, micro_batches=args.micro_batches,
                               checkpoint_every=args.checkpoint_every, device=args.device,
                               model=args.model, prune_attention=args.prune_attention)
        command = "python -m tomoe_core " + " ".join(shlex.quote(a) for a in argv)
        out = pipeline.run_conversion(cfg, args.output, command=command, anchor_windows=args.anchor_windows)
        from .train import dist_info
        if dist_info()[0] != 0:
            return 0
        print(out)
        if args.evaluate and (out / "tomoe.json").exists():
            _print_eval(_evaluate_with_progress(out, device=args.device), out.name)
        return 0
    if args.command == "evaluate":
        baselines = () if args.baselines == "none" else tuple(b.strip() for b in args.baselines.split(",") if b.strip())
        result = _evaluate_with_progress(args.conversion, args.model, args.text, args.window, args.max_windows,
                                         baselines, args.budget, not args.no_routing_modes, args.device,
                                         last_word_items=args.last_word_items)
        name = args.conversion.name if args.conversion else f"baselines-p{result['budget']}"
        _print_eval(result, name, args.output)
        return 0
    if args.command == "generate":
        from .convert import load_converted, read_metadata
        from .evaluate import compare_generation
        from .models import load_dense

        meta = read_metadata(args.conversion)
        dense, tok = load_dense(meta["model"], device=args.device)
        moe, _, _ = load_converted(args.conversion, device=args.device, layout=args.layout, load_tokenizer=False)
        res = compare_generation(dense, moe, tok, args.prompt, args.max_new_tokens, args.device)
        print(f"dense: {args.prompt}{res['dense_text']}")
        print(f"tomoe: {args.prompt}{res['moe_text']}")
        div = res["first_divergence"]
        print("identical" if div is None else f"first divergence at generated token {div}")
        return 0
    if args.command == "calibrate-anchor":
        kwargs = {k: v for k, v in (("budgets", args.budgets), ("gaps", args.gaps)) if v is not None}
        with progress_bar("calibrate", "variant") as progress:
            calib = pipeline.record_anchor_calibration(args.conversion, args.device, args.windows, args.window,
                                                       args.skip_windows, progress=progress, record=not args.dry_run,
                                                       log=lambda *a: None, **kwargs)
        for r in calib["rows"]:
            print(pipeline.format_anchor_row(r))
        print(f"anchor gaps (lowest KL per budget): {calib['anchor_gaps']} on {calib['windows']} windows x "
              f"{calib['window']} in {calib['seconds']:.0f} s" + (" (dry run: not recorded)" if args.dry_run else
                                                                 f"; recorded in {args.conversion / 'tomoe.json'}"))
        return 0
    if args.command == "rebudget":
        print(pipeline.rebudget(args.conversion, args.budget, args.output))
        return 0
    if args.command == "account":
        from .budget import account
        from .convert import load_converted
        from .models import load_dense

        path = Path(args.model)
        model = (load_converted(path, load_tokenizer=False)[0] if (path / "tomoe.json").exists()
                 else load_dense(args.model)[0])
        report = account(model, args.context)
        # the whole-budget ratio is printed for every model, so MLP-only and attention conversions compare
        print(json.dumps({**report.as_dict(), "executed_active_ratio": report.executed_active_ratio}, indent=2))
        return 0
    if args.command == "export":
        import torch

        from .export import export_hub_ready

        dtype = getattr(torch, args.dtype) if args.dtype else None
        print(export_hub_ready(args.conversion, args.hub_ready, dtype, args.max_shard_size))
        return 0
    if args.command == "trace":
        from .trace_cli import run_trace_command

        return run_trace_command(args, argv)
    raise AssertionError(args.command)


@contextlib.contextmanager
def progress_bar(desc: str, unit: str, enabled: bool = True):
    """A tqdm bar on stderr, yielded as a `progress(done, total)` callback (None when not enabled),
    the shape every long engine call takes."""
    if not enabled:
        yield None
        return
    from tqdm import tqdm

    bar = tqdm(total=None, unit=unit, desc=desc, file=sys.stderr, dynamic_ncols=True)

    def progress(done, total):
        bar.total = total
        bar.update(done - bar.n)

    try:
        yield progress
    finally:
        bar.close()


def _evaluate_with_progress(*args, **kwargs) -> dict:
    """pipeline.run_evaluation with a progress bar over the held-out windows (each window runs every
    variant: learned, random and fixed routing, baselines), on stderr."""
    from . import pipeline

    with progress_bar("evaluate", "window") as progress:
        return pipeline.run_evaluation(*args, progress=progress, **kwargs)


def _print_eval(result: dict, name: str, output: Path | None = None) -> None:
    from . import pipeline
    from .io import atomic_write_json

    if output:
        atomic_write_json(output, result)
        path = output
    else:
        path = pipeline.save_result(result, f"eval-{name}")
    print(pipeline.format_quality_table(result))
    for i, layer in enumerate(result.get("layers") or []):
        widths = " ".join(f"{w:.2f}" for w in layer["expert_widths"])
        print(f"layer {i:2d}: experts {widths} | union {layer['union']:.2f}")
    print(f"result written to {path}")
