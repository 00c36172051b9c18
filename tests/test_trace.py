"""Routing capture, routing logs on disk, the trace CLI and the DuckDB queries."""
from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from routing_fixtures import TEXTS, annotated_run, converted, make_converted, routing_cache, tokenizer, traced_run  # noqa: F401
from tiny_models import tiny_ids, tiny_model
from tomoe_core.trace import queries
from tomoe_core.convert.materialise import load_converted
from tomoe_core.trace.capture import capture_routing, routing_points
from tomoe_core.text.sources import special_prefix
from tomoe_core.trace.routing_log import (PART_GLOB, SCHEMA_VERSION, SCHEMA_VERSION_KEY, RoutingLogError, list_runs,
    read_run_meta, verify_run)
from tomoe_core.trace.run import trace_run


@pytest.fixture(scope="module")
def moe(converted):
    model, tok, _ = load_converted(converted)
    return model, tok


def _router_argmax(model, ids):
    """Expected experts per layer, from the routers' inputs (hooks on the MoE MLPs themselves)."""
    seen = []
    handles = [m.register_forward_hook(lambda mod, inp, out: seen.append(mod.router(inp[0].reshape(-1, inp[0].shape[-1])).detach()))
               for m in model.moe_mlps]
    try:
        model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    return [s.argmax(-1).numpy() for s in seen], [torch.softmax(s, -1).max(-1).values.numpy() for s in seen]


@torch.inference_mode()
def route_text(model, tokenizer, text):
    """Routing of one whole text in one forward, the tokenizer's prefix (BOS) first but without rows:
    one row per (token, layer) with position, token_id, layer, expert (the test's reference)."""
    import pandas as pd

    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    prefix = special_prefix(tokenizer)
    with capture_routing(model) as records:
        model(input_ids=torch.tensor([prefix + ids]))
    experts = records.stacked()[0][:, len(prefix):]  # (L, T)
    num_layers, n = experts.shape
    return pd.DataFrame({"position": np.tile(np.arange(n), num_layers), "token_id": np.tile(ids, num_layers),
                         "layer": np.repeat(np.arange(num_layers), n), "expert": experts.ravel()})


def test_capture_records_every_token_and_layer(moe):
    model, _ = moe
    ids = tiny_ids(batch=3, length=7)
    expected_e, expected_p = _router_argmax(model, ids)
    with capture_routing(model) as records:
        model(input_ids=ids)
    experts, probs = records.stacked()
    assert experts.shape == probs.shape == (len(model.moe_mlps), 21)
    assert experts.dtype == np.int16 and probs.dtype == np.float32
    for layer in range(len(model.moe_mlps)):
        np.testing.assert_array_equal(experts[layer], expected_e[layer])
        np.testing.assert_allclose(probs[layer], expected_p[layer], rtol=1e-5)


def test_hooks_are_removed_even_on_error(moe):
    model, _ = moe
    points = routing_points(model)
    with pytest.raises(RuntimeError, match="boom"):
        with capture_routing(model):
            assert all(p.listening for p in points)
            raise RuntimeError("boom")
    assert not any(p.listening for p in points)
    with capture_routing(model):
        pass
    assert not any(p._forward_hooks for p in points)


def test_capture_on_training_time_masked_model():
    from tomoe_core import MaskedModel

    mm = MaskedModel(tiny_model("gpt2"), num_experts=3)
    for m in mm.mlps:
        m.expert_masks = torch.ones(3, m.weights.intermediate_size)
    with capture_routing(mm) as records:
        mm(input_ids=tiny_ids(batch=2, length=5))
    experts, _ = records.stacked()
    assert experts.shape == (2, 10) and experts.max() < 3


def test_capture_without_routing_points_says_what_to_pass():
    with pytest.raises(RoutingLogError, match="no routing points"):
        with capture_routing(torch.nn.Linear(2, 2)):
            pass


def test_trace_run_writes_the_contract(traced_run, converted, tokenizer):
    meta = read_run_meta(traced_run)
    num_layers = meta["num_layers"]
    tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in TEXTS)
    assert meta["tokens"] == tokens and meta["rows"] == tokens * num_layers
    assert meta["schema_version"] == SCHEMA_VERSION and meta["budget"] == 0.5 and meta["num_experts"] == 4
    assert meta["conversion_digest"] and meta["versions"]["pyarrow"] and meta["text"]["source"] == "prompts"
    parts = sorted(traced_run.glob(PART_GLOB))
    table = pq.read_table(parts[0])
    assert table.schema.metadata[SCHEMA_VERSION_KEY] == str(SCHEMA_VERSION).encode()
    types = {f.name: str(f.type) for f in table.schema}
    assert types["token"].startswith("dictionary") and types["layer"] == "int16" and types["expert"] == "int16"
    assert types["doc_id"] == "int32" and types["router_prob"] == "float"
    assert pq.ParquetFile(parts[0]).metadata.num_row_groups == 1  # small run: one row group
    verify_run(traced_run)
    assert any(r["run_id"] == "fixture" for r in list_runs())


