"""A traced treebank's gold annotation in its routing log: the columns of GOLD_COLUMNS, each token taking
its gold word (`text.treebank`) by the alignment rule of `trace.align` (the one spaCy's words use).
A POS-only treebank ('_' in HEAD and DEPREL) gives null gold_deprel and gold_head."""
from __future__ import annotations

from pathlib import Path

from ..text.treebank import is_conllu, read_conllu

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
    from ..infra.locations import REPO_ROOT
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
    from ..moe.atomic import sha256_file
    from .align import add_aligned_columns
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
               "gold_deprel": lambda w: w.deprel,
               "gold_head": lambda w: None if w.head_distance is None else str(w.head_distance)}
    info = {"source": str(path), "sha256": sha256_file(path), "columns": GOLD_COLUMNS}
    return add_aligned_columns(folder, columns, words_of, info)
