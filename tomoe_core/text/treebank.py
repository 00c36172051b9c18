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

HEAD and DEPREL may be '_' (a file annotated with parts of speech only is valid CoNLL-U): such a
word's `deprel` and `head_distance` are None. The file is parsed by the `conllu` package; this
module rebuilds the text and the spans. `tomoe_core.trace.gold.add_gold_columns(run)` puts a traced
treebank's annotation into the routing log (`python -m tomoe_core trace --text FILE.conllu` does
it right after the trace).

Treebanks: https://universaldependencies.org (e.g. UD_English-EWT, the `*-ud-test.conllu` file).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import conllu

from .reading import TextSourceError, read_utf8

SUFFIX = ".conllu"
_SPACES_AFTER = {r"\s": " ", r"\t": "\t", r"\n": "\n", r"\r": "\r", r"\p": "|", r"\\": "\\"}


@dataclass(frozen=True)
class GoldWord:
    start: int  # character span [start, end) in the document text
    end: int
    form: str
    upos: str
    xpos: str | None  # None where the treebank has '_'
    deprel: str | None  # None where the treebank has '_' (a POS-only file)
    head_distance: int | None  # HEAD - ID: negative = head to the left; 0 = root; None where HEAD is '_'


@dataclass
class ConlluDocument:
    title: str
    text: str
    words: list[GoldWord] = field(default_factory=list)
    sentences: int = 0


def is_conllu(path: str | Path) -> bool:
    return Path(path).suffix.lower() == SUFFIX


def _space_after(misc: dict | None) -> str:
    """The whitespace written after a token, from its MISC column."""
    misc = misc or {}
    if misc.get("SpaceAfter") == "No":
        return ""
    if "SpacesAfter" in misc:
        return re.sub(r"\\[stnrp\\]", lambda m: _SPACES_AFTER[m.group(0)], misc["SpacesAfter"])
    return " "


def _gold(word: dict) -> tuple[str, str | None, str | None, int | None]:
    """(upos, xpos, deprel, head distance) of a parsed word line."""
    head = word["head"]
    distance = None if head is None else 0 if head == 0 else head - word["id"]
    return word["upos"], word["xpos"], None if word["deprel"] in (None, "_") else word["deprel"], distance


def _surface_tokens(sentence: conllu.TokenList) -> list[tuple[str, str, dict]]:
    """-> surface tokens of one sentence: (form, whitespace after, the word line of its head word)."""
    words = {t["id"]: t for t in sentence if isinstance(t["id"], int)}  # empty nodes (8.1) have no surface form
    ranges = [t for t in sentence if isinstance(t["id"], tuple) and t["id"][1] == "-"]
    covered = {i: r for r in ranges for i in range(r["id"][0], r["id"][2] + 1)}
    tokens = []
    for word_id in sorted(words):
        multiword = covered.get(word_id)
        if multiword is None:
            tokens.append((words[word_id]["form"], _space_after(words[word_id]["misc"]), words[word_id]))
            continue
        first, _, last = multiword["id"]
        if word_id == first:
            members = [words[i] for i in range(first, last + 1) if i in words]
            head = next((w for w in members if w["head"] is not None and not first <= w["head"] <= last), members[0])
            tokens.append((multiword["form"], _space_after(multiword["misc"]), head))
    return tokens


def _check_columns(path: Path, content: str) -> None:
    for number, line in enumerate(content.splitlines(), start=1):
        if line.strip() and not line.startswith("#") and line.count("\t") != 9:
            raise TextSourceError(f"{path}:{number}: a CoNLL-U word line has 10 tab-separated columns, this one "
                                  f"has {line.count(chr(9)) + 1}; is the file CoNLL-U?")


def read_conllu(path: str | Path) -> list[ConlluDocument]:
    """Documents of a CoNLL-U file, each with its text and gold words (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise TextSourceError(f"CoNLL-U file {path} does not exist; pass an existing .conllu treebank file")
    content = read_utf8(path)
    _check_columns(path, content)
    try:
        sentences = conllu.parse(content)
    except conllu.exceptions.ParseException as err:
        raise TextSourceError(f"{path} is not valid CoNLL-U: {err}") from None
    docs: list[ConlluDocument] = []
    parts: list[str] = []  # text of the current document so far
    length = 0  # len("".join(parts))
    pending = ""  # whitespace after the last token of the previous sentence
    title = None
    for sentence in sentences:
        tokens = _surface_tokens(sentence)
        if not tokens:
            continue
        keys = sentence.metadata.keys()
        if any(k.startswith("newdoc") for k in keys):
            title = sentence.metadata.get("newdoc id") or None
        if not docs or any(k.startswith("newdoc") for k in keys):
            if docs:
                docs[-1].text = "".join(parts)
            docs.append(ConlluDocument(title or f"{path.name}#{len(docs)}", ""))
            parts, length = [], 0
        else:
            parts.append("\n\n" if any(k.startswith("newpar") for k in keys) else pending)
            length += len(parts[-1])
        doc = docs[-1]
        for i, (form, after, word) in enumerate(tokens):
            doc.words.append(GoldWord(length, length + len(form), form, *_gold(word)))
            after, pending = ("", after) if i == len(tokens) - 1 else (after, pending)
            parts.append(form + after)
            length += len(form) + len(after)
        doc.sentences += 1
    if not docs:
        raise TextSourceError(f"CoNLL-U file {path} holds no sentences")
    docs[-1].text = "".join(parts)
    for doc in docs:
        for w in doc.words:  # the reconstruction and the spans must agree: a bug otherwise
            assert doc.text[w.start:w.end] == w.form, (doc.title, w)
    return docs