def test_log_matches_in_memory_routing_and_offsets(traced_run, moe):
    model, tok = moe
    con = queries.connect()
    for doc_id, text in enumerate(TEXTS[:2]):
        logged = queries.document_tokens(traced_run, doc_id, con=con)
        direct = route_text(model, tok, text)
        # the log cut the document into windows of 16 tokens; the first window sees the same context
        first = logged[logged.position < 16].sort_values(["layer", "position"]).reset_index(drop=True)
        ref = direct[direct.position < 16].sort_values(["layer", "position"]).reset_index(drop=True)
        np.testing.assert_array_equal(first.expert.to_numpy(), ref.expert.to_numpy())
        np.testing.assert_array_equal(first.token_id.to_numpy(), ref.token_id.to_numpy())
        layer0 = logged[logged.layer == 0].sort_values("position")
        rebuilt = "".join(text[s:e] for s, e in zip(layer0.char_start, layer0.char_end))
        assert rebuilt == text  # the spans tile the document
        assert "".join(layer0.token) == text


def test_existing_run_is_kept_unless_overwritten(converted, routing_cache):
    first = trace_run(converted, prompts=["one two three"], run_id="twice")
    with pytest.raises(RoutingLogError, match="exists"):
        trace_run(converted, prompts=["four five"], run_id="twice")
    assert read_run_meta(first)["tokens"] == 3
    trace_run(converted, prompts=["four five six seven"], run_id="twice", overwrite=True)
    assert read_run_meta(first)["tokens"] > 3


def test_crash_leaves_no_half_written_run(converted, routing_cache, monkeypatch):
    from tomoe_core.trace import run as trace

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(trace, "write_documents", crash)
    with pytest.raises(OSError, match="disk full"):
        trace_run(converted, prompts=["a crash midway"], run_id="crashed")
    root = routing_cache / "routing"
    assert not (root / "run_id=crashed").exists()
    assert not [p for p in root.iterdir() if p.name.startswith(".") and p.is_dir()]
    assert all(r["run_id"] != "crashed" for r in list_runs())


def test_verify_run_detects_modification(converted, routing_cache):
    path = trace_run(converted, prompts=["tamper with me"], run_id="tampered")
    part = next(path.glob(PART_GLOB))
    part.write_bytes(part.read_bytes()[:-10])
    with pytest.raises(RoutingLogError, match="modified"):
        verify_run(path)


def test_large_runs_split_into_parts_and_row_groups(converted, routing_cache, monkeypatch):
    from tomoe_core.trace import routing_log

    monkeypatch.setattr(routing_log, "PART_ROWS", 40)
    monkeypatch.setattr(routing_log, "ROW_GROUP_ROWS", 32)
    path = trace_run(converted, prompts=TEXTS, seq_len=8, batch_size=1, run_id="parts")
    meta = read_run_meta(path)
    parts = sorted(path.glob(PART_GLOB))
    assert len(parts) > 1
    assert sum(pq.ParquetFile(p).metadata.num_rows for p in parts) == meta["rows"]
    assert queries.expert_load(path).tokens.sum() == meta["rows"]


