"""Static structured-pruning baselines at the same active MLP budget.

Each keeps the same fraction p of every layer's MLP channels (one static mask per layer,
run through `MaskedModel` with one expert), chosen by a channel score:
  * magnitude: L2 norm of the channel's weights (gate row, up row, down column);
  * wanda-sp:  ||down column|| x RMS of the channel's activation over calibration text;
  * flap:      FLAP (An et al., AAAI 2024) with uniform per-layer width: fluctuation score
               ||down column||^2 x variance of the channel's activation over calibration
               text; the removed channels' mean contribution W_down[:, removed] @ mean(h_removed)
               is folded into the layer's output bias so its expected output is kept.
An external reference, run on a pruned copy of the dense model rather than through masks:
  * torch-pruning: the `torch-pruning` package (DepGraph), group-magnitude (L2) importance,
               MLP channels only (attention, the down projection and the embeddings are
               ignored layers, so only gate/up rows and the matching down columns go), the same
               fraction p kept in every layer. Gated and plain MLPs (not fused gate_up).
No baseline is fine-tuned after pruning.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

from .masked import MaskedModel
from .routing import mlp_intermediate

METHODS = ("magnitude", "wanda-sp", "flap")  # static masks through MaskedModel
EXTERNAL_METHODS = ("torch-pruning",)  # a pruned copy of the dense model
ALL_METHODS = METHODS + EXTERNAL_METHODS


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


# -- torch-pruning (external reference) ----------------------------------------------------------------
def dense_copy(masked: MaskedModel) -> nn.Module:
    """A deep copy of the dense model without the masked wrappers."""
    model = copy.deepcopy(masked.model)
    for layer in masked.adapter.layers(model):
        masked.adapter.set_mlp(layer, masked.adapter.mlp(layer).dense_mlp)
    return model


def torch_pruning_copy(masked: MaskedModel, budget: float, example_ids: torch.Tensor) -> tuple[nn.Module, float]:
    """Prune MLP channels of a dense copy with `torch-pruning`, keeping fraction `budget` per layer.

    Returns (pruned model, its active MLP ratio). example_ids: (1, T) ids for tracing.
    """
    try:
        import torch_pruning as tp
    except ImportError:
        raise ValueError("the torch-pruning baseline needs the package: pip install torch-pruning==1.6.1") from None
    adapter = masked.adapter
    if adapter.mlp_kind not in ("gated", "plain"):
        raise ValueError(f"the torch-pruning baseline supports separate gate/up projections; "
                         f"{adapter.model_type} has a {adapter.mlp_kind} MLP")
    model = dense_copy(masked)
    layers = adapter.layers(model)
    before = [getattr(adapter.mlp(layer), adapter.proj[-1]).weight.shape[1] for layer in layers]
    ignored = [model.get_input_embeddings(), model.get_output_embeddings()]
    for layer in layers:
        ignored += [adapter.attention(layer), getattr(adapter.mlp(layer), adapter.proj[-1])]
    model.requires_grad_(True)  # tracing follows autograd
    try:
        import warnings

        with warnings.catch_warnings(), torch.enable_grad():
            warnings.simplefilter("ignore")  # norm weights are 'unwrapped parameters'; hidden size is never pruned
            pruner = tp.pruner.MetaPruner(model, example_inputs={"input_ids": example_ids.to(next(model.parameters()).device)},
                                          importance=tp.importance.GroupMagnitudeImportance(p=2),
                                          pruning_ratio=1.0 - budget, ignored_layers=ignored, global_pruning=False,
                                          output_transform=lambda out: out.logits.sum())
            for group in pruner.step(interactive=True):
                group.prune()
    finally:
        model.requires_grad_(False)
    after = [getattr(adapter.mlp(layer), adapter.proj[-1]).weight.shape[1] for layer in layers]
    hidden = model.get_input_embeddings().weight.shape[1]
    assert hidden == masked.model.get_input_embeddings().weight.shape[1], "torch-pruning changed the hidden size"
    return model.eval(), sum(after) / sum(before)


# -- every baseline as ids -> logits ---------------------------------------------------------------------
LogitsFn = Callable[[torch.Tensor], torch.Tensor]


def baseline_variants(masked: MaskedModel, methods, budget: float, stats: list[dict] | None,
                      example_ids: torch.Tensor | None = None) -> dict[str, tuple[LogitsFn, float]]:
    """name -> (ids -> logits, active MLP ratio) for each baseline at `budget`.

    Static methods share `masked` (they set its masks on every call); torch-pruning gets its
    own pruned copy. `stats` from `activation_stats` (needed by wanda-sp and flap).
    """
    out = {}
    for method in methods:
        if method in EXTERNAL_METHODS:
            pruned, ratio = torch_pruning_copy(masked, budget, example_ids)
            out[method] = (lambda ids, pruned=pruned: pruned(input_ids=ids).logits), ratio
            continue
        if method not in METHODS:
            raise ValueError(f"unknown baseline {method!r}; choose from {', '.join(ALL_METHODS)}")
        if method in ("wanda-sp", "flap") and stats is None:
            raise ValueError(f"baseline {method} needs calibration activation statistics")
        masks = static_masks(channel_scores(masked, method, stats), budget)
        ratio = float(masked.ratio_of(masks))
        folded = FoldedBias(masked, masks, stats) if method == "flap" else None

        def run(ids, masks=masks, folded=folded):
            masked.set_masks(masks)
            if folded is None:
                return masked.model(input_ids=ids).logits
            with folded:
                return masked.model(input_ids=ids).logits
        out[method] = run, ratio
    return out
