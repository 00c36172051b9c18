"""benchmarks.expert_ceiling: the probes' pieces on tiny models of a gated and a plain family."""
import pytest
import torch
import torch.nn.functional as F

from benchmarks.expert_ceiling import (CodebookMLP, PredictedMLP, fit_codebook, fit_predictor, installed,
                                       mlp_inputs, predictor_overhead, spherical_kmeans)
from tests.tiny_models import tiny_ids, tiny_model
from tomoe_core.convert.masked_model import MaskedModel


def test_spherical_kmeans_finds_separated_directions():
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(4)[:3]  # three orthogonal directions
    v = F.normalize(centres.repeat_interleave(50, 0) + 0.05 * torch.randn(150, 4, generator=g), dim=1)
    found = spherical_kmeans(v, 3, generator=g)
    assign = (v @ found.T).argmax(1).view(3, 50)
    assert all(len(set(row.tolist())) == 1 for row in assign)  # each true group lands in one cluster
    assert len({int(row[0]) for row in assign}) == 3


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_full_budget_probes_are_dense_and_smaller_ones_are_not(family):
    model = tiny_model(family)
    masked = MaskedModel(model, num_experts=1)
    ids = tiny_ids(batch=4, length=32)
    xs = mlp_inputs(model, masked.adapter, ids)
    assert xs[0].shape == (4 * 32, masked.mlps[0].weights.hidden_size)
    with torch.no_grad():
        dense = model(input_ids=ids).logits
    layers, diag = fit_codebook(masked, xs, 1.0, 2, steps=5, seed=0, log=lambda *_: None)
    for route in ("oracle", "router"):
        with installed(model, masked.adapter, [CodebookMLP(w, m, r, route) for w, m, r in layers]), torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids).logits, dense)
    assert all(d["mass_oracle_route"] == pytest.approx(1.0) for d in diag)
    preds, _ = fit_predictor(masked, xs, rank=4, steps=5, seed=0, log=lambda *_: None)
    with installed(model, masked.adapter, [PredictedMLP(w, p, 1.0) for w, p in preds]), torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, dense)
    with installed(model, masked.adapter, [PredictedMLP(w, p, 0.25) for w, p in preds]), torch.no_grad():
        assert not torch.allclose(model(input_ids=ids).logits, dense)
    layers, _ = fit_codebook(masked, xs, 0.5, 4, steps=5, seed=0, log=lambda *_: None)
    assert all(int(m.sum(1).min()) == int(m.sum(1).max()) == round(0.5 * m.shape[1]) for _, m, _ in layers)
    # the module restored the model's own MLPs
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, dense)
    w = masked.mlps[0].weights
    assert predictor_overhead(w, 4) == pytest.approx(
        (w.hidden_size * 4 + 4 * w.intermediate_size + w.intermediate_size)
        / ((3 if w.gated else 2) * w.hidden_size * w.intermediate_size))
