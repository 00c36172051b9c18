"""Baselines at the same active MLP budget: static structured pruning and per-token sparsity.

Each static method keeps the same fraction p of every layer's MLP channels (one static mask per layer,
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
Per-token, training-free (a different channel set for every token; see DynamicSparsity below):
  * oracle:    per token the p*I channels with the largest |h| x ||down column|| (a ceiling);
  * teal:      TEAL-style magnitude thresholding of each projection's input;
  * cats:      CATS-style thresholding of act(gate x).
No baseline is fine-tuned after pruning.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..convert.accounting import active_ratio
from ..convert.masked_model import MaskedModel
from ..moe.layer import mlp_intermediate

METHODS = ("magnitude", "wanda-sp", "flap")  # static masks through MaskedModel
EXTERNAL_METHODS = ("torch-pruning",)  # a pruned copy of the dense model


class ActivationStats(list):
    """Per layer {"mean", "sq"} of the intermediate channels, and the calibration ids (B, T) they come from:
    the per-token baselines calibrate their thresholds on the same text."""

    calibration_ids: torch.Tensor


@torch.no_grad()
def activation_stats(masked: MaskedModel, calibration_ids: torch.Tensor) -> ActivationStats:
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
    stats = ActivationStats({"mean": (s / count[0]).float(), "sq": (q / count[0]).float()} for s, q in sums)
    stats.calibration_ids = calibration_ids
    return stats


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


# -- per-token, training-free baselines ------------------------------------------------------------------
# Legend: N = tokens, D = hidden size, I = intermediate channels.
#   oracle: keep per token the round(p I) channels with the largest |h| x ||down column|| (h the down
#           projection's input); it needs every activation to choose, so it is a ceiling, not a method.
#   teal:   TEAL (Liu et al., arXiv 2408.14690), uniform per-layer sparsity: zero the entries of each
#           projection's input below a per-layer magnitude threshold (x for gate/up, h for down).
#   cats:   CATS (Lee et al., arXiv 2404.08763): compute act(gate x) for every channel, keep the channels
#           whose |act(gate x)| is above a per-layer threshold; up and down run only for those.
# Thresholds come from one pass over calibration text in which each layer, in order, sets its threshold
# from the activations it receives (upstream layers already sparsified), so the kept fraction on the
# calibration text is the target. Active weights are counted per token: the MLP weights (and biases)
# the token's kept entries need.
DYNAMIC_METHODS = ("oracle", "teal", "cats", "teal-half-dense")
# TEAL's own perplexity protocol (and its deployment: the prompt pass dense): the first half of every
# sequence runs dense, the rest TEAL-style, perplexity over all tokens
DENSE_PREFIX = {"teal-half-dense": 0.5}
# Thresholds are set in one batched pass; this many calibration tokens pin a layer's kept fraction
# far more finely than the text-to-text variation of the kept fraction on held-out windows.
DYNAMIC_CALIBRATION_TOKENS = 4096
ALL_METHODS = METHODS + DYNAMIC_METHODS + EXTERNAL_METHODS


def _input_projections(w) -> int:
    return 2 if w.gated else 1


def _bias_per_channel(w) -> int:
    return int(w.up_bias is not None) + int(w.gate_bias is not None)


def _first_projection_cost(w) -> int:
    """Weights per channel CATS always computes: act(gate x) (gated) or act(up x) (plain), with its bias."""
    bias = w.gate_bias if w.gated else w.up_bias
    return w.hidden_size + int(bias is not None)


def min_budget(masked: MaskedModel, method: str) -> float:
    """Smallest active MLP ratio a method can reach (CATS always computes its first projection)."""
    if method != "cats":
        return 0.0
    costs = masked.channel_costs
    fixed = [_first_projection_cost(m.weights) * m.weights.intermediate_size for m in masked.mlps]
    return sum(fixed) / sum(c * m.weights.intermediate_size for c, m in zip(costs, masked.mlps))


def budget_of_oracle(masked: MaskedModel, budget: float) -> float:
    """Active ratio of the oracle: round(p I) channels per token in every layer."""
    widths = [max(1, round(budget * m.weights.intermediate_size)) for m in masked.mlps]
    return float(active_ratio(widths, masked.channel_costs, masked.intermediate_sizes))


def _threshold(values: torch.Tensor, keep_fraction: float) -> float:
    """Magnitude threshold keeping about `keep_fraction` of `values` (kept: |v| > threshold)."""
    flat = values.detach().abs().reshape(-1).float()
    drop = int(round((1.0 - keep_fraction) * flat.numel()))
    if drop <= 0:
        return float("-inf")
    return float(flat.kthvalue(drop).values)


class DynamicMLP(nn.Module):
    """One layer's MLP under per-token sparsity; stands in for the layer's MLP while installed.

    `thresholds` is None until calibrated (oracle needs none); while `calibrating`, the first call
    sets them from its own input. `active` / `tokens` count the weights the call's tokens used.
    """

    def __init__(self, method: str, weights, budget: float, cost: int, dense_prefix: float = 0.0):
        super().__init__()
        self.method, self.weights, self.budget, self.cost = method, weights, budget, cost
        self.dense_prefix = dense_prefix  # this fraction of each sequence's first positions runs dense
        w = weights
        self.bias_per_channel = _bias_per_channel(w)
        if method == "teal":
            # kept fraction q of both inputs: q (C - B) + B = p C, C = cost per channel, B = its biases
            self.keep = (budget * cost - self.bias_per_channel) / (cost - self.bias_per_channel)
        elif method == "cats":
            fixed = _first_projection_cost(w)
            self.keep = (budget * cost - fixed) / (cost - fixed)
        else:
            self.keep = budget
        if not 0.0 < self.keep <= 1.0 + 1e-9:
            raise ValueError(f"the {method} baseline cannot reach an active MLP ratio of {budget:g} "
                             f"(kept fraction {self.keep:.3f}); choose a larger budget")
        self.keep = min(self.keep, 1.0)
        self.down_norm = w.down.float().norm(dim=0) if method == "oracle" else None  # (I,)
        self.thresholds: dict[str, float] | None = None
        self.calibrating = False
        self.active, self.tokens = 0.0, 0

    def _count(self, per_token_active: torch.Tensor) -> None:
        self.active += float(per_token_active.double().sum())
        self.tokens += per_token_active.numel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, T, D)
        w = self.weights
        D, I = w.hidden_size, w.intermediate_size
        if self.method == "oracle":
            h = mlp_intermediate(w, x)  # (B, T, I)
            k = max(1, round(self.keep * I))
            top = (h.abs().float() * self.down_norm).topk(k, dim=-1).indices
            h = h * torch.zeros_like(h).scatter_(-1, top, 1.0)
            self._count(torch.full(h.shape[:-1], float(k * self.cost)))
        elif self.method == "teal":
            if self.calibrating:
                self.thresholds = {"x": _threshold(x, self.keep)}
            kept_x = x.abs() > self.thresholds["x"]  # (B, T, D)
            cut = int(x.shape[-2] * self.dense_prefix) if self.dense_prefix and not self.calibrating and x.dim() == 3 else 0
            if cut:
                kept_x[:, :cut] = True
            h = mlp_intermediate(w, torch.where(kept_x, x, torch.zeros_like(x)))
            if self.calibrating:
                self.thresholds["h"] = _threshold(h, self.keep)
            kept_h = h.abs() > self.thresholds["h"]  # (B, T, I)
            if cut:
                kept_h[:, :cut] = True
            h = torch.where(kept_h, h, torch.zeros_like(h))
            # gate/up read I x (kept x) weights each, down D x (kept h); their biases are always computed
            self._count(kept_x.sum(-1) * _input_projections(w) * I + kept_h.sum(-1) * D + self.bias_per_channel * I)
        else:  # cats
            first = F.linear(x, w.gate, w.gate_bias) if w.gated else F.linear(x, w.up, w.up_bias)
            act = w.act(first)  # (B, T, I)
            if self.calibrating:
                self.thresholds = {"act": _threshold(act, self.keep)}
            kept = act.abs() > self.thresholds["act"]  # (B, T, I)
            h = act * F.linear(x, w.up, w.up_bias) if w.gated else act
            h = torch.where(kept, h, torch.zeros_like(h))
            self._count(kept.sum(-1) * (self.cost - _first_projection_cost(w)) + _first_projection_cost(w) * I)
        return F.linear(h, w.down, w.down_bias)


class DynamicSparsity:
    """A per-token baseline over a model's MLPs: ids -> logits, with the dense model restored after each call.

    Each call installs a `DynamicMLP` in place of every layer's MLP and puts the originals back in a
    `finally`, so the model is unchanged between calls. `active_ratio` is the measured ratio of MLP
    weights used per token over all calls since `reset_counts` (the same cost weighting as the budget).
    """

    def __init__(self, masked: MaskedModel, method: str, budget: float):
        if method not in DYNAMIC_METHODS:
            raise ValueError(f"unknown per-token baseline {method!r}; choose from {', '.join(DYNAMIC_METHODS)}")
        self.model, self.adapter, self.method, self.budget = masked.model, masked.adapter, method, budget
        base = "teal" if method in DENSE_PREFIX else method
        self.mlps = [DynamicMLP(base, m.weights, budget, c, DENSE_PREFIX.get(method, 0.0))
                     for m, c in zip(masked.mlps, masked.channel_costs)]
        self.calibration_ratio: float | None = None

    @contextlib.contextmanager
    def installed(self):
        layers = self.adapter.layers(self.model)
        originals = [self.adapter.mlp(layer) for layer in layers]
        assert not any(isinstance(m, DynamicMLP) for m in originals), "a per-token baseline is already installed"
        try:
            for layer, mlp in zip(layers, self.mlps):
                self.adapter.set_mlp(layer, mlp)
            yield self.model
        finally:
            for layer, original in zip(layers, originals):
                self.adapter.set_mlp(layer, original)

    @torch.no_grad()
    def calibrate(self, calibration_ids: torch.Tensor) -> float:
        """Per-layer thresholds from one batched pass over calibration_ids (B, T); returns the active ratio
        measured on them (the budget, up to ties and rounding)."""
        self.reset_counts()
        for m in self.mlps:
            m.calibrating = True
        try:
            with self.installed():
                device = next(self.model.parameters()).device
                self.model.base_model(input_ids=calibration_ids.to(device))  # no LM head: only MLP inputs matter
        finally:
            for m in self.mlps:
                m.calibrating = False
        self.calibration_ratio = self.active_ratio
        self.reset_counts()
        return self.calibration_ratio

    @property
    def calibrated(self) -> bool:
        return self.method == "oracle" or all(m.thresholds is not None for m in self.mlps)

    @property
    def active_ratio(self) -> float:
        used = sum(m.active / max(1, m.tokens) for m in self.mlps)
        return used / sum(m.cost * m.weights.intermediate_size for m in self.mlps)

    def reset_counts(self) -> None:
        for m in self.mlps:
            m.active, m.tokens = 0.0, 0

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        assert self.calibrated, f"{self.method}: calibrate before running"
        with self.installed():
            return self.model(input_ids=ids).logits


# -- every baseline as ids -> logits ---------------------------------------------------------------------
LogitsFn = Callable[[torch.Tensor], torch.Tensor]


def baseline_variants(masked: MaskedModel, methods, budget: float, stats: list[dict] | None,
                      example_ids: torch.Tensor | None = None,
                      calibration_ids: torch.Tensor | None = None) -> dict[str, tuple[LogitsFn, float]]:
    """name -> (ids -> logits, active MLP ratio) for each baseline at `budget`.

    Static methods share `masked` (they set its masks on every call); torch-pruning gets its
    own pruned copy. `stats` from `activation_stats` (needed by wanda-sp and flap).
    Per-token methods (DYNAMIC_METHODS) return a `DynamicSparsity`, calibrated on `calibration_ids`
    (B, T) (teal, cats; default: the first DYNAMIC_CALIBRATION_TOKENS of the text `stats` came from);
    their ratio is the one measured on the calibration text, and the callable's `active_ratio` is the
    one measured on whatever it has run since.
    """
    if calibration_ids is None and getattr(stats, "calibration_ids", None) is not None:
        calibration_ids = stats.calibration_ids[:max(1, DYNAMIC_CALIBRATION_TOKENS // stats.calibration_ids.shape[1])]
    out = {}
    for method in methods:
        if method in EXTERNAL_METHODS:
            pruned, ratio = torch_pruning_copy(masked, budget, example_ids)
            out[method] = (lambda ids, pruned=pruned: pruned(input_ids=ids).logits), ratio
            continue
        if method in DYNAMIC_METHODS:
            variant = DynamicSparsity(masked, method, budget)
            if method == "oracle":
                ratio = budget_of_oracle(masked, budget)
            elif calibration_ids is None:
                raise ValueError(f"baseline {method} needs calibration text for its thresholds: pass calibration_ids "
                                 f"or stats from activation_stats")
            else:
                ratio = variant.calibrate(calibration_ids)
            out[method] = variant, ratio
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


# -- static pruning as it is served: physically smaller matrices ---------------------------------------
class SlicedMLP(nn.Module):
    """A static baseline's pruned MLP as dense matrices of the kept channels only: what a static
    method saves at serving time, at any batch.  (..., D) -> (..., D)

    Computes what the masked model computes for `keep` (and, with `extra_bias`, FLAP's folded
    compensation), with k = len(keep) rows instead of I."""

    def __init__(self, weights, keep: torch.Tensor, extra_bias: torch.Tensor | None = None):
        super().__init__()
        keep = keep.sort().values
        self.act = weights.act
        self.up = nn.Linear(weights.hidden_size, len(keep), bias=weights.up_bias is not None)
        self.up.weight.data = weights.up[keep].clone()
        if weights.up_bias is not None:
            self.up.bias.data = weights.up_bias[keep].clone()
        self.gate = None
        if weights.gate is not None:
            self.gate = nn.Linear(weights.hidden_size, len(keep), bias=weights.gate_bias is not None)
            self.gate.weight.data = weights.gate[keep].clone()
            if weights.gate_bias is not None:
                self.gate.bias.data = weights.gate_bias[keep].clone()
        bias = weights.down_bias
        if extra_bias is not None:
            bias = extra_bias.to(weights.down.dtype) if bias is None else bias + extra_bias.to(bias.dtype)
        self.down = nn.Linear(len(keep), weights.hidden_size, bias=bias is not None)
        self.down.weight.data = weights.down[:, keep].clone()
        if bias is not None:
            self.down.bias.data = bias.clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.up(x)) if self.gate is None else self.act(self.gate(x)) * self.up(x)
        return self.down(h)


def sliced_mlps(masked: MaskedModel, method: str, budget: float, stats: list[dict] | None) -> list[SlicedMLP]:
    """Every layer's MLP pruned by a static `method` at `budget` (the channels `baseline_variants`
    masks), as physically smaller dense matrices; FLAP's compensation in the down bias."""
    if method not in METHODS:
        raise ValueError(f"unknown static baseline {method!r}; choose from {', '.join(METHODS)}")
    masks = static_masks(channel_scores(masked, method, stats), budget)
    folded = FoldedBias(masked, masks, stats).biases if method == "flap" else [None] * len(masks)
    return [SlicedMLP(m.weights, masks[l][0].nonzero().squeeze(-1), folded[l]) for l, m in enumerate(masked.mlps)]
