"""Every sequence starts the way the model's tokenizer starts a text: BOS where it adds one, nowhere
else (calibration batches, evaluation windows, prompts, traces), for a tokenizer of each family's
convention."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from routing_fixtures import make_converted
from tiny_models import FAMILIES, FAMILY_ADDS_BOS, tiny_model, tiny_tokenizer
from tomoe_core.text.sources import cached_stream, special_prefix, text_windows, windows
from tomoe_core.eval.metrics import encode_prompt
from tomoe_core.convert.config import ConversionConfig
from tomoe_core.convert.train import sample_batch

TEXT = ("the cat sat on the mat. it did not move, and the dog barked loudly at it!\n\n"
        "alice wrote three short letters to her friends in paris; they answered quickly: thanks.")


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("TOMOE_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "text.txt"
    path.write_text("\n\n".join([TEXT] * 8))
    return str(path)


def _bos_only_first(rows: torch.Tensor, bos: int, adds_bos: bool) -> None:
    """rows (n, T): column 0 is BOS exactly when the tokenizer adds one; BOS nowhere else."""
    assert bool((rows[:, 0] == bos).all()) is adds_bos
    assert not bool((rows[:, 1:] == bos).any())


@pytest.mark.parametrize("family", FAMILIES)
def test_windows_and_calibration_batches_start_like_the_tokenizer(family, corpus):
    adds_bos = FAMILY_ADDS_BOS[family]
    tok = tiny_tokenizer(adds_bos)
    assert special_prefix(tok) == ([tok.bos_token_id] if adds_bos else [])
    held = text_windows(tok, corpus, "heldout", family, 16, 4)
    assert held.shape == (4, 16)
    _bos_only_first(held, tok.bos_token_id, adds_bos)
    # the text after the prefix runs on across windows: nothing of the stream is skipped or repeated
    body = held[:, 1:] if adds_bos else held
    stream = cached_stream(tok, corpus, "heldout", None, family)  # documents joined by EOS, no BOS
    assert body.flatten().tolist() == stream[:body.numel()].tolist()
    stream = torch.tensor(tok(TEXT * 20, add_special_tokens=False)["input_ids"])
    cfg = ConversionConfig(seq_len=16, tokens_per_step=64, steps=1)
    batch = sample_batch(stream, cfg, step=3, micro=0, prefix=special_prefix(tok))
    assert batch.shape == (4, 16)
    _bos_only_first(batch, tok.bos_token_id, adds_bos)
    model = tiny_model(family, vocab_size=len(tok))
    prompt = encode_prompt(tok, "the cat sat on", model)
    assert prompt[0].tolist() == tok("the cat sat on")["input_ids"]  # exactly as the tokenizer encodes it
    _bos_only_first(prompt, tok.bos_token_id, adds_bos)


def test_no_prefix_keeps_windows_unchanged():
    stream = torch.arange(100)
    assert torch.equal(windows(stream, 10, 3), stream[:30].view(3, 10))
    with_bos = windows(stream, 10, 3, prefix=[7])
    assert with_bos[:, 0].tolist() == [7, 7, 7] and torch.equal(with_bos[:, 1:], stream[:27].view(3, 9))


@pytest.mark.parametrize("adds_bos", [True, False])
def test_trace_feeds_the_prefix_and_logs_only_text_tokens(adds_bos, tmp_path, monkeypatch):
    from tomoe_core.convert.materialise import load_converted
    from tomoe_core.trace.capture import capture_routing
    from tomoe_core.trace.routing_log import read_run_meta
    from tomoe_core.trace.run import trace_run
    from tomoe_core.trace import queries

    monkeypatch.setenv("TOMOE_CACHE", str(tmp_path / "cache"))
    tok = tiny_tokenizer(adds_bos)
    folder = make_converted(tmp_path / "tiny-conv", tok)
    run = trace_run(folder, prompts=[TEXT], seq_len=12, batch_size=2, run_id="bos")
    meta = read_run_meta(run)
    assert meta["special_prefix"] == special_prefix(tok)
    frame = queries.document_tokens(run, 0, layer=0)
    text_ids = tok(TEXT, add_special_tokens=False, return_offsets_mapping=True)
    assert frame.position.tolist() == list(range(len(text_ids["input_ids"])))  # the BOS has no row
    assert frame.token_id.tolist() == text_ids["input_ids"]
    assert [tuple(o) for o in frame[["char_start", "char_end"]].to_numpy()] == [tuple(o) for o in text_ids["offset_mapping"]]
    # the logged experts are those of the model run on prefix + window, as in use (window 1 = 11 or 12 tokens)
    model, _, _ = load_converted(folder)
    body = 12 - len(special_prefix(tok))
    with capture_routing(model) as records:
        model(input_ids=torch.tensor([special_prefix(tok) + text_ids["input_ids"][:body]]))
    experts, _ = records.stacked()
    np.testing.assert_array_equal(frame.expert.to_numpy()[:body], experts[0, len(special_prefix(tok)):])
