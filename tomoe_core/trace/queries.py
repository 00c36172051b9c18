"""DuckDB queries straight on a run's Parquet files. Every function returns a pandas DataFrame.

`run` is a run id (folder cache/routing/run_id=<id>) or a run folder. The routing rows live in
the run's part-*.parquet files. The part-of-speech columns `word` and `pos` are in the same
rows once `analysis.syntax.annotate_run` has added them (see `tomoe_core.trace.routing_log`): the
expert x POS table is then one GROUP BY, with no join.
"""
from __future__ import annotations

import math
from pathlib import Path

import duckdb
import pandas as pd

from .routing_log import PART_GLOB, RoutingLogError, has_columns, read_run_meta, run_dir


def _quote(path: Path | str) -> str:
    return "'" + str(path).replace("'", "''") + "'"


def routing_source(run) -> str:
    """SQL table expression of a run's routing rows (for your own queries)."""
    folder = run_dir(run)
    return f"read_parquet({_quote(folder / PART_GLOB)})"


def has_annotation(run) -> bool:
    return has_columns(run, ("word", "pos"))


def _require_annotation(run) -> None:
    if not has_annotation(run):
        raise RoutingLogError(f"run {Path(str(run)).name} has no part-of-speech annotation; add it with "
                              "`python -m analysis.routing_report RUN` or analysis.syntax.annotate_run")


def connect(threads: int | None = None) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    if threads:
        con.execute(f"SET threads = {int(threads)}")
    return con


def _query(sql: str, params: list | None = None, con: duckdb.DuckDBPyConnection | None = None) -> pd.DataFrame:
    con = con or duckdb.connect()
    return con.execute(sql, params or []).df()


def expert_load(run, con=None) -> pd.DataFrame:
    """Tokens per (layer, expert) and their share of the layer. Columns: layer, expert, tokens, share."""
    return _query(f"""
        SELECT layer, expert, count(*) AS tokens,
               count(*) / sum(count(*)) OVER (PARTITION BY layer) AS share
        FROM {routing_source(run)} GROUP BY layer, expert ORDER BY layer, expert""", con=con)


def layer_balance(run, num_experts: int | None = None, con=None) -> pd.DataFrame:
    """Load balance per layer. Columns: layer, experts_used, entropy_bits (of the expert shares),
    balance (entropy / log2 E: 1 = perfectly even, 0 = one expert takes everything), max_share."""
    if num_experts is None:
        num_experts = int(read_run_meta(run).get("num_experts") or 0) or None
    load = expert_load(run, con)
    load = load[load.tokens > 0]
    frame = load.groupby("layer").agg(experts_used=("expert", "size"), max_share=("share", "max")).reset_index()
    entropy = load.assign(h=-load.share * load.share.map(math.log2)).groupby("layer").h.sum()
    frame["entropy_bits"] = frame.layer.map(entropy)
    e = num_experts or int(load.expert.max()) + 1
    frame["balance"] = frame.entropy_bits / math.log2(e) if e > 1 else 1.0
    return frame[["layer", "experts_used", "entropy_bits", "balance", "max_share"]]


def top_tokens(run, layer: int, expert: int | None = None, limit: int = 20, min_count: int = 1,
               con=None) -> pd.DataFrame:
    """Most frequent tokens of each expert of `layer` (or of one expert).

    Columns: expert, token, tokens, share_of_expert (of the expert's tokens), share_of_token
    (of that token's occurrences in the layer, the fraction this expert got), rank.
    """
    expert_filter = "" if expert is None else "AND expert = $expert"
    params = {"layer": int(layer), "limit": int(limit), "min_count": int(min_count)}
    if expert is not None:
        params["expert"] = int(expert)
    con = con or duckdb.connect()
    return con.execute(f"""
        WITH counts AS (
            SELECT expert, token_id, any_value(token)::VARCHAR AS token, count(*) AS tokens
            FROM {routing_source(run)} WHERE layer = $layer GROUP BY expert, token_id),
        shares AS (
            SELECT *, tokens / sum(tokens) OVER (PARTITION BY expert) AS share_of_expert,
                   tokens / sum(tokens) OVER (PARTITION BY token_id) AS share_of_token
            FROM counts)
        SELECT expert, token, tokens, share_of_expert, share_of_token,
               row_number() OVER (PARTITION BY expert ORDER BY tokens DESC, token_id) AS rank
        FROM shares WHERE tokens >= $min_count {expert_filter}
        QUALIFY rank <= $limit ORDER BY expert, rank""", params).df()


