"""Command line: `python -m tomoe_core COMMAND ...` (`python -m tomoe_core COMMAND --help` for each).

  convert           train a ToMoE conversion of a dense model and save it
  evaluate          perplexity, KL, agreement, last-word accuracy: dense vs conversion vs baselines
  generate          greedy generation of the dense and the converted model side by side
  rebudget          materialise a conversion at another budget (seconds, no retraining)
  calibrate-anchor  record how far below each budget a conditioned conversion generates its experts
  ship              copy what a conversion adds to the dense model into cache/shipped/ (for git)
  account           active parameters and FLOPs per token of a dense or converted model
  export            write a self-contained copy of a conversion that loads without tomoe_core
  trace             record every token's expert per layer over a text and write it as Parquet
  ablate            remove each expert in turn and record which tokens' loss rises (beside a routing log)

Each command is one row of `COMMANDS`: the function that adds its parser and the one that runs it.
Errors a user can cause print one line on stderr (exit status 2), checked before any model loads.
"""
from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable

from .convert.config import ADVANCED, ESSENTIALS, GROUPS, ConversionConfig
from .convert.generation_budget import ANCHOR_BUDGETS, ANCHOR_GAPS, ANCHOR_SKIP_WINDOWS, ANCHOR_WINDOWS, check_budget
from .eval.lastword import DEFAULT_ITEMS
from .infra.progress import progress_bar
from .moe.layer import LAYOUT_PREFERENCE, LAYOUTS
from .moe.metadata import ConversionMetadata
from .text.sources import DEFAULT_CORPUS

USES = tuple(use for use in LAYOUT_PREFERENCE if use != "auto")


def _fraction(text: str) -> float:
    """argparse type of a budget: a number in (0, 1]."""
    try:
        return check_budget(float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text}: a budget is a fraction of the MLP parameters, in (0, 1]") from None


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
                               f"0 skips it (default: {ANCHOR_WINDOWS})")


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
    p.add_argument("--budget", type=_fraction, default=None, help="baseline budget (default: the conversion's)")
    p.add_argument("--text", default=DEFAULT_CORPUS, help="evaluation text: 'wiki' held-out split, .txt file, folder, hf:NAME")
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
    p.add_argument("--layout", default="decode", choices=LAYOUTS + USES, metavar="LAYOUT",
                   help=f"MoE weight layout: {', '.join(LAYOUTS)}; or a use, for the fastest layout for it that "
                        f"fits in memory: {', '.join(USES)} (default: %(default)s)")


