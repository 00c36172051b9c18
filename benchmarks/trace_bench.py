"""Measurements of routing logs: `python -m benchmarks.trace_bench overhead|synthetic|query`.

  overhead CONVERSION [--max-tokens 100000]
      `trace_run(compare_untraced=True)`: every batch of held-out text runs with and without
      routing capture, side by side (alternating which goes first, so background load hits
      both alike). The traced side includes recording, building the rows and writing the
      Parquet log. Prints tokens, rows/s, bytes/row and the overhead %.
  synthetic [--rows 10000000]
      Writes a synthetic routing log of that many rows (30 layers, 8 experts, Zipf-distributed
      tokens, experts mildly dependent on POS) plus its POS annotation, in the real format.
  query RUN [--repeats 5]
      Times the expert x POS query (`tomoe_core.trace.queries.expert_pos`) with DuckDB: first (cold) and median.

Every command prints the machine it ran on.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SYNTHETIC_POS = ("ADJ", "ADP", "ADV", "AUX", "CCONJ", "DET", "NOUN", "NUM", "PART", "PRON", "PROPN", "PUNCT",
                 "SCONJ", "VERB")


def _machine(device: str = "cpu") -> dict:
    from tomoe_core.infra.machine import machine_info

    return machine_info(device)


def measure_overhead(conversion: str | Path, source: str = "wiki", max_tokens: int | None = 100_000,
                     seq_len: int = 512, batch_size: int = 4, device: str = "cpu", layout: str = "shared",
                     keep_run_id: str | None = None) -> dict:
    """A trace with every batch also run untraced, side by side. -> figures (seconds, rows/s, bytes/row,
    overhead %). The log goes to a temporary folder unless `keep_run_id` names a run to keep."""
    from tomoe_core.trace.routing_log import read_run_meta
    from tomoe_core.trace.run import trace_run

    with tempfile.TemporaryDirectory() as tmp:
        path = trace_run(conversion, source, max_tokens=max_tokens, seq_len=seq_len, batch_size=batch_size,
                         device=device, layout=layout, run_id=keep_run_id or "overhead",
                         root=None if keep_run_id else tmp, overwrite=bool(keep_run_id), compare_untraced=True)
        meta = read_run_meta(path)
    return {"conversion": str(conversion), "run": str(path) if keep_run_id else None, "text": meta["text"],
            "tokens": meta["tokens"], "layers": meta["num_layers"], "rows": meta["rows"],
            "seq_len": seq_len, "batch_size": batch_size, "device": device, "layout": layout,
            "bytes_per_row": meta["bytes_per_row"], **meta["timing"], "machine": meta["machine"]}


def write_synthetic_log(rows: int = 10_000_000, layers: int = 30, experts: int = 8, run_id: str = "synthetic-10m",
                        root: str | Path | None = None, seed: int = 0, overwrite: bool = True) -> Path:
    """A routing log with `rows` rows (rows // layers tokens) and its POS annotation, in the real format."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tomoe_core.moe.atomic import atomic_dir, atomic_write_json, sha256_file
    from tomoe_core.infra.workspace import file_lock
    from tomoe_core.trace.routing_log import (DOCUMENTS_FILE, RUN_META_FILE, SCHEMA_VERSION, PartWriter,
        RoutingLogError, add_token_columns, routing_root)

    rng = np.random.default_rng(seed)
    tokens = rows // layers
    doc_len = 2000
    doc_ids = (np.arange(tokens) // doc_len).astype(np.int32)
    positions = (np.arange(tokens) % doc_len).astype(np.int32)
    vocab = 20_000
    token_ids = np.minimum(rng.zipf(1.3, tokens) - 1, vocab - 1).astype(np.int32)
    pos_of_token = rng.integers(0, len(SYNTHETIC_POS), vocab)
    pos = pos_of_token[token_ids]
    lengths = rng.integers(1, 8, tokens).astype(np.int32)
    char_end = np.cumsum(lengths).astype(np.int32)
    char_start = char_end - lengths

    class _Strings:  # the token dictionary of a synthetic vocabulary
        strings = [f"t{i}" for i in range(vocab)]

    root = Path(root) if root is not None else routing_root()
    final = root / f"run_id={run_id}"
    with file_lock(final):
        if final.exists() and not overwrite:
            raise RoutingLogError(f"{final} exists")
        with atomic_dir(final) as tmp:
            writer = PartWriter(tmp, run_id, _Strings)
            chunk = 1 << 17
            for start in range(0, tokens, chunk):
                sl = slice(start, min(start + chunk, tokens))
                n = sl.stop - sl.start
                expert = np.where(rng.random((layers, n)) < 0.3, pos[sl] % experts,
                                  rng.integers(0, experts, (layers, n))).astype(np.int16)
                writer.add({"doc_id": np.repeat(doc_ids[sl], layers), "position": np.repeat(positions[sl], layers),
                            "token_id": np.repeat(token_ids[sl], layers), "token_index": np.repeat(token_ids[sl], layers),
                            "char_start": np.repeat(char_start[sl], layers), "char_end": np.repeat(char_end[sl], layers),
                            "layer": np.tile(np.arange(layers, dtype=np.int16), n), "expert": expert.T.ravel(),
                            "router_prob": rng.random(layers * n, dtype=np.float32)})
            writer.flush()
            n_docs = int(doc_ids[-1]) + 1
            pq.write_table(pa.table({"doc_id": pa.array(np.arange(n_docs), pa.int32()),
                                     "title": [f"synthetic {i}" for i in range(n_docs)], "text": [""] * n_docs,
                                     "tokens": pa.array(np.bincount(doc_ids), pa.int32())}), tmp / DOCUMENTS_FILE)
            files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(tmp.iterdir())}
            atomic_write_json(tmp / RUN_META_FILE, {
                "schema_version": SCHEMA_VERSION, "run_id": run_id, "synthetic": True,
                "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "model": "synthetic", "num_experts": experts, "num_layers": layers, "rows": writer.rows,
                "tokens": tokens, "text": {"source": "synthetic", "documents": n_docs}, "files": files})
    pos_names = np.asarray(SYNTHETIC_POS, dtype=object)[pos]
    return add_token_columns(final, doc_ids, positions, {"word": pos_names, "pos": pos_names}, {"tagger": "synthetic"})


def time_expert_pos(run, repeats: int = 5) -> dict:
    from tomoe_core.trace import queries

    con = queries.connect()
    times, result = [], None
    for _ in range(repeats + 1):
        start = time.perf_counter()
        result = queries.expert_pos(run, con=con)
        times.append(time.perf_counter() - start)
    meta = json.loads((queries.run_dir(run) / "run.json").read_text())
    return {"run": str(run), "rows": meta["rows"], "result_rows": len(result), "first_s": round(times[0], 3),
            "median_s": round(statistics.median(times[1:]), 3), "min_s": round(min(times), 3),
            "threads": con.execute("SELECT current_setting('threads')").fetchone()[0], "machine": _machine()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.trace_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("overhead", help="tracing overhead: the same batches with and without routing capture")
    p.add_argument("conversion", type=Path, help="converted model folder")
    p.add_argument("--text", default="wiki", help="'wiki' held-out split, a .txt file or a folder (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=100_000, help="tokens to trace (default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per window (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: %(default)s)")
    p.add_argument("--layout", choices=("shared", "packed"), default="shared", help="MoE layout (default: %(default)s)")
    p.add_argument("--keep-run-id", default=None, help="keep the traced log as this run (default: a temporary folder)")
    p = sub.add_parser("synthetic", help="write a synthetic routing log with POS annotation")
    p.add_argument("--rows", type=int, default=10_000_000, help="rows of the log (default: %(default)s)")
    p.add_argument("--run-id", default="synthetic-10m", help="run folder name (default: %(default)s)")
    p = sub.add_parser("query", help="time the expert x POS DuckDB query on a run")
    p.add_argument("run", help="run id or folder")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats after the first (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        if args.command == "overhead":
            out = measure_overhead(args.conversion, args.text, args.max_tokens, args.seq_len, args.batch_size,
                                   args.device, args.layout, args.keep_run_id)
        elif args.command == "synthetic":
            start = time.perf_counter()
            path = write_synthetic_log(args.rows, run_id=args.run_id)
            out = {"run": str(path), "rows": args.rows, "seconds": round(time.perf_counter() - start, 1)}
        else:
            out = time_expert_pos(args.run, args.repeats)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
