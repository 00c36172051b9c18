"""Static structured-pruning baselines at the same active MLP budget.

Each keeps the same fraction p of every layer's MLP channels (one static mask per layer,
run through `MaskedModel` with one expert), chosen by a channel score:
  * magnitude: L2 norm of the channel's weights (gate row, up row, down column);
  * wanda-sp:  ||down column|| x RMS of the channel's activation over calibration text;
  * flap:      FLAP-style fluctuation: ||down column||^2 x variance of the activation; the
               removed channels' mean contribution is folded into a per-layer output bias
               so the layer's expected output is kept.
"""
from __future__ import annotations

import torch

from .masked import MaskedModel
from .routing import mlp_intermediate

METHODS = ("magnitude", "wanda-sp", "flap")


@torch.no_grad()
def activation_stats(masked: MaskedModel, calibration_ids: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """Per layer: mean and mean square of every intermediate channel over calibration tokens."""
    sums = [None] * len(masked.mlps)
    count = [0]

    def hook(mod, args, l):
        h = mlp_intermediate(mod.weights, args[0]).reshape(-1, mod.weights.intermediate_size).double()
        s = (h.sum(0), (h * h).sum(0))
        sums[l] = s if sums[l] is None else (sums[l][0] + s[0], sums[l][1] + s[1])
        if l == 0:
            count[0] += h.shape[0]

    handles = [m.register_forward_pre_hook(lambda mod, args, l=l: hook(mod, args, l)) for l, m in enumerate(masked.mlps)]
    device = next(masked.model.parameters()).device
    try:
        with masked.dense():
            for row in calibration_ids:
                masked.model(row.unsqueeze(0).to(device))
    finally:
        for h in handles:
            h.remove()
    return [{"mean": (s / count[0]).float(), "sq": (q / count[0]).float()} for s, q in sums]


def channel_scores(masked: MaskedModel, method: str, stats: list[dict] | None) -> list[torch.Tensor]:
    if method not in METHODS:
        raise ValueError(f"unknown baseline {method!r}; choose from {', '.join(METHODS)}")
    scores = []
    for l, m in enumerate(masked.mlps):
        w = m.weights
        down_norm = w.down.float().norm(dim=0)  # (I,)
        if method == "magnitude":
            sq = w.up.float().pow(2).sum(1) + w.down.float().pow(2).sum(0)
            if w.gate is not None:
                sq = sq + w.gate.float().pow(2).sum(1)
            scores.append(sq.sqrt())
        elif method == "wanda-sp":
            scores.append(down_norm * stats[l]["sq"].sqrt())
        else:
            var = (stats[l]["sq"] - stats[l]["mean"] ** 2).clamp_min(0)
            scores.append(down_norm.pow(2) * var)
    return scores


def static_masks(scores: list[torch.Tensor], budget: float) -> list[torch.Tensor]:
    """Keep round(p * I) top-scoring channels per layer. -> L x (1, I)"""
    masks = []
    for s in scores:
        keep = max(1, round(budget * s.numel()))
        m = torch.zeros(1, s.numel(), device=s.device)
        m[0, s.topk(keep).indices] = 1.0
        masks.append(m)
    return masks


class FoldedBias:
    """Context manager adding FLAP's compensation bias to each masked MLP's output."""

    def __init__(self, masked: MaskedModel, masks: list[torch.Tensor], stats: list[dict]):
        self.handles, self.masked = [], masked
        self.biases = []
        for l, m in enumerate(masked.mlps):
            removed_mean = stats[l]["mean"] * (1 - masks[l][0])  # (I,)
            self.biases.append(m.weights.down.float() @ removed_mean)  # (D,)

    def __enter__(self):
        for l, m in enumerate(self.masked.mlps):
            b = self.biases[l]
            self.handles.append(m.register_forward_hook(lambda mod, args, out, b=b: out + b.to(out.dtype)))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []
        return False
