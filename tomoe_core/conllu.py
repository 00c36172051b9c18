"""CoNLL-U (Universal Dependencies) files as documents with gold word annotations.

A CoNLL-U file holds sentences of one word per line (ID FORM LEMMA UPOS XPOS FEATS HEAD
DEPREL DEPS MISC), sentences separated by blank lines, comments starting with '#'. Here:

* documents: a `# newdoc` comment starts a new document (a file without any is one document);
* text: the surface tokens of each sentence joined as the treebank says they were written: a
  space after every token unless its MISC has SpaceAfter=No (or SpacesAfter=... gives other
  whitespace), the same for the last token of a sentence before the next one; paragraphs
  (`# newpar`) are separated by a blank line;
* gold words: every surface token's character span in that text, with the word's UPOS,
  XPOS, dependency relation and head distance (HEAD - ID; 0 for the root).

A multiword token ("du" = "de" + "le", "gonna" = "gon" + "na") is one span in the text; it
gets the annotation of its syntactic head, the word of the range whose HEAD lies outside the
range (the first one if several do). Empty nodes (IDs like 8.1) have no surface form and are
skipped.

`add_gold_columns(run)` puts a traced treebank's annotation into the routing log: each token
takes its gold word by the alignment rule of `tomoe_core.align` (the one spaCy's words use) and
gets the columns of GOLD_COLUMNS. `python -m tomoe_core trace --text FILE.conllu` does it right
after the trace.

Treebanks: https://universaldependencies.org (e.g. UD_English-EWT, the `*-ud-test.conllu` file).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from .data import TextSourceError

SUFFIX = ".conllu"
_SPACES_AFTER = {r"\s": " ", r"\t": "\t", r"\n": "\n", r"\r": "\r", r"\p": "|", r"\\": "\\"}


@dataclass(frozen=True)
class GoldWord:
    start: int  # character span [start, end) in the document text
    end: int
    form: str
    upos: str
    xpos: str | None  # None where the treebank has '_'
    deprel: str
    head_distance: int  # HEAD - ID: negative = head to the left; 0 = root


@dataclass
class ConlluDocument:
    title: str
    text: str
    words: list[GoldWord] = field(default_factory=list)
    sentences: int = 0


def is_conllu(path: str | Path) -> bool:
    return Path(path).suffix.lower() == SUFFIX


def _space_after(misc: str) -> str:
    """The whitespace written after a token, from its MISC column."""
    for item in misc.split("|"):
        if item == "SpaceAfter=No":
            return ""
        if item.startswith("SpacesAfter="):
            return re.sub(r"\\[stnrp\\]", lambda m: _SPACES_AFTER[m.group(0)], item[len("SpacesAfter="):])
    return " "


def _parse_sentence(lines: list[tuple[int, str]], path: Path) -> list[tuple[str, str, dict]]:
    """-> surface tokens of one sentence: (form, whitespace after, annotation of its head word)."""
    rows, ranges = {}, []
    for number, line in lines:
        cols = line.split("\t")
        if len(cols) != 10:
            raise TextSourceError(f"{path}:{number}: a CoNLL-U word line has 10 tab-separated columns, this one "
                                  f"has {len(cols)}; is the file CoNLL-U?")
        ident = cols[0]
        if "." in ident:  # empty node: no surface form
            continue
        if "-" in ident:
            first, last = (int(x) for x in ident.split("-"))
            ranges.append((first, last, cols))
            continue
        try:
            word_id, head = int(ident), int(cols[6])
        except ValueError:
            raise TextSourceError(f"{path}:{number}: ID {ident!r} and HEAD {cols[6]!r} must be integers") from None
        rows[word_id] = {"form": cols[1], "upos": cols[3], "xpos": None if cols[4] == "_" else cols[4],
                         "deprel": cols[7], "head_distance": 0 if head == 0 else head - word_id, "head": head,
                         "misc": cols[9]}
    covered = {i: (first, last, cols) for first, last, cols in ranges for i in range(first, last + 1)}
    tokens = []
    for word_id in sorted(rows):
        if word_id in covered:
            first, last, cols = covered[word_id]
            if word_id != first:
                continue
            members = [rows[i] for i in range(first, last + 1) if i in rows]
            head = next((w for w in members if not first <= w["head"] <= last), members[0])
            tokens.append((cols[1], _space_after(cols[9]), head))
        else:
            row = rows[word_id]
            tokens.append((row["form"], _space_after(row["misc"]), row))
    return tokens


def read_conllu(path: str | Path) -> list[ConlluDocument]:
    """Documents of a CoNLL-U file, each with its text and gold words (see the module docstring)."""
    path = Path(path)
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise TextSourceError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    docs: list[ConlluDocument] = []
    parts: list[str] = []  # text of the current document so far
    length = 0  # len("".join(parts))
    pending = ""  # whitespace after the last token of the previous sentence
    sentence: list[tuple[int, str]] = []
    new_doc, new_par, doc_title = True, False, None

    def close_sentence():
        nonlocal new_doc, new_par, parts, length, pending
        if not sentence:
            return
        if new_doc:
            if docs:
                docs[-1].text = "".join(parts)
            docs.append(ConlluDocument(doc_title or f"{path.name}#{len(docs)}", ""))
            parts, length, new_doc = [], 0, False
        else:
            parts.append("\n\n" if new_par else pending)
            length += len(parts[-1])
        doc = docs[-1]
        tokens = _parse_sentence(sentence, path)
        for i, (form, after, word) in enumerate(tokens):
            doc.words.append(GoldWord(length, length + len(form), form, word["upos"], word["xpos"], word["deprel"],
                                      word["head_distance"]))
            after, pending = ("", after) if i == len(tokens) - 1 else (after, pending)
            parts.append(form + after)
            length += len(form) + len(after)
        doc.sentences += 1
        sentence.clear()
        new_par = False

    for number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            close_sentence()
        elif line.startswith("#"):
            comment = line[1:].strip()
            if comment.startswith("newdoc"):
                close_sentence()
                new_doc, new_par = True, False
                doc_title = comment.partition("=")[2].strip() or None
            elif comment.startswith("newpar"):
                close_sentence()
                new_par = True
        else:
            sentence.append((number, line))
    close_sentence()
    if docs:
        docs[-1].text = "".join(parts)
    if not docs:
        raise TextSourceError(f"CoNLL-U file {path} holds no sentences")
    for doc in docs:
        for w in doc.words:  # the reconstruction and the spans must agree: a bug otherwise
            assert doc.text[w.start:w.end] == w.form, (doc.title, w)
    return docs


# -- gold columns of a routing log ------------------------------------------------------------------
GOLD_COLUMNS = {  # log column -> what it holds
    "gold_word": "the treebank's surface token (a multiword token as written)",
    "gold_upos": "gold universal POS",
    "gold_xpos": "gold language-specific POS (null where the treebank has none)",
    "gold_deprel": "gold dependency relation (with subtype, e.g. nsubj:pass)",
    "gold_head": "head distance HEAD - ID in words as text ('0' = root, '-2' = head two words left)",
}


def gold_source(run) -> Path | None:
    """The CoNLL-U file a run was traced on (its recorded text source), or None when it was
    traced on something else. A relative path is read from the repository root, as traced there."""
    from .paths import REPO_ROOT
    from .routing_log import read_run_meta

    source = (read_run_meta(run).get("text") or {}).get("source")
    if not source or not is_conllu(source):
        return None
    path = Path(source)
    return path if path.is_absolute() or path.exists() else REPO_ROOT / path


def add_gold_columns(run, conllu: str | Path | None = None, overwrite: bool = False) -> Path:
    """Add the gold annotation of the CoNLL-U file a run was traced on (or `conllu`) to its log:
    the columns of GOLD_COLUMNS, each token taking its gold word by the same alignment rule as
    spaCy's words. The file must still hold the traced text: every traced document's text is
    compared with the one stored in the run."""
    from .align import add_aligned_columns
    from .io import sha256_file
    from .routing_log import has_columns, run_dir

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
    return add_aligned_columns(folder, columns, words_of, info)
