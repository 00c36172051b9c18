"""Per-token, training-free baselines (oracle top-k, TEAL-style, CATS-style) on tiny models of every family:
dense at budget 1, the budget met on calibration text, honest per-token counts, the model left as it was."""
import json

import pytest
import torch
import torch.nn.functional as F

from tomoe_core import MaskedModel
from tomoe_core.cli import main
from tomoe_core.convert.dense import load_tokenizer
from tomoe_core.moe.families import adapter_for
from tomoe_core.eval.baselines import (DYNAMIC_METHODS, DynamicMLP, DynamicSparsity, activation_stats,
    baseline_variants, budget_of_oracle, min_budget)
from tiny_models import FAMILIES, tiny_ids, tiny_model


def kl_to(dense_logits: torch.Tensor, logits: torch.Tensor) -> float:
    logp_dense, logp = F.log_softmax(dense_logits.double(), -1), F.log_softmax(logits.double(), -1)
    return float((logp_dense.exp() * (logp_dense - logp)).sum(-1).mean())


def mlp_signature(model) -> list:
    """Which module each layer's MLP is and its weights' storage: what 'unchanged' means."""
    adapter = adapter_for(model)
    return [(id(adapter.mlp(layer)), tuple(p.data_ptr() for p in adapter.mlp(layer).parameters()))
            for layer in adapter.layers(model)]


@pytest.mark.parametrize("family", FAMILIES)
def test_budget_one_reproduces_dense_logits_and_leaves_the_model_unchanged(family):
    masked = MaskedModel(tiny_model(family), num_experts=1)
    ids, calib = tiny_ids(batch=1, length=24, seed=3), tiny_ids(batch=3, length=24, seed=1)
    before = mlp_signature(masked.model)
    with torch.no_grad():
        dense = masked.model(input_ids=ids).logits
        variants = baseline_variants(masked, DYNAMIC_METHODS, 1.0, None, calibration_ids=calib)
        for name, (fn, ratio) in variants.items():
            assert ratio == pytest.approx(1.0), name
            torch.testing.assert_close(fn(ids), dense, msg=f"{family} {name}")
            assert fn.active_ratio == pytest.approx(1.0), name
        assert mlp_signature(masked.model) == before
        torch.testing.assert_close(masked.model(input_ids=ids).logits, dense, rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("budget", [0.6, 0.8])
def test_kept_fraction_on_calibration_text_gives_the_budget(family, budget):
    masked = MaskedModel(tiny_model(family), num_experts=1)
    calib = tiny_ids(batch=4, length=32, seed=1)
    held = tiny_ids(batch=1, length=32, seed=5)
    with torch.no_grad():
        dense = masked.model(input_ids=held).logits
        for name, (fn, ratio) in baseline_variants(masked, DYNAMIC_METHODS, budget, None,
                                                   calibration_ids=calib).items():
            expected = budget_of_oracle(masked, budget) if name == "oracle" else budget
            assert ratio == pytest.approx(expected, abs=2e-3), name  # calibration pass, measured
            if name == "teal-half-dense":  # evaluated: the first half of each sequence dense
                expected = 0.5 + budget / 2
            fn.reset_counts()
            for row in calib:  # the same text again, one sequence at a time: the same kept fraction
                fn(row.unsqueeze(0))
            assert fn.active_ratio == pytest.approx(expected, abs=2e-3), name
            fn.reset_counts()
            out = fn(held)
            assert 0 < kl_to(dense, out), name  # something was removed
            assert abs(fn.active_ratio - expected) < 0.15, name  # unseen text: near the budget, not on it


def test_per_token_counts_are_the_weights_each_token_uses():
    """One layer by hand: TEAL counts I weights per kept input entry per input projection plus D per kept
    h entry; CATS counts the whole gate plus (up row + down column) per kept channel."""
    masked = MaskedModel(tiny_model("llama"), num_experts=1)
    w = masked.mlps[0].weights
    D, I = w.hidden_size, w.intermediate_size
    x = torch.randn(1, 5, D)
    teal = DynamicMLP("teal", w, 0.5, masked.channel_costs[0])
    teal.thresholds = {"x": 0.7, "h": 0.01}
    with torch.no_grad():
        teal(x)
        h = (F.silu(F.linear(x * (x.abs() > 0.7), w.gate)) * F.linear(x * (x.abs() > 0.7), w.up))
    expected = (x.abs() > 0.7).sum() * 2 * I + (h.abs() > 0.01).sum() * D
    assert teal.tokens == 5 and teal.active == pytest.approx(float(expected))
    cats = DynamicMLP("cats", w, 0.5, masked.channel_costs[0])
    cats.thresholds = {"act": 0.05}
    with torch.no_grad():
        cats(x)
        kept = (F.silu(F.linear(x, w.gate)).abs() > 0.05).sum()
    assert cats.active == pytest.approx(float(5 * D * I + kept * 2 * D))


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "phi", "gpt2"])
def test_oracle_beats_teal_at_the_same_budget(family):
    model = tiny_model(family)
    masked = MaskedModel(model, num_experts=1)
    with torch.no_grad():  # make the MLPs matter to the logits, so KL differences are far above rounding
        for m in masked.mlps:
            m.weights.down.mul_(8.0)
    calib, held = tiny_ids(batch=4, length=32, seed=1), tiny_ids(batch=2, length=32, seed=7)
    with torch.no_grad():
        dense = torch.cat([masked.model(input_ids=row[None]).logits for row in held])
        variants = baseline_variants(masked, ("oracle", "teal"), 0.5, None, calibration_ids=calib)
        kl = {name: kl_to(dense, torch.cat([fn(row[None]) for row in held])) for name, (fn, _r) in variants.items()}
    assert kl["oracle"] < 0.8 * kl["teal"], kl


