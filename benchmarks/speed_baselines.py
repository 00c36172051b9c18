"""The other ways of using p of the MLP weights, built for `benchmarks.speed` to time beside ToMoE:

  * wanda-sp, flap: static structured pruning as it is served, physically smaller dense MLPs
    (`tomoe_core.eval.baselines.sliced_mlps`: the channels the quality benchmark masks, FLAP's
    compensation folded into the down bias); fast at any batch;
  * teal: TEAL-style per-token input thresholding as TEAL deploys it: decode steps as gather-GEMVs
    over the kept entries (`benchmarks.teal_speed.TealGatherMLP`), the prompt pass dense (TEAL's
    official code sparsifies decode only, so its prefill speed is dense's).

All of them share one copy of the dense model (`host`) whose MLPs each variant installs before it
is timed (`install`), so a dozen variants cost one model's memory plus their MLPs.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from tomoe_core.convert.masked_model import MaskedModel
from tomoe_core.eval.baselines import DYNAMIC_CALIBRATION_TOKENS, DynamicSparsity, activation_stats, sliced_mlps
from tomoe_core.moe.families import adapter_for

BASELINES = ("teal", "wanda-sp", "flap")
PREFILL_MODE = {"teal": "dense prompt pass (TEAL sparsifies decode only)", "wanda-sp": "sliced", "flap": "sliced"}


class TealDeployedMLP(nn.Module):
    """TEAL as deployed: a call with more than one token per sequence (the prompt pass) runs the dense
    MLP; decode steps (one token per sequence) run the sparse gather kernel.  (B, T, D) -> (B, T, D)"""

    def __init__(self, sparse: nn.Module, dense: nn.Module):
        super().__init__()
        self.sparse, self.dense = sparse, dense

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(x) if x.dim() == 3 and x.shape[-2] > 1 else self.sparse(x)


def _install(host, mlps):
    adapter = adapter_for(host)

    def install():
        for layer, mlp in zip(adapter.layers(host), mlps):
            adapter.set_mlp(layer, mlp)
    return install


def baseline_variants(dense, budgets, methods, calibration_ids: torch.Tensor, log=print) -> list[dict]:
    """Variants (the dicts `benchmarks.speed.measure` times) of every method at every budget."""
    from benchmarks.teal_speed import TealGatherMLP

    if not methods:
        return []
    masked = MaskedModel(copy.deepcopy(dense).float(), num_experts=1)
    stats = activation_stats(masked, calibration_ids)
    host = copy.deepcopy(dense)
    adapter = adapter_for(host)
    dense_mlps = [adapter.mlp(layer) for layer in adapter.layers(host)]
    dtype, device = next(dense.parameters()).dtype, next(dense.parameters()).device
    out = []
    for budget in budgets:
        for method in methods:
            if method == "teal":
                if masked.mlps[0].weights.gate is None:
                    log("[speed] teal: the gather kernel covers gated MLPs only; skipped for this model")
                    continue
                sparsity = DynamicSparsity(masked, "teal", budget)
                seq = calibration_ids.shape[1]
                active = float(sparsity.calibrate(calibration_ids[:max(1, DYNAMIC_CALIBRATION_TOKENS // seq)]))
                mlps = [TealDeployedMLP(TealGatherMLP(m.weights, m.thresholds).to(device=device, dtype=dtype), d)
                        for m, d in zip(sparsity.mlps, dense_mlps)]
            else:
                mlps = [m.to(device=device, dtype=dtype) for m in sliced_mlps(masked, method, budget, stats)]
                active = budget
            log(f"[speed] budget {budget}: {method} built (active MLP fraction {active:.3f})")
            out.append({"name": f"p={budget:g} {method}", "budget": budget, "source": PREFILL_MODE[method],
                        "layout": None, "method": method, "model": host, "folder": None,
                        "install": _install(host, mlps), "active": active})
    return out
