"""Attention pruning (the paper's second stage) on tiny models of every family that supports it."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from test_pipeline import tiny_setup  # noqa: F401 (fixture)
from tiny_models import FAMILIES, tiny_ids, tiny_model
from tomoe_core import ConversionConfig, MaskedModel, load_converted, materialise, save_converted
from tomoe_core.moe.attention import ATTENTION_FAMILIES, PrunedAttention
from tomoe_core.convert.accounting import account
from tomoe_core.workflows.conversion_run import run_conversion
from tomoe_core.convert.train import finalize_masks

E = 4


def all_ones(mm: MaskedModel) -> list[torch.Tensor]:
    """MLP (E, I), Q/K (1, P), V/O (E, C) masks of ones."""
    n = len(mm.mlps)
    return [torch.ones(1 if n <= i < 2 * n else E, size) for i, size in enumerate(mm.mask_sizes)]


def random_masks(mm: MaskedModel, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    masks = [(torch.rand(m.shape, generator=g) < 0.5).float() for m in all_ones(mm)]
    n = len(mm.mlps)
    masks[n] = torch.tensor([[1.0, 0.0, 0.0, 1.0]])  # layer 0 keeps pairs 0 and 3 (dims 0, 3, 4, 7)
    # layer 1 keeps no Q/K pair (the zero-width edge case)
    masks[n + 1].zero_()
    masks[2 * n][1] = 0  # a V/O expert with no channel
    return masks


def build(family: str, seed: int = 0):
    mm = MaskedModel(tiny_model(family), num_experts=E, prune_attention=True)
    torch.manual_seed(1)
    with torch.no_grad():  # attention routers that spread tokens over all experts
        for a in mm.attention:
            a.router.weight.normal_(0, 3.0)
    return mm, random_masks(mm, seed)


@pytest.mark.parametrize("family", ATTENTION_FAMILIES)
def test_all_ones_masks_reproduce_dense_logits(family):
    model, ids = tiny_model(family), tiny_ids()
    with torch.no_grad():
        dense = model(ids).logits
    mm = MaskedModel(model, num_experts=E, prune_attention=True)
    mm.set_masks(all_ones(mm))
    with torch.no_grad():
        torch.testing.assert_close(mm(ids).logits, dense)
        mm.set_masks(None)
        torch.testing.assert_close(mm(ids).logits, dense)
        with mm.dense():
            torch.testing.assert_close(mm(ids).logits, dense)


@pytest.mark.parametrize("family", ATTENTION_FAMILIES)
@pytest.mark.parametrize("attn_impl", ["sdpa", "eager"])
def test_materialised_equals_masked_and_reload_is_identical(family, attn_impl, tmp_path):
    mm, masks = build(family)
    mm.model.config._attn_implementation = attn_impl
    ids = tiny_ids()
    mm.set_masks(masks)
    with torch.no_grad():
        masked = mm(ids).logits
    moe = materialise(mm, masks, budget=0.5)
    assert len(moe.pruned_attention) == 2 and moe.pruned_attention[1].kept_dims == 0
    with torch.no_grad():
        torch.testing.assert_close(moe(input_ids=ids).logits, masked, rtol=1e-4, atol=1e-5)
        one = tiny_ids(batch=1, length=1)
        mm.set_masks(masks)
        torch.testing.assert_close(moe(input_ids=one).logits, mm(one).logits, rtol=1e-4, atol=1e-5)
    save_converted(moe, tmp_path / "moe", metadata={"model": "tiny", "budget": 0.5})
    reloaded, _, meta = load_converted(tmp_path / "moe", layout="shared", load_tokenizer=False)
    auto = AutoModelForCausalLM.from_pretrained(tmp_path / "moe")
    for loaded in (reloaded, auto):  # a reload starts from the default attention implementation
        loaded.model.config._attn_implementation = attn_impl
    moe.set_layout("shared")
    with torch.no_grad():
        ref = moe(input_ids=ids).logits
        assert torch.equal(reloaded(input_ids=ids).logits, ref)
        auto.set_layout("shared")
        assert torch.equal(auto(input_ids=ids).logits, ref)
    assert json.loads((tmp_path / "moe" / "config.json").read_text())["attention_layers"][0]["kept_dims"] == 4
    assert len(meta["weights_sha256"]) == 64


@pytest.mark.parametrize("family", ATTENTION_FAMILIES)
def test_generation_with_kv_cache(family):
    mm, masks = build(family, seed=2)
    moe = materialise(mm, masks)
    prompt = tiny_ids(batch=1, length=6, seed=3)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(prompt))
    with torch.no_grad():
        cached = moe.generate(input_ids=prompt, use_cache=True, **kwargs)
        uncached = moe.generate(input_ids=prompt, use_cache=False, **kwargs)
        mm.set_masks(masks)
        masked = mm.model.generate(input_ids=prompt, use_cache=False, **kwargs)
    assert cached.shape == (1, 14)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, masked)


@pytest.mark.parametrize("family", sorted(set(FAMILIES) - set(ATTENTION_FAMILIES)))
def test_unsupported_families_are_refused_by_name(family):
    with pytest.raises(ValueError, match=rf"does not support model family '{family}'.*MLP-only"):
        MaskedModel(tiny_model(family), num_experts=E, prune_attention=True)


def test_prune_attention_off_changes_nothing():
    a = MaskedModel(tiny_model("llama"), num_experts=E)
    b = MaskedModel(tiny_model("llama"), num_experts=E, prune_attention=False)
    assert a.attention is None and a.trainable_state().keys() == b.trainable_state().keys()
    assert "attention_pruning" not in account(a).as_dict()


def test_budget_counts_attention_and_materialised_model_executes_it():
    mm = MaskedModel(tiny_model("llama"), num_experts=E, prune_attention=True)
    with torch.no_grad():  # distinct logits so the budget can be met finely
        for dec in mm.hypernet.decoders:
            dec[2].weight.normal_(0, 1.0)
    masks, info = finalize_masks(mm, 0.5)
    assert len(masks) == 6 and abs(info["ratio"] - 0.5) <= 0.02
    mm.set_masks(masks)
    masked_report = account(mm)
    assert masked_report.attention_pruning["executed"] is False
    assert masked_report.attention_pruning["vo"]["saved_masked_only"] > 0
    assert masked_report.executed_active_ratio > info["ratio"]  # masks alone execute no attention saving
    assert abs(masked_report.attention_pruning["masked_active_ratio"] - info["ratio"]) < 1e-6
    report = account(materialise(mm, masks, 0.5))
    pruning = report.attention_pruning
    assert pruning["executed"] and pruning["vo"]["saved_masked_only"] == 0 and pruning["qk"]["saved_executed"] > 0
    assert abs(report.executed_active_ratio - info["ratio"]) < 1e-6
    assert abs(report.executed_active_ratio - 0.5) <= 0.02
    assert report.attention < account(tiny_model("llama")).attention
    dense = account(tiny_model("llama"))
    assert report.dense_total - report.other == dense.dense_total - dense.other  # other: + attention routers


def test_prune_attention_with_budget_range_is_refused():
    with pytest.raises(ValueError, match="budget range"):
        ConversionConfig(prune_attention=True, budget_range=(0.3, 1.0))


def test_conversion_with_attention_pruning_end_to_end(tiny_setup):  # noqa: F811
    dense, text, tmp = tiny_setup
    cfg = ConversionConfig(model=str(dense), text=str(text), steps=3, tokens_per_step=128, seq_len=64,
                           init_tokens=512, budget=0.5, num_experts=E, checkpoint_every=2, prune_attention=True)
    out = run_conversion(cfg, tmp / "conv", show_tqdm=False, log=lambda *a: None, command="test")
    meta = json.loads((out / "tomoe.json").read_text())
    assert meta["settings"]["prune_attention"] and len(meta["attention_layers"]) == 2
    assert len(meta["layers"]) == 2
    log = [json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines()]
    assert len(log) == 3 and all(row["load_balance"] > 0 for row in log)
    model, _tok, _meta = load_converted(out)
    assert all(isinstance(a, PrunedAttention) for a in model.pruned_attention) and model.pruned_attention
    report = account(model)
    assert abs(report.executed_active_ratio - 0.5) <= 0.02
    assert report.as_dict()["attention_pruning"]["executed"]
    ids = tiny_ids()
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()
