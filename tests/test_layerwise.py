"""Layer-wise fitting (`convert --init layerwise`): the layer runner, the greedy ranks, the fitted priors."""
import pytest
import torch

from tests.tiny_models import FAMILIES, VOCAB, tiny_ids, tiny_model
from tomoe_core.convert.config import ConversionConfig
from tomoe_core.convert.layerwise import LayerRunner, greedy_channel_rank, layerwise_init
from tomoe_core.convert.masked_model import MaskedModel
from tomoe_core.convert.train import train_conversion


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_runner_reproduces_the_model_window_after_window(family):
    """Running the decoder layers one at a time from the embeddings gives the model's own hidden
    states, for a second window too (no keys or values kept between calls)."""
    masked = MaskedModel(tiny_model(family), num_experts=2)
    ids = tiny_ids(batch=2, length=16)
    runner = LayerRunner(masked, ids[0])
    for row in ids:
        hidden = runner.embed(row)
        for l in range(len(runner.layers)):
            hidden = runner.run(l, hidden)
        kept = []
        handle = runner.layers[-1].register_forward_hook(
            lambda mod, args, out: kept.append(out[0] if isinstance(out, tuple) else out))
        try:
            with torch.no_grad():
                masked.model(row.unsqueeze(0))
        finally:
            handle.remove()
        torch.testing.assert_close(hidden, kept[0], rtol=1e-5, atol=1e-5)


def test_greedy_rank_removes_cancelling_channels_together():
    """Channels 0 and 1 partly cancel (their contributions point opposite ways on these tokens): once
    0 is dropped, dropping 1 as well adds nothing (error 0.5 for both), so greedy removal keeps the
    lone channel 2 longest, where ranking by the diagonal (each channel's own contribution) would
    keep channel 1 and drop 0 and 2 (error 1.3)."""
    q = torch.tensor([[0.5, -0.5, 0.0], [-0.5, 1.0, 0.0], [0.0, 0.0, 0.8]])
    rank = greedy_channel_rank(q)
    assert rank.argmin() == 2 and q.diagonal().argmax() == 1
    assert sorted(rank.tolist()) == pytest.approx([0, 1 / 3, 2 / 3])


def test_greedy_rank_halves_the_error_of_the_diagonal_on_correlated_channels():
    """Channels that fire together (activations of rank 3 plus noise, as MLP channels do) interact:
    dropping half of them by greedy removal leaves half the reconstruction error of dropping the half
    with the smallest own contributions; the quadratic form is the error computed directly."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(400, 3, generator=g) @ torch.randn(3, 24, generator=g) + 0.1 * torch.randn(400, 24, generator=g)
    down = torch.randn(8, 24, generator=g)
    q = (h.T @ h) * (down.T @ down)
    dropped_greedy = (greedy_channel_rank(q) >= 0.5).float()
    dropped_diag = torch.zeros(24)
    dropped_diag[q.diagonal().argsort()[:12]] = 1
    error = lambda dropped: float(((h * dropped) @ down.T).pow(2).sum())  # noqa: E731
    assert error(dropped_greedy) == pytest.approx(float(dropped_greedy @ q @ dropped_greedy), rel=1e-4)
    assert error(dropped_greedy) < 0.6 * error(dropped_diag)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("conditioned", [False, True])
def test_layerwise_init_sets_routers_priors_and_ranks(family, conditioned):
    masked = MaskedModel(tiny_model(family), num_experts=3, budget_range=(0.3, 1.0) if conditioned else None)
    before = [m.router.weight.clone() for m in masked.mlps]
    report = layerwise_init(masked, tiny_ids(batch=6, length=16), budget=0.5, prior_scale=1.0, router_steps=20)
    assert len(report["layers"]) == len(masked.mlps)
    size = masked.intermediate_sizes[0]
    for l, m in enumerate(masked.mlps):
        assert not torch.equal(m.router.weight, before[l])
        base = masked.mask_bases[l]
        assert set(base.unique().tolist()) == {-1.0, 1.0}
        assert (base > 0).sum(1).tolist() == [size // 2] * 3  # ranks 0, 1/I, ... below 0.5
        assert 0 <= report["layers"][l]["oracle_relative_error"] <= report["layers"][l]["relative_error"]
        if conditioned:
            ranks = masked.mask_ranks[l]
            assert torch.equal(ranks.sort(1).values, (torch.arange(size) / size).expand(3, -1))
            torch.testing.assert_close(masked.mask_base(l, 0.5), base)
            assert int((masked.mask_base(l, 0.75) > 0).sum()) == 3 * (3 * size // 4)  # nested: wider at 0.75
    assert all(m.expert_masks is None for m in masked.mlps)  # the model is left dense


def test_convert_with_layerwise_init_trains_and_records_the_fit(tmp_path):
    stream = torch.randint(3, VOCAB, (3000,), generator=torch.Generator().manual_seed(1))
    cfg = ConversionConfig(budget=0.5, num_experts=4, steps=2, tokens_per_step=64, seq_len=32, model="tiny",
                           init="layerwise", init_tokens=256)
    masked = MaskedModel(tiny_model("llama"), num_experts=4)
    summary = train_conversion(masked, stream, cfg, tmp_path / "w", show_tqdm=False)
    assert summary["finished"] and summary["init"]["method"] == "layerwise"
    assert len(summary["init"]["layers"]) == 2 and summary["init"]["tokens"] == 256
    assert set(masked.mask_base(0).unique().tolist()) == {-1.0, 1.0}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_layer_error_probe_orders_the_structures(family):
    """benchmarks.layer_error: at p = 1 nothing is lost; at p = 0.5 something is, and the best expert
    per token is no worse than the router's."""
    from benchmarks.layer_error import layer_data, measure_layer

    masked = MaskedModel(tiny_model(family), num_experts=1)
    fit = layer_data(masked, tiny_ids(batch=6, length=16, seed=1), [1])[1]
    held = layer_data(masked, tiny_ids(batch=2, length=16, seed=2), [1])[1]
    assert fit[0].shape == (96, 32) and float(fit[1][0]) == 0.0 and bool((fit[1][1:16] > 0).all())
    full = measure_layer(masked.mlps[1], fit, held, 1.0, [2], rounds=1, steps=5, seed=0)
    assert full["channel_oracle"] == 0 and full["E2"]["routed"] == 0
    half = measure_layer(masked.mlps[1], fit, held, 0.5, [1, 4], rounds=1, steps=5, seed=0)
    assert 0 < half["E4"]["best_expert"] <= half["E4"]["routed"]
    assert 0 < half["channel_oracle"] < 1 and 0 < half["E1"]["routed"] == half["E1"]["best_expert"]


def test_shared_plus_groups_probe_fills_the_budget_with_whole_groups():
    from benchmarks.layer_error import densest_groups, layer_data, measure_groups

    chosen = densest_groups(torch.tensor([[0.1, 0.9, 0.5]]), torch.tensor([2.0, 3.0, 2.0]), room=5)
    assert chosen.tolist() == [[0.0, 1.0, 1.0]]  # densest first (3 + 2 channels), the third does not fit
    masked = MaskedModel(tiny_model("llama"), num_experts=1)
    fit = layer_data(masked, tiny_ids(batch=6, length=16, seed=1), [0])[0]
    held = layer_data(masked, tiny_ids(batch=2, length=16, seed=2), [0])[0]
    row = measure_groups(masked.mlps[0], fit, held, 0.5, shared=0.25, groups=6, seed=0)
    assert 0 < row["best_groups"] <= row["routed"] + 0.05 and row["active"] <= 0.5
    assert 0 < row["routed_after_shared"] < 1