def _add_rebudget(sub):
    p = sub.add_parser("rebudget", help="materialise a conversion at another budget (seconds, no retraining)",
                       description="A budget-conditioned conversion (convert --budget-range) generates the experts "
                                   "for the new budget (labelled 'conditioned'). Any other conversion falls back to "
                                   "re-thresholding its trained mask logits so the widest experts meet the new budget "
                                   "(labelled 'threshold-moved' in tomoe.json; a conversion trained at that budget is "
                                   "expected to be better).")
    p.add_argument("conversion", type=Path, help="converted model folder that has hypernet.safetensors")
    p.add_argument("--budget", "-p", type=_fraction, required=True, help="new fraction of MLP parameters active per token")
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
    p.add_argument("--budgets", type=float, nargs="+", default=None, help=f"default: {' '.join(map(str, ANCHOR_BUDGETS))} inside the range")
    p.add_argument("--gaps", type=float, nargs="+", default=None, help=f"default: {' '.join(map(str, ANCHOR_GAPS))}")
    p.add_argument("--windows", type=int, default=ANCHOR_WINDOWS, help="validation windows (default: %(default)s)")
    p.add_argument("--window", type=int, default=512, help="tokens per window (default: %(default)s)")
    p.add_argument("--skip-windows", type=int, default=ANCHOR_SKIP_WINDOWS,
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


def _run_id(text: str) -> str:
    """argparse type of --run-id: the plain-name rule of `paths.routing_run_id` ('..' is refused)."""
    from .infra.paths import PathNotAllowedError, routing_run_id

    try:
        return routing_run_id(text)
    except PathNotAllowedError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _add_trace(sub):
    p = sub.add_parser(
        "trace", help="record every token's expert per layer over a text and write it as Parquet",
        description="Run a converted ToMoE model over held-out text (or a file, a folder, or prompts) and write a "
                    "routing log: one row per (token, layer) with the chosen expert and its router probability, "
                    "under cache/routing/run_id=ID/ with the run's metadata beside it. Query it with "
                    "tomoe_core.trace.queries (DuckDB); tag it with `python -m analysis.routing_report RUN`. Under "
                    "`torchrun --nproc_per_node N -m tomoe_core trace ...` every process traces its own share of the "
                    "text into the same run, which reads as one log.")
    p.add_argument("conversion", type=Path, help="converted model folder (made by `python -m tomoe_core convert`)")
    p.add_argument("--text", default=DEFAULT_CORPUS,
                   help="'wiki' (the default corpus), a .txt file (blank-line-separated documents), a folder "
                        "of .txt files, or a .conllu file (a Universal Dependencies treebank: its gold UPOS, XPOS, "
                        "deprel and head distance go into the log too) (default: %(default)s)")
    p.add_argument("--split", default="heldout", choices=("heldout", "calibration"),
                   help="part of the default corpus to trace (default: %(default)s)")
    p.add_argument("--prompts", nargs="+", default=None, metavar="TEXT",
                   help="trace these texts instead of --text, one document each")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="stop after this many tokens, cutting the last document (default: all)")
    p.add_argument("--seq-len", type=int, default=512,
                   help="tokens per window; documents are cut into non-overlapping windows (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: %(default)s)")
    p.add_argument("--layout", choices=LAYOUTS, default="shared",
                   help="MoE weight layout; routing is the same in every one (default: %(default)s)")
    p.add_argument("--run-id", default=None, type=_run_id,
                   help="name of the run folder: letters, digits, '.', '_' or '-', as output names (default: "
                        "CONVERSION-SOURCE-UTCTIME)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run of the same --run-id")
    p.add_argument("--compare-untraced", action="store_true",
                   help="also run every batch without hooks, side by side, and report the tracing overhead")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _trace(args, argv) -> int:
    from .infra.ranks import is_rank0
    from .text.treebank import is_conllu
    from .trace.gold import add_gold_columns
    from .trace.routing_log import read_run_meta
    from .trace.run import trace_run

    first_rank = is_rank0()  # under torchrun only rank 0 reports
    command = _command_line(argv) if argv else None
    with progress_bar("trace", "tok", enabled=not args.quiet and first_rank) as progress:
        path = trace_run(args.conversion, source=args.text, split=args.split, prompts=args.prompts,
                         max_tokens=args.max_tokens, seq_len=args.seq_len, batch_size=args.batch_size,
                         device=args.device, layout=args.layout, run_id=args.run_id, overwrite=args.overwrite,
                         progress=progress, command=command, compare_untraced=args.compare_untraced)
    if not first_rank:
        return 0
    if not args.prompts and is_conllu(args.text):  # a treebank: its gold annotation goes into the log now
        add_gold_columns(path, args.text)
        print(f"gold UPOS, XPOS, deprel and head distance of {args.text} added to the log")
    meta = read_run_meta(path)
    timing = meta["timing"]
    print(f"{path}\n{meta['tokens']} tokens x {meta['num_layers']} layers = {meta['rows']} rows traced in "
          f"{timing['traced_s']:.1f} s ({timing['rows_per_s']:.0f} rows/s, {meta['bytes_per_row']:.2f} bytes/row; "
          f"forward {timing['forward_s']:.1f} s, rows {timing['record_s']:.1f} s, write {timing['write_s']:.1f} s)")
    if meta.get("ranks"):
        print(f"{meta['world_size']} processes: " + ", ".join(
            f"rank {r['rank']} {r['tokens']} tokens in {r['traced_s']:.1f} s" for r in meta["ranks"]))
    if "overhead_pct" in timing:
        print(f"same batches without hooks: {timing['untraced_s']:.1f} s; tracing overhead {timing['overhead_pct']:+.1f} %")
    return 0


