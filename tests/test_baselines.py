"""Static structured-pruning baselines: FLAP's bias folding keeps the expected output, the
torch-pruning reference prunes exactly the MLP channels of a copy, every method (static and per-token)
hits its budget. The per-token baselines have their own tests in test_dynamic_baselines.py."""
import pytest
import torch

from tomoe_core import MaskedModel
from tomoe_core.eval.baselines import (ALL_METHODS, FoldedBias, activation_stats, baseline_variants, channel_scores,
    min_budget, static_masks, torch_pruning_copy)
from tiny_models import tiny_ids, tiny_model


def mean_first_mlp_output(masked, calib) -> torch.Tensor:
    outputs = []
    hook = masked.mlps[0].register_forward_hook(lambda mod, args, out: outputs.append(out.reshape(-1, out.shape[-1])))
    try:
        with torch.no_grad():
            for row in calib:
                masked.model(row.unsqueeze(0))
    finally:
        hook.remove()
    return torch.cat(outputs).double().mean(0)


def test_flap_bias_keeps_the_first_layers_mean_output():
    masked = MaskedModel(tiny_model("llama"), num_experts=1)
    calib = tiny_ids(batch=4, length=32, seed=1)
    stats = activation_stats(masked, calib)
    masks = static_masks(channel_scores(masked, "flap", stats), 0.5)
    with masked.dense():
        dense = mean_first_mlp_output(masked, calib)
    masked.set_masks(masks)
    unfolded = mean_first_mlp_output(masked, calib)
    with FoldedBias(masked, masks, stats):
        flap = mean_first_mlp_output(masked, calib)
    assert not masked.mlps[0]._forward_hooks  # FoldedBias leaves no hook behind
    torch.testing.assert_close(flap, dense, atol=1e-6, rtol=1e-4)
    assert (unfolded - dense).abs().max() > 100 * (flap - dense).abs().max()  # the fold is what does it


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi"])
def test_torch_pruning_prunes_only_mlp_channels_of_a_copy(family):
    pytest.importorskip("torch_pruning")
    masked = MaskedModel(tiny_model(family), num_experts=1)
    ids = tiny_ids(batch=1, length=16)
    with torch.no_grad():
        before = masked.model(input_ids=ids).logits
    pruned, ratio = torch_pruning_copy(masked, 0.5, ids)
    assert ratio == pytest.approx(0.5, abs=0.03)
    adapter = masked.adapter
    for dense_layer, layer in zip(adapter.layers(masked.model), adapter.layers(pruned)):
        dense_w = adapter.mlp_weights(adapter.mlp(dense_layer).dense_mlp)
        w = adapter.mlp_weights(adapter.mlp(layer))
        assert w.intermediate_size == dense_w.intermediate_size // 2
        assert w.hidden_size == dense_w.hidden_size
        assert adapter.attention_params(layer) == adapter.attention_params(dense_layer)
    with torch.no_grad():
        torch.testing.assert_close(masked.model(input_ids=ids).logits, before)  # the original is untouched
        assert torch.isfinite(pruned(input_ids=ids).logits).all()


def test_torch_pruning_refuses_fused_mlps():
    pytest.importorskip("torch_pruning")
    masked = MaskedModel(tiny_model("phi3"), num_experts=1)
    with pytest.raises(ValueError, match="fused"):
        torch_pruning_copy(masked, 0.5, tiny_ids(batch=1))


@pytest.mark.parametrize("budget", [0.3, 0.7])
def test_every_baseline_hits_its_budget(budget):
    pytest.importorskip("torch_pruning")
    masked = MaskedModel(tiny_model("llama"), num_experts=1)
    calib = tiny_ids(batch=2, length=32, seed=2)
    stats = activation_stats(masked, calib)
    reachable = [m for m in ALL_METHODS if min_budget(masked, m) < budget]  # not CATS at 0.3: its gate is 1/3
    assert len(reachable) == len(ALL_METHODS) - (budget < 1 / 3)
    variants = baseline_variants(masked, reachable, budget, stats, tiny_ids(batch=1), calibration_ids=calib)
    assert set(variants) == set(reachable)
    ids = tiny_ids(batch=1, length=16)
    with torch.no_grad():
        for name, (fn, ratio) in variants.items():
            assert ratio == pytest.approx(budget, abs=0.03), name
            assert torch.isfinite(fn(ids)).all(), name
    with pytest.raises(ValueError, match="unknown baseline"):
        baseline_variants(masked, ["random"], budget, stats)


@pytest.mark.parametrize("method", ["wanda-sp", "flap", "magnitude"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
@torch.no_grad()
def test_sliced_static_baseline_computes_the_masked_model(method, family):
    """The physically smaller MLPs the speed benchmark times give the masked model's logits."""
    from tiny_models import tiny_ids, tiny_model
    from tomoe_core.convert.masked_model import MaskedModel
    from tomoe_core.eval.baselines import activation_stats, baseline_variants, sliced_mlps

    masked = MaskedModel(tiny_model(family), num_experts=1)
    calib = tiny_ids(2, 16, seed=5)
    stats = activation_stats(masked, calib)
    ids = tiny_ids(2, 12, seed=6)
    fn, _ratio = baseline_variants(masked, [method], 0.5, stats)[method]
    expected = fn(ids)
    mlps = sliced_mlps(masked, method, 0.5, stats)
    assert all(m.down.in_features == round(0.5 * masked.intermediate_sizes[0]) for m in mlps)
    from tomoe_core.eval.baselines import dense_copy
    host = dense_copy(masked)
    adapter = masked.adapter
    for layer, mlp in zip(adapter.layers(host), mlps):
        adapter.set_mlp(layer, mlp)
    torch.testing.assert_close(host(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)
