"""Command line: python -m tomoe_core convert | evaluate | generate | rebudget | calibrate-anchor | account |
export | trace (`python -m tomoe_core COMMAND --help` for each)."""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import types
import typing
from dataclasses import fields
from pathlib import Path

from .config import ADVANCED, ESSENTIALS, GROUPS, ConversionConfig
from .lastword import DEFAULT_ITEMS
from .progress import progress_bar


def config_options() -> list[tuple[str, str, tuple[str, ...], dict]]:
    """(field name, group, flags, argparse keywords) of every ConversionConfig field with a `convert` option,
    from the field's metadata (config.option) and annotation: a bool is a flag, a tuple a fixed-length list."""
    hints = typing.get_type_hints(ConversionConfig)
    options = []
    for f in fields(ConversionConfig):
        if "cli" not in f.metadata:
            continue
        meta = dict(f.metadata["cli"])
        group, flags = meta.pop("group"), meta.pop("flags") or ("--" + f.name.replace("_", "-"),)
        kwargs = {"dest": f.name, "default": f.default, **meta}
        hint = hints[f.name]
        if typing.get_origin(hint) in (typing.Union, types.UnionType):
            hint = next(a for a in typing.get_args(hint) if a is not type(None))  # Optional[X]: X
        if hint is bool:
            kwargs["action"] = "store_false" if f.default else "store_true"
        elif typing.get_origin(hint) is tuple:
            args = typing.get_args(hint)
            kwargs.update(type=args[0], nargs=len(args))
        else:
            kwargs["type"] = hint
        options.append((f.name, group, flags, kwargs))
    return options


def _add_convert(sub):
    p = sub.add_parser("convert", help="train a ToMoE conversion of a dense model and save it",
                       description="Convert a dense causal LM to a ToMoE mixture-of-experts. The dense weights stay "
                                   "frozen; a hypernetwork and per-layer routers are trained by distillation. "
                                   "Rerunning the same command resumes from the last checkpoint.")
    groups = {title: p.add_argument_group(title, description) for title, description in GROUPS.items()}
    for _, group, flags, kwargs in config_options():
        groups[group].add_argument(*flags, **kwargs)
    # options of the run rather than settings of the conversion (not in ConversionConfig or the checkpoint)
    essentials, advanced = groups[ESSENTIALS], groups[ADVANCED]
    essentials.add_argument("--output", type=Path, default=None,
                            help="output folder (default: cache/conversions/MODEL-pBUDGET-eEXPERTS)")
    essentials.add_argument("--evaluate", action="store_true", help="evaluate the saved conversion afterwards")
    advanced.add_argument("--anchor-windows", type=int, default=None,
                          help="with --budget-range: validation windows of the held-out text (after the first 60, "
                               "which evaluate reports on) on which the finished conversion measures how far below "
                               "each budget to generate its experts before widening them (see calibrate-anchor); "
                               "0 skips it (default: 4)")


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
                   help="comma-separated baselines: magnitude, wanda-sp, flap, torch-pruning (static); teal, cats "
                        "(per-token, training-free), oracle (per-token ceiling); or none (default: %(default)s)")
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


def _add_ship(sub):
    p = sub.add_parser("ship", help="copy what a conversion adds to the dense model into cache/shipped/ (for git)",
                       description="A fresh clone materialises what is under cache/shipped/ on first use. A "
                                   "single-budget conversion ships as a recipe (routers and channel index lists); "
                                   "a budget-conditioned one ships its hypernetwork, so every budget of its range "
                                   "is available. The dense weights are never copied.")
    p.add_argument("conversion", type=Path, help="converted model folder")
    p.add_argument("--name", default=None, help="folder name under cache/shipped/ (default: the conversion's)")


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
    _add_ship(sub)
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
        cfg = ConversionConfig(**{name: getattr(args, name) for name, *_ in config_options()})
        command = "python -m tomoe_core " + " ".join(shlex.quote(a) for a in argv)
        out = pipeline.run_conversion(cfg, args.output, command=command, anchor_windows=args.anchor_windows)
        from .ranks import is_rank0
        if not is_rank0():
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
    if args.command == "ship":
        from .shipping import ship_conversion

        target = ship_conversion(args.conversion, args.name)
        size = sum(f.stat().st_size for f in target.iterdir())
        print(f"{target} ({size / 2**20:.1f} MiB)")
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
