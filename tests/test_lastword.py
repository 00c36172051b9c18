"""Last-word accuracy (tomoe_core.eval.lastword): item construction, the tokenizer's prefix, the lm-eval is_greedy
criterion on constructed callables, right padding on tiny models of every family, and the real default model."""
from __future__ import annotations

import math
import re

import pytest
import torch

from tiny_models import FAMILIES, FAMILY_ADDS_BOS, VOCAB, tiny_model, tiny_tokenizer
from tomoe_core.eval import lastword
from tomoe_core.text.sources import Document
from tomoe_core.eval.metrics import logits_fn
from tomoe_core.eval.lastword import (EncodedItem, LastWordItem, build_items, candidate_items, encode_items,
    score_last_words)

PARAGRAPH = ("The cat sat on the mat and did not move at it. Alice wrote three short letters to her friends in paris. "
             "They answered quickly and the children ran home. The dog barked loudly at the cat on the mat.")
TEXT = "\n".join([
    "==Letters==",  # a heading: never an item
    PARAGRAPH,
    "* the dog barked at it and did not move at all.",  # a list line: never an item
    "The cat sat on paris.",  # too few words before the last word
    "The dog barked at a cat. The children ran home fast and did not sit on a mat.",  # "mat": too short
    "Alice wrote to her friends i.e. the dog and the cat and the children in paris.",  # "i.e." is no sentence end
])


def docs() -> list[Document]:
    return [Document(0, "tiny", TEXT)]


def test_items_are_sentence_final_words_after_whole_sentences():
    items = candidate_items(docs())
    assert [i.target for i in items] == [" paris", " home", " paris"]  # "it", "mat" and the others fail a rule
    first, second, third = items
    assert first.context == "The cat sat on the mat and did not move at it. Alice wrote three short letters to her friends in"
    assert second.context.startswith("The cat sat") and second.context.endswith("and the children ran")
    assert third.context == "Alice wrote to her friends i.e. the dog and the cat and the children in"
    assert all(i.title == "tiny" for i in items)


def test_context_is_cut_at_a_sentence_start_to_stay_within_the_word_limit(monkeypatch):
    monkeypatch.setattr(lastword, "MAX_CONTEXT_WORDS", 20)
    items = {i.target: i for i in candidate_items(docs())}
    assert items[" home"].context == "Alice wrote three short letters to her friends in paris. They answered quickly and the children ran"
    monkeypatch.setattr(lastword, "MAX_CONTEXT_WORDS", 6)  # its own sentence alone is too long: no item
    assert " home" not in {i.target for i in candidate_items(docs())}


def test_selection_is_seeded_and_nested():
    many = [Document(k, f"d{k}", PARAGRAPH.replace("paris", f"city{chr(97 + k)}")) for k in range(12)]
    assert build_items(many, 10) == build_items(many, 10)
    assert build_items(many, 5) == build_items(many, 10)[:5]
    assert build_items(many, 10, seed=1) != build_items(many, 10)
    assert len(build_items(many, 1000)) == len(candidate_items(many))  # fewer when the text has fewer


def test_heldout_items_are_cached_and_follow_the_rule(tmp_path, monkeypatch):
    monkeypatch.setenv("TOMOE_CACHE", str(tmp_path))
    items = lastword.load_items(count=50)
    assert len(items) == 50 and len({(i.context, i.target) for i in items}) == 50
    texts = {d.title: d.text for d in lastword.load_documents("wiki", "heldout")}
    for item in items:
        assert re.fullmatch(r" [A-Za-z]{%d,}" % lastword.MIN_LETTERS, item.target)
        at = texts[item.title].index(item.context + item.target + ".")  # the word ends a sentence of the text
        assert re.search(r"(^|\n)\s*$|[.!?]\s+$", texts[item.title][:at]), item  # the context starts a sentence
        assert len(item.context.split()) <= lastword.MAX_CONTEXT_WORDS
    (cached,) = (tmp_path / "lastword").glob("*.json")
    monkeypatch.setattr(lastword, "load_documents", lambda *a: pytest.fail("not read from the cache"))
    assert lastword.load_items(count=50) == items


@pytest.mark.parametrize("adds_bos", [True, False])
def test_contexts_start_with_the_tokenizers_own_prefix(adds_bos):
    tokenizer = tiny_tokenizer(adds_bos)
    (encoded,) = encode_items(tokenizer, [LastWordItem("The cat sat on the", " mat", "t")])
    words = tokenizer("the cat sat on the mat", add_special_tokens=False)["input_ids"]
    assert list(encoded.context) == ([tokenizer.bos_token_id] if adds_bos else []) + words[:-1]
    assert list(encoded.target) == words[-1:]


def _table_model(encoded: list[EncodedItem], shift: int = 0):
    """ids -> logits that put the next token of every item's text (plus `shift`) first, wherever it is in a batch."""
    table = {}
    for e in encoded:
        seq = e.context + e.target
        for t in range(len(e.context) - 1, len(seq) - 1):
            table[seq[:t + 1]] = (seq[t + 1] + shift) % VOCAB

    def run(ids):
        logits = torch.zeros(*ids.shape, VOCAB)  # (B, T, V)
        for b, row in enumerate(ids.tolist()):
            for t in range(len(row)):
                nxt = table.get(tuple(row[:t + 1]))
                if nxt is not None:
                    logits[b, t, nxt] = 30.0
        return logits
    return run