def document_tokens(run, doc_id: int, layer: int | None = None, con=None) -> pd.DataFrame:
    """Tokens of one document with their experts (all layers, or one).

    Columns: doc_id, position, token_id, token, char_start, char_end, layer, expert,
    router_prob, and word, pos when the run is annotated.
    """
    where = "r.doc_id = $doc" + ("" if layer is None else " AND r.layer = $layer")
    params = {"doc": int(doc_id)} if layer is None else {"doc": int(doc_id), "layer": int(layer)}
    cols = ("r.doc_id, r.position, r.token_id, r.token::VARCHAR AS token, r.char_start, r.char_end, r.layer, "
            "r.expert, r.router_prob")
    if has_annotation(run):
        cols += ", r.word::VARCHAR AS word, r.pos::VARCHAR AS pos"
    sql = f"SELECT {cols} FROM {routing_source(run)} r WHERE {where} ORDER BY r.layer, r.position"
    return (con or duckdb.connect()).execute(sql, params).df()


def documents(run, con=None) -> pd.DataFrame:
    """The traced documents: doc_id, title, tokens (without their text)."""
    from .routing_log import DOCUMENTS_FILE

    path = run_dir(run) / DOCUMENTS_FILE
    return _query(f"SELECT doc_id, title, tokens FROM read_parquet({_quote(path)}) ORDER BY doc_id", con=con)


def transitions(run, layer: int | None = None, con=None) -> pd.DataFrame:
    """How tokens move from an expert of layer l to an expert of layer l + 1.

    Columns: layer (l), from_expert, to_expert, tokens, share (of the tokens of from_expert
    at layer l). With `layer` given, only l -> l + 1.
    """
    src = routing_source(run)
    where = "" if layer is None else "WHERE a.layer = $layer"
    params = {} if layer is None else {"layer": int(layer)}
    return (con or duckdb.connect()).execute(f"""
        SELECT a.layer, a.expert AS from_expert, b.expert AS to_expert, count(*) AS tokens,
               count(*) / sum(count(*)) OVER (PARTITION BY a.layer, a.expert) AS share
        FROM {src} a JOIN {src} b
          ON a.doc_id = b.doc_id AND a.position = b.position AND b.layer = a.layer + 1
        {where}
        GROUP BY a.layer, a.expert, b.expert ORDER BY a.layer, from_expert, to_expert""", params).df()


LABELS = ("pos", "gold_upos", "gold_xpos", "gold_deprel", "gold_head")  # annotation columns a table can group by


def label_column(run, label: str) -> str:
    """`label` checked against LABELS and against the run's columns (it goes into SQL)."""
    if label not in LABELS:
        raise ValueError(f"label {label!r}: use one of {', '.join(LABELS)}")
    if label == "pos":
        _require_annotation(run)
    elif not has_columns(run, (label,)):
        raise RoutingLogError(f"run {Path(str(run)).name} has no {label} column; gold columns come from a CoNLL-U "
                              "trace (`python -m tomoe_core trace CONVERSION --text FILE.conllu`, then "
                              "analysis.syntax.annotate_gold)")
    return label


def has_gold(run) -> bool:
    return has_columns(run, ("gold_upos", "gold_deprel"))


def expert_pos(run, con=None, label: str = "pos") -> pd.DataFrame:
    """Expert x part-of-speech counts. Columns: layer, expert, pos, tokens.

    label: the annotation column to count ("pos" = spaCy UPOS, or a gold column of LABELS);
    it comes back as column `pos` whatever it is. Tokens without a word (whitespace, special
    tokens) are left out.
    """
    column = label_column(run, label)
    return _query(f"""
        SELECT layer, expert, {column}::VARCHAR AS pos, count(*) AS tokens
        FROM {routing_source(run)} WHERE {column} IS NOT NULL
        GROUP BY layer, expert, {column} ORDER BY layer, expert, pos""", con=con)


def token_labels(run, con=None, label: str = "pos") -> pd.DataFrame:
    """One row per annotated (token, layer): layer, doc_id, position, token_id, expert, pos
    (the `label` column, see expert_pos), ordered by layer then token (every layer lists the
    same tokens in the same order). The input of the permutation tests in analysis.experts."""
    column = label_column(run, label)
    return _query(f"""
        SELECT layer, doc_id, position, token_id, expert, {column}::VARCHAR AS pos
        FROM {routing_source(run)} WHERE {column} IS NOT NULL ORDER BY layer, doc_id, position""", con=con)


def tag_pairs(run, con=None) -> pd.DataFrame:
    """spaCy UPOS against gold UPOS, one row per (pos, gold_upos) pair with its token count
    (layer 0: each token once). Tokens that have a word in either annotation are counted; a
    missing tag reads as null."""
    label_column(run, "pos")
    label_column(run, "gold_upos")
    return _query(f"""
        SELECT pos::VARCHAR AS pos, gold_upos::VARCHAR AS gold_upos, count(*) AS tokens
        FROM {routing_source(run)} WHERE layer = (SELECT min(layer) FROM {routing_source(run)})
          AND (pos IS NOT NULL OR gold_upos IS NOT NULL)
        GROUP BY ALL ORDER BY tokens DESC""", con=con)