def test_cats_refuses_a_budget_below_its_gate_and_teal_needs_calibration():
    masked = MaskedModel(tiny_model("llama"), num_experts=1)
    assert min_budget(masked, "cats") == pytest.approx(1 / 3)
    assert min_budget(masked, "teal") == 0.0
    with pytest.raises(ValueError, match="cannot reach"):
        DynamicSparsity(masked, "cats", 0.3)
    with pytest.raises(ValueError, match="calibration"):
        baseline_variants(masked, ["teal"], 0.5, None)
    plain = MaskedModel(tiny_model("phi"), num_experts=1)
    assert 0.5 < min_budget(plain, "cats") < 0.52  # act(fc1 x) with its bias is about half a plain MLP


def test_thresholds_default_to_the_text_the_activation_statistics_came_from():
    """`python -m tomoe_core evaluate` passes only `stats`: the thresholds are set on their calibration text."""
    masked = MaskedModel(tiny_model("qwen2"), num_experts=1)
    calib = tiny_ids(batch=3, length=32, seed=4)
    stats = activation_stats(masked, calib)
    with torch.no_grad():
        (from_stats, ratio), = baseline_variants(masked, ["teal"], 0.6, stats).values()
        (explicit, _), = baseline_variants(masked, ["teal"], 0.6, None, calibration_ids=calib).values()
    assert ratio == pytest.approx(0.6, abs=2e-3)
    assert [m.thresholds for m in from_stats.mlps] == [m.thresholds for m in explicit.mlps]


def test_evaluate_command_runs_the_per_token_baselines(tmp_path, monkeypatch):
    monkeypatch.setenv("TOMOE_CACHE", str(tmp_path / "cache"))
    dense = tmp_path / "dense"
    tiny_model("llama", vocab_size=49152).save_pretrained(dense)
    load_tokenizer().save_pretrained(dense)
    words = "the river city museum painted seven old bridges near a quiet harbour while students argued".split()
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(" ".join(words[(i * 5 + j * 3) % len(words)] for j in range(150)) + "."
                                  for i in range(30)))
    out = tmp_path / "eval.json"
    assert main(["evaluate", "--model", str(dense), "--text", str(text), "--window", "64", "--max-windows", "2",
                 "--budget", "0.6", "--baselines", "oracle,teal,cats", "--output", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"dense", "oracle", "teal", "cats"}
    assert all(results[m]["kl_to_dense"] > 0 for m in ("oracle", "teal", "cats"))


@torch.no_grad()
def test_teal_half_dense_runs_the_first_half_of_each_window_dense():
    """TEAL's own protocol: the first half of every sequence dense, the rest TEAL-style."""
    from tomoe_core.eval.baselines import DynamicSparsity

    masked = MaskedModel(tiny_model("llama"), num_experts=1)
    calib = tiny_ids(2, 16, seed=1)
    ids = tiny_ids(2, 16, seed=2)
    dense = masked.model(input_ids=ids).logits
    half = DynamicSparsity(masked, "teal-half-dense", 0.5)
    full = DynamicSparsity(masked, "teal", 0.5)
    half.calibrate(calib)
    full.calibrate(calib)
    with half.installed():
        h = masked.model(input_ids=ids).logits
    with full.installed():
        f = masked.model(input_ids=ids).logits
    torch.testing.assert_close(h[:, :8], dense[:, :8])  # causal: the dense half sees only dense positions
    assert not torch.allclose(h[:, 8:], dense[:, 8:]) and not torch.allclose(f[:, :8], dense[:, :8])
    assert [m.thresholds for m in half.mlps] == [m.thresholds for m in full.mlps]  # the same calibration