ITEMS = [EncodedItem((1, 5, 6, 7), (8,)), EncodedItem((1, 9), (10, 11, 12)), EncodedItem((1, 5, 6), (40, 41)),
         EncodedItem((13, 14, 15, 16, 17, 18), (19,))]


@pytest.mark.parametrize("batch_tokens", [1, 6, 4096])
def test_a_model_that_predicts_every_target_token_scores_one_and_a_wrong_one_zero(batch_tokens):
    right = score_last_words(_table_model(ITEMS), ITEMS, batch_tokens=batch_tokens)
    assert right.accuracy == 1.0 and right.correct == [True] * 4 and right.items == 4
    assert right.loglikelihood == pytest.approx(0.0, abs=1e-9)
    wrong = score_last_words(_table_model(ITEMS, shift=1), ITEMS, batch_tokens=batch_tokens)
    assert wrong.accuracy == 0.0 and wrong.loglikelihood < -20
    assert right.fields() == {"last_word_accuracy": 1.0, "last_word_items": 4, "last_word_loglikelihood": right.loglikelihood}


def test_every_target_token_must_be_the_greedy_choice():
    def first_token_only(ids):  # right on each target's first token, uniform after it
        logits = _table_model(ITEMS)(ids)
        for b, row in enumerate(ids.tolist()):
            for e in ITEMS:
                seq = list(e.context + e.target)[:-1]
                if row[:len(seq)] == seq:
                    logits[b, len(e.context):] = 0.0
        return logits
    score = score_last_words(first_token_only, ITEMS)
    assert score.correct == [True, False, False, True]  # the one-token targets only
    uniform = score_last_words(lambda ids: torch.zeros(*ids.shape, VOCAB), ITEMS)
    assert uniform.accuracy == 0.0  # the argmax of a tie is index 0, no target here
    assert uniform.loglikelihoods == pytest.approx([-k * math.log(VOCAB) for k in (1, 3, 2, 1)])


@pytest.mark.parametrize("family", FAMILIES)
def test_right_padding_gives_every_family_the_scores_of_one_item_at_a_time(family):
    tokenizer = tiny_tokenizer(FAMILY_ADDS_BOS[family])
    items = candidate_items(docs())
    encoded = encode_items(tokenizer, items)
    assert len({len(e.context) for e in encoded}) > 1  # items of several lengths share a padded batch
    fn = logits_fn(tiny_model(family))
    alone = score_last_words(fn, encoded, batch_tokens=1)
    batched = score_last_words(fn, encoded, batch_tokens=4096, pad_id=tokenizer.pad_token_id)
    assert batched.correct == alone.correct
    assert batched.loglikelihoods == pytest.approx(alone.loglikelihoods, abs=1e-4)


@pytest.mark.integration
def test_default_model_gets_a_sane_share_of_last_words_and_fast():
    from tomoe_core.convert.dense import load_dense

    model, tokenizer = load_dense("smollm2-135m")
    items = lastword.load_items(count=50)
    encoded = encode_items(tokenizer, items)
    assert list(encoded[0].context) == tokenizer(items[0].context, add_special_tokens=False)["input_ids"]  # no BOS
    score = score_last_words(logits_fn(model), encoded)
    assert 0.2 <= score.accuracy <= 0.6, score.accuracy
    assert -8 < score.loglikelihood < -1, score.loglikelihood
    assert score.seconds < 60


def test_evaluate_command_reports_last_word_accuracy_per_variant(tmp_path, monkeypatch):
    import json

    from tomoe_core.cli import main

    monkeypatch.setenv("TOMOE_CACHE", str(tmp_path / "cache"))
    dense = tmp_path / "dense"
    tiny_model("llama").save_pretrained(dense)
    tiny_tokenizer(adds_bos=True).save_pretrained(dense)
    text = tmp_path / "text.txt"
    text.write_text(TEXT + "\n\n" + PARAGRAPH)
    out = tmp_path / "eval.json"
    common = ["evaluate", "--model", str(dense), "--text", str(text), "--window", "32", "--max-windows", "1",
              "--baselines", "magnitude", "--budget", "0.5", "--output", str(out)]
    assert main([*common, "--last-word-items", "4"]) == 0
    result = json.loads(out.read_text())
    assert result["last_word"]["items"] == 4 and result["last_word"]["version"] == lastword.RULE_VERSION
    for name in ("dense", "magnitude"):
        row = result["results"][name]
        assert row["last_word_items"] == 4 and 0 <= row["last_word_accuracy"] <= 1 and row["last_word_loglikelihood"] < 0
    assert main([*common, "--last-word-items", "0"]) == 0
    result = json.loads(out.read_text())
    assert result["last_word"] is None and "last_word_accuracy" not in result["results"]["dense"]
    with pytest.raises(SystemExit):
        main([*common, "--last-word-items", "-1"])
