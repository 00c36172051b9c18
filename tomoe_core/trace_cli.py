"""`python -m tomoe_core trace CONVERSION ...`: write a routing log of a converted model."""
from __future__ import annotations

import shlex
from pathlib import Path


def _run_id(text: str) -> str:
    """argparse type of --run-id: the plain-name rule of `paths.routing_run_id` ('..' is refused)."""
    import argparse

    from .paths import PathNotAllowedError, routing_run_id

    try:
        return routing_run_id(text)
    except PathNotAllowedError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_trace_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "trace", help="record every token's expert per layer over a text and write it as Parquet",
        description="Run a converted ToMoE model over held-out text (or a file, a folder, or prompts) and write a "
                    "routing log: one row per (token, layer) with the chosen expert and its router probability, "
                    "under cache/routing/run_id=ID/ with the run's metadata beside it. Query it with "
                    "tomoe_core.queries (DuckDB); tag it with `python -m analysis.routing_report RUN`. Under "
                    "`torchrun --nproc_per_node N -m tomoe_core trace ...` every process traces its own share of the "
                    "text into the same run, which reads as one log.")
    p.add_argument("conversion", type=Path, help="converted model folder (made by `python -m tomoe_core convert`)")
    p.add_argument("--text", default="wiki",
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
    p.add_argument("--layout", choices=("shared", "packed"), default="shared",
                   help="MoE weight layout; routing is the same in both (default: %(default)s)")
    p.add_argument("--run-id", default=None, type=_run_id,
                   help="name of the run folder: letters, digits, '.', '_' or '-', as output names (default: "
                        "CONVERSION-SOURCE-UTCTIME)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run of the same --run-id")
    p.add_argument("--compare-untraced", action="store_true",
                   help="also run every batch without hooks, side by side, and report the tracing overhead")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run_trace_command(args, argv: list[str] | None = None) -> int:
    from .progress import progress_bar
    from .ranks import is_rank0
    from .conllu import add_gold_columns, is_conllu
    from .routing_log import read_run_meta
    from .trace import trace_run

    first_rank = is_rank0()  # under torchrun only rank 0 reports
    command = "python -m tomoe_core " + " ".join(shlex.quote(a) for a in argv) if argv else None
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
