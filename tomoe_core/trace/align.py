"""Tokens to words by characters: the one alignment rule of every word annotation of a routing log.

A model token and a word rarely coincide (subword pieces, a leading space, contractions, tokens
straddling punctuation, special tokens). The rule: **a token belongs to the word it shares the
most characters with** (the earlier word on a tie), and to no word when it shares none. spaCy's
words (`analysis.syntax`) and a treebank's gold words (`tomoe_core.text.treebank`) both go through it.
"""
from __future__ import annotations

import bisect
import datetime as _dt
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

RULE = "a token takes the word it shares the most characters with; none if it shares none"


def align_tokens(token_spans: Sequence[tuple[int, int]] | np.ndarray, words: Sequence) -> np.ndarray:
    """Word index of each token (-1: none) by the most shared characters, the earlier word on ties.

    token_spans: (n, 2) character spans [start, end) of the model tokens (a tokenizer's
    offset mapping; leading spaces may be included, special tokens are (0, 0)).
    words: non-overlapping, in text order (as `tag_words` returns them).
    """
    spans = np.asarray(token_spans, dtype=np.int64).reshape(-1, 2)
    ends = [w.end for w in words]
    out = np.full(len(spans), -1, dtype=np.int32)
    for i, (start, end) in enumerate(spans.tolist()):
        if end <= start:
            continue
        j = bisect.bisect_right(ends, start)  # first word ending after the token starts
        best, best_overlap = -1, 0
        while j < len(words) and words[j].start < end:
            overlap = min(end, words[j].end) - max(start, words[j].start)
            if overlap > best_overlap:
                best, best_overlap = j, overlap
            j += 1
        out[i] = best
    return out


def run_tokens(folder: Path) -> tuple[dict, dict]:
    """A run's document texts and its tokens' character spans (from layer 0, in document order).
    -> ({doc_id: text}, {doc_id, position, char_start, char_end: (n,) arrays})."""
    import duckdb
    import pyarrow.parquet as pq

    from .routing_log import DOCUMENTS_FILE, PART_GLOB

    docs = pq.read_table(folder / DOCUMENTS_FILE, columns=["doc_id", "text"]).to_pydict()
    glob = str(folder / PART_GLOB).replace("'", "''")
    spans = duckdb.connect().execute(
        f"SELECT doc_id, position, char_start, char_end FROM read_parquet('{glob}') "
        "WHERE layer = 0 ORDER BY doc_id, position").fetchnumpy()
    return dict(zip(docs["doc_id"], docs["text"])), {k: np.asarray(v) for k, v in spans.items()}


def add_aligned_columns(folder: Path, columns: dict[str, Callable], words_of: Callable[[int, str, np.ndarray], list],
                      info: dict, progress: Callable[[int, int], None] | None = None) -> Path:
    """Align every document's tokens to its words (`words_of(doc_id, text, token_spans)`, non-
    overlapping, in text order) and add one column per `columns` entry (name -> word -> str) to
    the run's log: the column of each token's aligned word, null for a token without one."""
    from .routing_log import add_token_columns

    texts, spans = run_tokens(folder)
    doc_ids = spans["doc_id"]
    bounds = np.flatnonzero(np.diff(doc_ids)) + 1
    starts, ends = np.r_[0, bounds], np.r_[bounds, len(doc_ids)]
    values = {name: np.full(len(doc_ids), None, dtype=object) for name in columns}
    for n, (a, b) in enumerate(zip(starts, ends)):
        token_spans = np.stack([spans["char_start"][a:b], spans["char_end"][a:b]], axis=1)
        doc_id = int(doc_ids[a])
        words = words_of(doc_id, texts[doc_id], token_spans)
        idx = align_tokens(token_spans, words)
        hit = np.flatnonzero(idx >= 0)
        for name, get in columns.items():
            values[name][a + hit] = [get(words[i]) for i in idx[hit]]
        if progress is not None:
            progress(n + 1, len(starts))
    first = next(iter(values.values()))
    info = {**info, "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "tokens": int(len(doc_ids)), "tokens_with_word": int(sum(v is not None for v in first)),
            "rule": RULE}
    return add_token_columns(folder, doc_ids, spans["position"], values, info)
