"""CoNLL-U reading: documents, text reconstruction with SpaceAfter=No, gold spans and tags."""
from pathlib import Path

import pytest

from routing_fixtures import converted, routing_cache  # noqa: F401
from tomoe_core.text.treebank import read_conllu
from tomoe_core.text.reading import TextSourceError
from tomoe_core.text.sources import load_documents

SAMPLE = Path(__file__).parent / "data" / "en_sample.conllu"


def test_sample_documents_text_and_spans():
    docs = read_conllu(SAMPLE)
    assert [d.title for d in docs] == ["sample-bridge", "sample-bees"]
    assert [d.sentences for d in docs] == [5, 6]
    first = docs[0]
    assert first.text.startswith("The old bridge was closed on Monday because the river had risen. Engineers say")
    assert "owners, who don't want to lose customers.\n\nMrs. Patel" in first.text  # newpar: a blank line
    assert '"People will always need bread," she said.' in first.text  # SpaceAfter=No on both quotes' sides
    for doc in docs:
        assert all(doc.text[w.start:w.end] == w.form for w in doc.words)
        assert [w.start for w in doc.words] == sorted(w.start for w in doc.words)
    # every sentence's `# text` comment is reproduced exactly
    comments = [line[len("# text = "):] for line in SAMPLE.read_text().splitlines() if line.startswith("# text = ")]
    joined = "".join(d.text for d in docs)
    assert all(c in joined for c in comments) and len(comments) == 11


def test_sample_gold_annotation():
    words = {(w.form, w.start): w for w in read_conllu(SAMPLE)[0].words}
    by_form = {}
    for (form, _), w in sorted(words.items(), key=lambda kv: kv[0][1]):
        by_form.setdefault(form, []).append(w)
    closed = by_form["closed"][0]
    assert (closed.upos, closed.xpos, closed.deprel, closed.head_distance) == ("VERB", "VBN", "root", 0)
    nt = by_form["n't"][0]
    assert (nt.upos, nt.deprel, nt.head_distance) == ("PART", "advmod", 1)
    that = [w.upos for w in by_form["that"]]
    assert that == ["SCONJ"]  # "That plan" is capitalised
    assert by_form["That"][0].upos == "DET"
    assert by_form["The"][0].head_distance == 2


def test_multiword_token_takes_its_head_words_annotation(tmp_path):
    path = tmp_path / "fr.conllu"
    path.write_text("# newdoc id = d1\n"
                    "1\tIl\til\tPRON\t_\t_\t2\tnsubj\t_\t_\n"
                    "2\tparle\tparler\tVERB\t_\t_\t0\troot\t_\t_\n"
                    "3-4\tdu\t_\t_\t_\t_\t_\t_\t_\t_\n"
                    "3\tde\tde\tADP\t_\t_\t5\tcase\t_\t_\n"
                    "4\tle\tle\tDET\t_\t_\t5\tdet\t_\t_\n"
                    "5\tpain\tpain\tNOUN\t_\t_\t2\tobl\t_\tSpaceAfter=No\n"
                    "5.1\tx\tx\tX\t_\t_\t_\t_\t2:obl\t_\n"
                    "6\t.\t.\tPUNCT\t_\t_\t2\tpunct\t_\t_\n\n"
                    "# newdoc id = d2\n"
                    "1\tOui\toui\tINTJ\t_\t_\t0\troot\t_\tSpacesAfter=\\s\\s\n"
                    "2\t!\t!\tPUNCT\t_\t_\t1\tpunct\t_\t_\n")
    docs = read_conllu(path)
    assert [d.text for d in docs] == ["Il parle du pain.", "Oui  !"]
    du = next(w for w in docs[0].words if w.form == "du")
    # both words of "du" attach to "pain", outside the range: the first of them ("de") is the head
    assert (du.start, du.end, du.upos, du.deprel, du.head_distance) == (9, 11, "ADP", "case", 2)
    assert [w.form for w in docs[0].words] == ["Il", "parle", "du", "pain", "."]


def test_malformed_lines_name_the_file_and_line(tmp_path):
    path = tmp_path / "bad.conllu"
    path.write_text("1\tword\tword\tNOUN\n")
    with pytest.raises(TextSourceError, match=r"bad.conllu:1: .*10 tab-separated columns"):
        read_conllu(path)
    empty = tmp_path / "empty.conllu"
    empty.write_text("# only a comment\n")
    with pytest.raises(TextSourceError, match="no sentences"):
        read_conllu(empty)


def test_load_documents_reads_conllu():
    docs = load_documents(str(SAMPLE))
    assert [d.title for d in docs] == ["sample-bridge", "sample-bees"]
    assert docs[1].text == read_conllu(SAMPLE)[1].text


def test_trace_command_keeps_the_gold_tags_in_the_log(converted, routing_cache, capsys):
    from tomoe_core.trace import queries
    from tomoe_core.cli import main
    from tomoe_core.trace.routing_log import read_run_meta

    assert main(["trace", str(converted), "--text", str(SAMPLE), "--seq-len", "32", "--run-id", "cli-gold",
                 "--quiet"]) == 0
    assert "gold UPOS, XPOS, deprel and head distance" in capsys.readouterr().out
    assert queries.has_gold("cli-gold") and not queries.has_annotation("cli-gold")  # spaCy comes later, on demand
    labels = queries.token_labels("cli-gold", label="gold_deprel")
    assert {"root", "nsubj", "det", "punct"} <= set(labels.pos)
    heads = queries.token_labels("cli-gold", label="gold_head")
    assert "0" in set(heads.pos) and {int(h) for h in heads.pos} <= set(range(-12, 13))
    meta = read_run_meta("cli-gold")
    assert meta["text"]["source"] == str(SAMPLE) and meta["annotations"]["gold_upos"]["source"] == str(SAMPLE)


def test_a_pos_only_file_parses_and_has_no_deprel(tmp_path):
    """'_' in HEAD and DEPREL is valid CoNLL-U (a file annotated with parts of speech only)."""
    path = tmp_path / "pos_only.conllu"
    path.write_text("# text = Bees fly.\n1\tBees\t_\tNOUN\t_\t_\t_\t_\t_\t_\n2\tfly\t_\tVERB\t_\t_\t_\t_\t_\tSpaceAfter=No\n"
                    "3\t.\t_\tPUNCT\t_\t_\t_\t_\t_\t_\n\n")
    (doc,) = read_conllu(path)
    assert doc.text == "Bees fly."
    assert [(w.form, w.upos, w.deprel, w.head_distance) for w in doc.words] == [
        ("Bees", "NOUN", None, None), ("fly", "VERB", None, None), (".", "PUNCT", None, None)]


def test_deprel_statistics_of_a_pos_only_treebank_say_there_is_none():
    from analysis.routing_report import format_gold

    rows = [{"layer": 0, "nmi": 0.1}]
    gold = {"source": "pos_only.conllu", "agreement": 1.0, "tokens_both_tagged": 3, "confusions": [],
            "nmi": {"spacy_upos": rows, "gold_upos": rows, "gold_deprel": None}}
    assert any("gold_deprel: none in the treebank" in line for line in format_gold(gold))
