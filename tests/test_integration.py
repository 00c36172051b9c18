"""Integration tests on the real default model (SmolLM2-135M-Instruct from PyPI) and the shipped conversion.

The first run dequantises the GGUF (about 30 s) into cache/models; later runs load in seconds.
"""
from __future__ import annotations

import math

import pytest
import torch

from tomoe_core import load_converted, load_dense
from tomoe_core.convert.accounting import account
from tomoe_core.text.sources import cached_stream, windows
from tomoe_core.eval.metrics import compare_generation, evaluate_variants, logits_fn
from tomoe_core.infra.locations import shipped_dir
from tomoe_core.workflows.shipping import ensure_shipped_conversions

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def dense():
    return load_dense("smollm2-135m")


@pytest.fixture(scope="module")
def converted():
    folders = ensure_shipped_conversions(log=lambda *a: None)
    assert folders, f"no shipped conversion under {shipped_dir()}"
    return load_converted(folders[0])


def test_default_model_is_smollm2(dense):
    model, tokenizer = dense
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert model.config.hidden_size == 576 and model.config.intermediate_size == 1536
    assert abs(sum(p.numel() for p in model.parameters()) - 134.5e6) < 0.1e6
    assert tokenizer.decode(tokenizer("Hello world")["input_ids"]) == "Hello world"


def test_shipped_conversion_keeps_its_budget(converted):
    model, _tok, meta = converted
    report = account(model)
    assert abs(report.mlp_active_ratio - meta["budget"]) <= 0.02
    assert report.active_total < 0.8 * report.dense_total
    assert len(model.moe_mlps) == 30 and all(m.num_experts == meta["num_experts"] for m in model.moe_mlps)


def test_learned_routing_beats_random_routing_on_heldout_text(dense, converted):
    model, tokenizer = dense
    moe, _tok, _meta = converted
    held = windows(cached_stream(tokenizer, "wiki", "heldout", None, "smollm2-135m"), 256, 2)
    gen = torch.Generator()
    variants = {"learned": logits_fn(moe, lambda: moe.set_routing(None)),
                "random": logits_fn(moe, lambda: (gen.manual_seed(0), moe.set_routing("random", gen)))}
    res = evaluate_variants(logits_fn(model), variants, held)
    moe.set_routing(None)
    assert 8 < res["dense"].perplexity < 60, res["dense"]
    assert math.isfinite(res["learned"].perplexity)
    assert res["learned"].perplexity < 0.85 * res["random"].perplexity
    assert res["learned"].top1_agreement > res["random"].top1_agreement


def test_generation_side_by_side(dense, converted):
    model, tokenizer = dense
    moe = converted[0]
    out = compare_generation(model, moe, tokenizer, "The capital of France is", max_new_tokens=8)
    assert len(out["dense_ids"]) == 8 and len(out["moe_ids"]) == 8
    assert len(out["moe_token_kl"]) == 8 and all(k >= -1e-4 for k in out["moe_token_kl"])
    again = compare_generation(model, moe, tokenizer, "The capital of France is", max_new_tokens=8)
    assert again["moe_ids"] == out["moe_ids"], "greedy generation must be deterministic"