def _layer_list(text: str) -> list[int]:
    """argparse type of --layers / --experts: "0,5,12" or "0-3,12"."""
    from .trace.ablation import AblationError, parse_indices

    try:
        return parse_indices(text)
    except AblationError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _add_ablate(sub):
    from .trace.ablation import DEFAULT_MAX_TOKENS, EFFECTS, REPLACEMENTS, default_max_tokens

    p = sub.add_parser(
        "ablate", help="remove each expert in turn and record which tokens' loss rises (beside a routing log)",
        description="For a routing log's text, each chosen layer and each expert: rerun the text with that expert "
                    "removed (its tokens go to their second-choice expert, and as a control to a random other "
                    "expert) and record, per token, the change in next-token loss and the KL to the unablated "
                    "model. Rows go to <run folder>/ablation/ (Parquet, one file per layer; query with DuckDB). "
                    "--effect direct is the fast estimate: every token loses its own expert at once with attention "
                    "frozen at the unablated pass (each token's direct effect; E times fewer passes), rows in "
                    "<run folder>/ablation-direct/. "
                    "The cost is printed before the model loads; finished layers survive an interruption and a "
                    "rerun of the same command resumes after them.")
    p.add_argument("run", help="routing run id or folder (made by `python -m tomoe_core trace`)")
    p.add_argument("--conversion", type=Path, default=None,
                   help="the conversion that wrote the log (default: the one its run.json names, or the shipped "
                        "one of that name)")
    p.add_argument("--layers", type=_layer_list, default=None, help="MoE layers, e.g. 0,5,12 or 0-3 (default: all)")
    p.add_argument("--experts", type=_layer_list, default=None, help="experts, e.g. 0-3 (default: all)")
    p.add_argument("--replacements", nargs="+", choices=REPLACEMENTS, default=list(REPLACEMENTS),
                   help="what takes a removed expert's tokens: their second choice, and a random other expert "
                        "as the control (default: both)")
    p.add_argument("--effect", choices=EFFECTS, default="total",
                   help="total: exact rerun per removed expert, direct and through attention (default); direct: "
                        "the fast estimate along each token's own residual stream, attention frozen")
    p.add_argument("--max-tokens", type=int, default=None,
                   help=f"ablate on the log's first N tokens (default: {DEFAULT_MAX_TOKENS} for the total effect, "
                        f"{default_max_tokens('direct')} for the direct one)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random replacement (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _ablate(args, argv) -> int:
    from .trace.ablation import read_ablation_meta
    from .workflows.ablation import ablate

    with progress_bar("ablate", "pass", enabled=not args.quiet) as progress:
        folder = ablate(args.run, conversion=args.conversion, layers=args.layers, experts=args.experts,
                        replacements=args.replacements, max_tokens=args.max_tokens, seed=args.seed,
                        device=args.device, progress=progress, command=_command_line(argv) if argv else None,
                        effect=args.effect)
    meta = read_ablation_meta(args.run, args.effect)
    print(f"{folder}\n{meta['tokens']} tokens x {len(meta['layers'])} layers x {len(meta['experts'])} experts x "
          f"{len(meta['replacements'])} replacement(s), {args.effect} effect, in {meta['seconds']:.0f} s; the model reproduced "
          f"{100 * meta['log_agreement']:.2f} % of the log's expert choices")
    return 0


def _command_line(argv: list[str]) -> str:
    return "python -m tomoe_core " + " ".join(shlex.quote(a) for a in argv)


def _convert(args, argv) -> int:
    from .infra.ranks import is_rank0
    from .workflows.conversion_run import run_conversion

    cfg = ConversionConfig(**{name: getattr(args, name) for name, *_ in config_options()})
    out = run_conversion(cfg, args.output, command=_command_line(argv), anchor_windows=args.anchor_windows)
    if not is_rank0():
        return 0
    print(out)
    if args.evaluate and ConversionMetadata.exists(out):
        _print_eval(_evaluate_with_progress(conversion=out, device=args.device), out.name)
    return 0


def _evaluate(args, argv) -> int:
    baselines = () if args.baselines == "none" else tuple(b.strip() for b in args.baselines.split(",") if b.strip())
    result = _evaluate_with_progress(conversion=args.conversion, model_name=args.model, text=args.text,
                                     window=args.window, max_windows=args.max_windows, baselines=baselines,
                                     budget=args.budget, routing_modes=not args.no_routing_modes, device=args.device,
                                     last_word_items=args.last_word_items)
    name = args.conversion.name if args.conversion else f"baselines-p{result['budget']}"
    _print_eval(result, name, args.output)
    return 0


def _generate(args, argv) -> int:
    model_name = ConversionMetadata.read(args.conversion).dense_model(args.conversion)  # before loading anything
    from .convert.dense import load_dense
    from .convert.materialise import load_converted
    from .eval.metrics import compare_generation

    dense, tok = load_dense(model_name, device=args.device)
    moe, _, _ = load_converted(args.conversion, device=args.device, layout=args.layout, load_tokenizer=False)
    res = compare_generation(dense, moe, tok, args.prompt, args.max_new_tokens, args.device)
    print(f"dense: {args.prompt}{res['dense_text']}")
    print(f"tomoe: {args.prompt}{res['moe_text']}")
    div = res["first_divergence"]
    print("identical" if div is None else f"first divergence at generated token {div}")
    return 0


def _calibrate_anchor(args, argv) -> int:
    from .workflows.anchors import format_anchor_row, record_anchor_calibration

    kwargs = {k: v for k, v in (("budgets", args.budgets), ("gaps", args.gaps)) if v is not None}
    with progress_bar("calibrate", "variant") as progress:
        calib = record_anchor_calibration(args.conversion, device=args.device, windows=args.windows,
                                          window=args.window, skip=args.skip_windows, progress=progress,
                                          record=not args.dry_run, **kwargs)
    for r in calib["rows"]:
        print(format_anchor_row(r))
    print(f"anchor gaps (lowest KL per budget): {calib['anchor_gaps']} on {calib['windows']} windows x "
          f"{calib['window']} in {calib['seconds']:.0f} s" + (" (dry run: not recorded)" if args.dry_run else
                                                             f"; recorded in {args.conversion / 'tomoe.json'}"))
    return 0


def _rebudget(args, argv) -> int:
    from .workflows.rebudget import rebudget

    print(rebudget(args.conversion, args.budget, args.output))
    return 0


def _ship(args, argv) -> int:
    from .workflows.shipping import ship_conversion

    target = ship_conversion(args.conversion, args.name)
    size = sum(f.stat().st_size for f in target.iterdir())
    print(f"{target} ({size / 2**20:.1f} MiB)")
    return 0


def _account(args, argv) -> int:
    from .convert.accounting import account
    from .convert.dense import load_dense
    from .convert.materialise import load_converted

    path = Path(args.model)
    model = (load_converted(path, load_tokenizer=False)[0] if ConversionMetadata.exists(path)
             else load_dense(args.model)[0])
    report = account(model, args.context)
    # the whole-budget ratio is printed for every model, so MLP-only and attention conversions compare
    print(json.dumps({**report.as_dict(), "executed_active_ratio": report.executed_active_ratio}, indent=2))
    return 0


def _export(args, argv) -> int:
    import torch

    from .workflows.export import export_hub_ready

    dtype = getattr(torch, args.dtype) if args.dtype else None
    print(export_hub_ready(args.conversion, args.hub_ready, dtype, args.max_shard_size))
    return 0


@dataclass(frozen=True)
class Command:
    add: Callable  # (subparsers) -> None: adds the command's parser
    run: Callable  # (parsed args, argv) -> exit status


COMMANDS = {
    "convert": Command(_add_convert, _convert),
    "evaluate": Command(_add_evaluate, _evaluate),
    "generate": Command(_add_generate, _generate),
    "rebudget": Command(_add_rebudget, _rebudget),
    "calibrate-anchor": Command(_add_calibrate_anchor, _calibrate_anchor),
    "ship": Command(_add_ship, _ship),
    "account": Command(_add_account, _account),
    "export": Command(_add_export, _export),
    "trace": Command(_add_trace, _trace),
    "ablate": Command(_add_ablate, _ablate),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tomoe_core", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS.values():
        command.add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    # the engine reports progress through logging ("tomoe_core.*"); the command line shows it on stderr
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        return COMMANDS[args.command].run(args, argv)
    except (ValueError, FileNotFoundError) as err:  # user errors: a message, not a traceback
        print(f"error: {err}", file=sys.stderr)
        return 2


def _evaluate_with_progress(**kwargs) -> dict:
    """`run_evaluation` with a progress bar over the held-out windows (each window runs every variant:
    learned, random and fixed routing, baselines), on stderr."""
    from .workflows.evaluation import run_evaluation

    with progress_bar("evaluate", "window") as progress:
        return run_evaluation(progress=progress, **kwargs)


def _print_eval(result: dict, name: str, output: Path | None = None) -> None:
    from .moe.atomic import atomic_write_json
    from .workflows.evaluation import format_quality_table, save_result

    if output:
        atomic_write_json(output, result)
        path = output
    else:
        path = save_result(result, f"eval-{name}")
    print(format_quality_table(result))
    for i, layer in enumerate(result.get("layers") or []):
        widths = " ".join(f"{w:.2f}" for w in layer["expert_widths"])
        print(f"layer {i:2d}: experts {widths} | union {layer['union']:.2f}")
    print(f"result written to {path}")
