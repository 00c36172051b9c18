"""Token-to-word alignment and POS annotation: hand-checked sentences and property tests."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from analysis.syntax import UPOS, Word, align_tokens, annotate_tokens, load_tagger, tag_words
from routing_fixtures import converted, routing_cache, shared_tokenizer  # noqa: F401


@pytest.fixture(scope="module")
def tok():
    return shared_tokenizer()


def _aligned(tok, text):
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    idx, words = annotate_tokens(text, enc["offset_mapping"])
    return [(tok.decode([t]), words[i].text if i >= 0 else None, words[i].pos if i >= 0 else None)
            for t, i in zip(enc["input_ids"], idx)]


# Checked by hand against the SmolLM2 tokenizer and en_core_web_sm 3.8.
def test_leading_spaces_subwords_and_contractions(tok):
    got = _aligned(tok, "I don't know, Mr. O'Neil's cat-like e-mail costs $5.00!")
    assert [(t, w) for t, w, _ in got] == [
        ("I", "I"), (" don", "do"), ("'t", "n't"), (" know", "know"), (",", ","), (" Mr", "Mr."), (".", "Mr."),
        (" O", "O'Neil"), ("'", "O'Neil"), ("Neil", "O'Neil"), ("'s", "'s"), (" cat", "cat"), ("-", "-"),
        ("like", "like"), (" e", "e"), ("-", "-"), ("mail", "mail"), (" costs", "costs"), (" $", "$"),
        ("5", "5.00"), (".", "5.00"), ("0", "5.00"), ("0", "5.00"), ("!", "!")]
    pos = {t: p for t, _, p in got}
    # tags the tagger is sure of whatever the context (others, like "like", vary with it)
    assert (pos[" don"], pos["'t"], pos[" know"], pos[","], pos[" Mr"], pos["'s"], pos[" $"], pos["5"]) == \
        ("AUX", "PART", "VERB", "PUNCT", "PROPN", "PART", "SYM", "NUM")
    assert all(p in UPOS for _, _, p in got)


def test_digits_standalone_spaces_and_newlines(tok):
    got = _aligned(tok, "The 1990s-era CEOs weren't there.\n\nNew line")
    words = [(t, w) for t, w, _ in got]
    assert words[:7] == [("The", "The"), (" ", None), ("1", "1990s"), ("9", "1990s"), ("9", "1990s"),
                         ("0", "1990s"), ("s", "1990s")]
    assert (" weren", "were") in words and ("'t", "n't") in words
    assert all(w is None for t, w in words if not t.strip())  # whitespace tokens have no word
    assert ("New", "New") in words or (" New", "New") in words


def test_multibyte_characters_split_across_tokens(tok):
    text = "Über 東京"
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    idx, words = annotate_tokens(text, enc["offset_mapping"])
    assert [w.text for w in words] == ["Über", "東京"]
    # byte pieces of one character share its span and its word
    assert sorted(set(idx.tolist())) == [0, 1] and (idx >= 0).all()


def test_special_tokens_get_no_word(tok):
    text = "Hello world"
    spans = [(0, 0)] + tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"] + [(0, 0)]
    idx, _ = annotate_tokens(text, spans)
    assert idx[0] == -1 and idx[-1] == -1 and (idx[1:-1] >= 0).all()


def test_a_token_spanning_two_words_takes_the_larger_share():
    words = [Word(0, 2, "do", "AUX"), Word(2, 5, "n't", "PART"), Word(6, 10, "know", "VERB")]
    assert align_tokens([(0, 3), (3, 5), (0, 10), (5, 6), (1, 4), (1, 3)], words).tolist() == [0, 1, 2, -1, 1, 0]


def test_tags_are_universal_and_whitespace_is_dropped():
    words = tag_words("  The dog runs.\n\n\tIt barks!  ")
    assert [w.text for w in words] == ["The", "dog", "runs", ".", "It", "barks", "!"]
    assert [w.pos for w in words] == ["DET", "NOUN", "VERB", "PUNCT", "PRON", "VERB", "PUNCT"]
    assert all(w.pos in UPOS for w in words)


def test_long_text_is_tagged_in_chunks_with_correct_offsets(monkeypatch):
    from analysis import syntax

    monkeypatch.setattr(syntax, "_CHUNK_CHARS", 40)
    text = "\n\n".join(f"Paragraph {i} has some words in it." for i in range(6))
    words = tag_words(text)
    assert all(text[w.start:w.end] == w.text for w in words)
    assert [w.text for w in words].count("Paragraph") == 6
    limited = tag_words(text, limit=10)
    assert len(limited) < len(words) and limited == words[: len(limited)]


# -- properties ------------------------------------------------------------------------------------------
def _check_alignment(text, spans, words, idx):
    spans = np.asarray(spans).reshape(-1, 2)
    assert len(idx) == len(spans)  # every token gets exactly one answer: a word or none
    assert ((idx >= -1) & (idx < len(words))).all()
    for w in words:
        assert text[w.start:w.end] == w.text and w.text.strip() == w.text
    covered = np.zeros(len(text), dtype=bool)
    for (s, e), i in zip(spans, idx):
        covered[s:e] = True
        if i >= 0:
            w = words[i]
            assert min(e, w.end) > max(s, w.start), "a token's word must overlap it"
        else:
            assert not any(min(e, w.end) > max(s, w.start) for w in words), "a token overlapping a word got none"
        inside = [j for j, w in enumerate(words) if w.start <= s and e <= w.end and e > s]
        if inside:
            assert i == inside[0], "a token inside a word must get that word"
    for w in words:
        assert covered[w.start:w.end].all(), f"characters of {w.text!r} are covered by no token"
    assigned = idx[idx >= 0]
    assert (np.diff(assigned) >= 0).all(), "word order follows token order"


_alphabet = st.sampled_from(list("abcdefghij XYZ.,;:!?'\"-()$%0123456789\n\téüß東京😀"))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet=_alphabet, max_size=80))
def test_alignment_properties_on_random_text(tok, text):
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    spans = enc["offset_mapping"]
    idx, words = annotate_tokens(text, spans, load_tagger())
    _check_alignment(text, spans, words, idx)


@st.composite
def _words_and_spans(draw):
    """Random non-overlapping words on a line and random token cuts of the same line."""
    length = draw(st.integers(1, 60))
    cuts = sorted(set(draw(st.lists(st.integers(1, length - 1), max_size=20)) if length > 1 else []))
    bounds = [0] + cuts + [length]
    spans = list(zip(bounds[:-1], bounds[1:]))
    starts = sorted(set(draw(st.lists(st.integers(0, length - 1), max_size=10))))
    words = []
    for a, b in zip(starts, starts[1:] + [length]):
        end = draw(st.integers(a + 1, b))
        words.append(Word(a, end, "x" * (end - a), "X"))
    return "x" * length, spans, words


@settings(max_examples=300, deadline=None)
@given(case=_words_and_spans())
def test_alignment_properties_on_synthetic_words(case):
    text, spans, words = case
    _check_alignment(text, spans, words, align_tokens(spans, words))


# -- gold tags from CoNLL-U ----------------------------------------------------------------------------
def test_gold_tags_of_a_conllu_trace(converted, routing_cache, tmp_path):
    """Trace the sample treebank, add its gold columns and spaCy's, compare them token by token."""
    import shutil
    from pathlib import Path

    from analysis.syntax import annotate_gold, annotate_run, gold_source, tag_agreement
    from tomoe_core.trace import queries
    from tomoe_core.trace.routing_log import read_run_meta
    from tomoe_core.trace.run import trace_run

    sample = tmp_path / "sample.conllu"
    shutil.copy(Path(__file__).parent / "data" / "en_sample.conllu", sample)
    run = trace_run(converted, source=str(sample), seq_len=32, batch_size=2, run_id="gold-sample")
    assert gold_source(run) == sample
    annotate_gold(run)
    annotate_run(run)
    doc = queries.document_tokens(run, 0, layer=0)
    rows = queries._query(f"SELECT token::VARCHAR AS token, gold_word::VARCHAR AS w, gold_upos::VARCHAR AS upos, "
                          f"gold_xpos::VARCHAR AS xpos, gold_deprel::VARCHAR AS deprel, gold_head::VARCHAR AS head "
                          f"FROM {queries.routing_source(run)} WHERE layer = 0 AND doc_id = 0 ORDER BY position")
    assert len(rows) == len(doc)
    by_token = {r.token: r for r in rows.itertuples()}
    assert (by_token[" bridge"].upos, by_token[" bridge"].deprel, by_token[" bridge"].head) == ("NOUN", "nsubj:pass", "2")
    assert (by_token[" closed"].deprel, by_token[" closed"].head, by_token[" closed"].xpos) == ("root", "0", "VBN")
    assert by_token["'t"].w == "n't" and by_token["'t"].upos == "PART"  # SmolLM2 splits "don't" as " don" + "'t"
    assert (rows[rows.upos.isna()].token.str.strip() == "").all()  # only whitespace tokens lie outside every word
    for label in ("gold_upos", "gold_deprel", "gold_xpos"):
        assert set(queries.token_labels(run, label=label).pos) >= ({"NOUN", "VERB"} if label == "gold_upos" else set())
    assert "DET" in set(queries.expert_pos(run, label="gold_upos").pos)
    agree = tag_agreement(queries.tag_pairs(run))
    assert agree["tokens"] > 100 and 0.85 < agree["agreement"] <= 1.0
    assert set(agree["confusions"].columns) == {"spaCy", "gold_upos", "tokens"}
    meta = read_run_meta(run)["annotations"]
    assert meta["gold_upos"]["source"] == str(sample) and meta["pos"]["tagger"]
    with pytest.raises(ValueError, match="label"):
        queries.token_labels(run, label="pos; DROP TABLE x")
    # the file changed after the trace: refused, not misaligned
    sample.write_text(sample.read_text().replace("The\tthe", "A\ta", 1))
    with pytest.raises(ValueError, match="no longer holds the traced text"):
        annotate_gold(run, overwrite=True)
    sample.unlink()
    with pytest.raises(ValueError, match="is gone"):
        annotate_gold(run, overwrite=True)