def test_trace_cli(converted, routing_cache, capsys, tmp_path):
    from tomoe_core.cli import main

    text = tmp_path / "notes.txt"
    text.write_text("First document here.\n\nSecond one, shorter.")
    assert main(["trace", str(converted), "--text", str(text), "--run-id", "cli"]) == 0
    captured = capsys.readouterr()
    assert "rows" in captured.out and "bytes/row" in captured.out
    assert "trace" in captured.err and "tok" in captured.err  # the progress bar, on stderr
    meta = read_run_meta("cli")
    assert meta["text"]["documents"] == 2 and meta["command"].startswith("python -m tomoe_core trace")
    assert main(["trace", str(tmp_path / "missing"), "--quiet"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["trace", str(converted), "--text", str(tmp_path / "nope.txt"), "--quiet"]) == 2


def test_cli_help_describes_every_option_of_every_command(capsys):
    from tomoe_core.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    assert {"trace", "convert", "evaluate", "rebudget", "calibrate-anchor"} <= set(commands)
    for name, sub in commands.items():
        for action in sub._actions:
            assert action.help, f"{name} {action.dest}"


def test_queries(traced_run):
    meta = read_run_meta(traced_run)
    load = queries.expert_load(traced_run)
    assert set(load.layer) == set(range(meta["num_layers"]))
    np.testing.assert_allclose(load.groupby("layer").share.sum(), 1.0)
    balance = queries.layer_balance(traced_run)
    assert ((balance.balance >= 0) & (balance.balance <= 1 + 1e-9)).all()
    assert (balance.entropy_bits <= np.log2(4) + 1e-9).all()

    top = queries.top_tokens(traced_run, layer=0, limit=3)
    assert (top.groupby("expert").size() <= 3).all() and top["rank"].min() == 1
    assert ((top.share_of_token > 0) & (top.share_of_token <= 1)).all()
    one = queries.top_tokens(traced_run, layer=0, expert=int(top.expert.iloc[0]), limit=5)
    assert one.expert.nunique() == 1

    trans = queries.transitions(traced_run)
    assert set(trans.layer) == set(range(meta["num_layers"] - 1))
    assert trans.groupby("layer").tokens.sum().eq(meta["tokens"]).all()
    np.testing.assert_allclose(trans.groupby(["layer", "from_expert"]).share.sum(), 1.0)
    assert queries.documents(traced_run).tokens.sum() == meta["tokens"]
    with pytest.raises(RoutingLogError, match="annotation"):
        queries.expert_pos("parts" if (traced_run.parent / "run_id=parts").exists() else "twice")


def test_unknown_run_names_the_fix(routing_cache):
    with pytest.raises(RoutingLogError, match="python -m tomoe_core trace"):
        queries.expert_load("no-such-run")


def test_expert_pos_query_joins_annotation(annotated_run):
    counts = queries.expert_pos(annotated_run)
    labels = queries.token_labels(annotated_run)
    assert counts.tokens.sum() == len(labels)
    assert set(counts.pos) <= {"ADJ", "ADP", "ADV", "AUX", "CCONJ", "DET", "INTJ", "NOUN", "NUM", "PART", "PRON",
                               "PROPN", "PUNCT", "SCONJ", "SYM", "VERB", "X"}
    doc = queries.document_tokens(annotated_run, 0, layer=0)
    assert {"word", "pos"} <= set(doc.columns)
    cat = doc[doc.token == " cat"].iloc[0]
    assert cat.word == "cat" and cat.pos == "NOUN"
    meta = read_run_meta(annotated_run)
    assert meta["annotations"]["pos"]["tokens"] == meta["tokens"] and meta["annotations"]["pos"]["tagger"]
    verify_run(annotated_run)  # checksums were refreshed
    assert pq.read_schema(next(annotated_run.glob(PART_GLOB))).field("pos").type.value_type == "string"


def test_synthetic_log_and_query_timing(routing_cache):
    from benchmarks.trace_bench import time_expert_pos, write_synthetic_log

    path = write_synthetic_log(rows=30 * 500, run_id="synthetic-small")
    meta = read_run_meta(path)
    assert meta["rows"] == 30 * 500 and meta["annotations"]["pos"]["tagger"] == "synthetic"
    verify_run(path)
    timing = time_expert_pos(path, repeats=2)
    assert timing["result_rows"] > 0 and timing["median_s"] >= 0
    assert queries.expert_pos(path).tokens.sum() == 30 * 500


def test_overhead_benchmark_runs_the_same_batches(converted, tmp_path, capsys):
    from benchmarks.trace_bench import main

    text = tmp_path / "bench.txt"
    text.write_text("\n\n".join(TEXTS))
    assert main(["overhead", str(converted), "--text", str(text), "--seq-len", "8", "--batch-size", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["rows"] == out["tokens"] * out["layers"] and out["bytes_per_row"] > 0
    assert out["untraced_s"] > 0 and out["traced_s"] > 0 and "overhead_pct" in out


def test_a_shipped_routing_log_is_listed_after_local_ones_and_shadowed_by_them(tmp_path, monkeypatch):
    from tomoe_core.trace import routing_log

    monkeypatch.setenv("TOMOE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TOMOE_SHIPPED", str(tmp_path / "shipped"))

    def run(root, run_id, created):
        folder = root / f"run_id={run_id}"
        folder.mkdir(parents=True)
        (folder / "run.json").write_text(json.dumps({"run_id": run_id, "created_at": created, "tokens": 3}))
        (folder / "part-00000.parquet").write_bytes(b"x")
        return folder

    shipped = run(tmp_path / "shipped" / "routing", "default", "2026-01-01")
    run(tmp_path / "shipped" / "routing", "same", "2026-01-01")
    local = run(tmp_path / "cache" / "routing", "same", "2026-02-01")
    runs = {r["run_id"]: r for r in routing_log.list_runs()}
    assert runs["default"]["shipped"] and runs["default"]["path"] == str(shipped)
    assert not runs["same"]["shipped"] and runs["same"]["path"] == str(local)
    assert routing_log.run_dir("default") == shipped and routing_log.run_dir("same") == local
    assert [p.name for p in routing_log.run_files("default")] == ["part-00000.parquet", "run.json"]
