"""Two CPU processes (torchrun, gloo) trace one text into one run: it reads as one log and equals
a single-process trace of the same text row for row (same tokens, same expert choices)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from routing_fixtures import TEXTS, converted, routing_cache  # noqa: F401
from tomoe_core.trace import queries
from tomoe_core.trace.routing_log import PART_GLOB, list_runs, read_run_meta, verify_run
from tomoe_core.trace.run import trace_run

ROOT = Path(__file__).resolve().parent.parent
COLUMNS = ["doc_id", "position", "token_id", "token", "char_start", "char_end", "layer", "expert", "router_prob"]


def _rows(run: Path):
    """Every row of the run, part files in name order (the order a glob read gives)."""
    table = pa.concat_tables([pq.read_table(p, columns=COLUMNS) for p in sorted(run.glob(PART_GLOB))],
                             promote_options="permissive")
    return {c: (table[c].cast(pa.string()) if c == "token" else table[c]).to_numpy(zero_copy_only=False)
            for c in COLUMNS}


def test_two_rank_trace_equals_single_process_trace(converted, routing_cache, tmp_path):
    text = tmp_path / "docs.txt"
    text.write_text("\n\n".join(TEXTS * 2))  # 8 documents (one text holds a blank line), 118 tokens
    args = ["trace", str(converted), "--text", str(text), "--seq-len", "16", "--batch-size", "2", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "TOMOE_CACHE": str(routing_cache),
           "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "tomoe_core", *args, "--run-id", "two-ranks"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "2 processes: rank 0" in proc.stdout  # rank 0 reports, rank 1 stays quiet
    assert proc.stdout.count("rows traced") == 1

    two = routing_cache / "routing" / "run_id=two-ranks"
    one = trace_run(converted, source=str(text), seq_len=16, batch_size=2, run_id="one-rank")
    meta2, meta1 = read_run_meta(two), read_run_meta(one)
    verify_run(two)  # run.json holds the sha256 of every rank's files
    assert meta2["world_size"] == 2 and [r["rank"] for r in meta2["ranks"]] == [0, 1]
    assert all(r["tokens"] > 0 and r["parts"] for r in meta2["ranks"]), meta2["ranks"]
    assert {n for n in meta2["files"] if n.startswith("part-r000-")} and {n for n in meta2["files"] if n.startswith("part-r001-")}
    assert sum(meta2["files"][n]["rows"] for r in meta2["ranks"] for n in r["parts"]) == meta2["rows"]
    assert (meta2["rows"], meta2["tokens"], meta2["text"]["documents"]) == (meta1["rows"], meta1["tokens"], 8)
    assert "two-ranks" in {r["run_id"] for r in list_runs()}
    assert not [p for p in (routing_cache / "routing").iterdir() if p.name.startswith(".") and p.is_dir()]

    rows2, rows1 = _rows(two), _rows(one)
    for column in COLUMNS[:-1]:  # row for row: same tokens, same spans, same expert choices
        np.testing.assert_array_equal(rows2[column], rows1[column], err_msg=column)
    np.testing.assert_allclose(rows2["router_prob"], rows1["router_prob"], rtol=1e-5, atol=1e-6)
    print(f"two-rank vs single-process trace: {len(rows1['layer'])} rows, expert choices identical, "
          f"max |router_prob diff| {np.abs(rows2['router_prob'] - rows1['router_prob']).max():.2g}")

    # the queries read the two ranks' files as one log
    load2, load1 = queries.expert_load(two), queries.expert_load(one)
    assert load2.equals(load1)
    doc2 = queries.document_tokens(two, 3)
    doc1 = queries.document_tokens(one, 3)
    assert doc2.drop(columns="router_prob").equals(doc1.drop(columns="router_prob"))
    assert queries.documents(two).equals(queries.documents(one))
