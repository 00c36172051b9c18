"""Parameter accounting: active parameters per token and FLOPs per token.

The budget p is a fraction of the *prunable* MLP parameters (every projection weight and
bias that belongs to an intermediate channel). A layer's active width is that of its
widest expert, as in the official code, so the active ratio is an upper bound per token.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..moe.families import FamilyAdapter, MLPWeights, adapter_for


def channel_cost(w: MLPWeights) -> int:
    """Prunable parameters tied to one intermediate channel of an MLP."""
    per_projection = w.hidden_size
    cost = (3 if w.gated else 2) * per_projection
    cost += int(w.up_bias is not None) + int(w.gate_bias is not None)
    return cost


def active_ratio(layer_widths: list[torch.Tensor] | list[float], costs: list[int], sizes: list[int]):
    """sum_l cost_l * width_l / sum_l cost_l * I_l. Works on floats or (differentiable) tensors."""
    total = sum(c * s for c, s in zip(costs, sizes))
    return sum(c * w for c, w in zip(costs, layer_widths)) / total


@dataclass
class ParamReport:
    embeddings: int  # input embeddings (+ position embeddings); looked up, not multiplied
    lm_head: int  # output projection (tied or not, it is computed every token)
    attention: int
    mlp_dense: int  # prunable MLP parameters of the dense model
    mlp_active: int  # per token, widest expert of each layer
    mlp_active_mean: int  # per token, mean expert width of each layer
    other: int  # norms, MLP output biases, routers
    mlp_active_ratio: float
    active_total: int  # attention + active MLP + lm_head + other (embeddings excluded)
    dense_total: int  # same without pruning
    active_ratio_vs_dense: float
    flops_per_token: int  # 2 x multiply-adds of active matmuls + attention scores at `context`
    context: int
    # (mlp_active + executed active q/k/v/o projections) / (prunable MLP + q/k/v/o projections): the
    # whole budget of attention pruning, counting only savings the model really executes
    executed_active_ratio: float | None = None
    attention_pruning: dict | None = None  # attention pruning only: what is saved, executed or only masked

    def as_dict(self) -> dict:
        out = asdict(self)
        if self.attention_pruning is None:  # MLP-only conversions keep their report as it was
            out.pop("attention_pruning")
            out.pop("executed_active_ratio")
        return out


def _unique_numel(params) -> int:
    seen, total = set(), 0
    for p in params:
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel()
    return total


def account(model: nn.Module, context: int = 512) -> ParamReport:
    """Account a dense HF model, a masked model (uses its current expert masks) or a materialised one."""
    from ..moe.attention import PrunedAttention
    from ..moe.layer import MoEMLP
    from .masked_attention import count_attention, prunable_attention_params
    from .masked_mlp import MaskedMLP

    base = getattr(model, "base_model_for_accounting", model)
    adapter: FamilyAdapter = adapter_for(base)
    layers = adapter.layers(base)
    cfg = base.config
    emb = base.get_input_embeddings()
    embeddings = emb.weight.numel()
    for name in ("wpe",):  # GPT-2 learned positions
        sub = getattr(getattr(base, "transformer", None), name, None)
        if sub is not None:
            embeddings += sub.weight.numel()
    lm_head = base.get_output_embeddings().weight.numel()
    attention = mlp_dense = mlp_kept = mlp_active = mlp_mean = 0
    attention_dense = attention_stored = attention_prunable = 0
    maskers = list(getattr(model, "attention", None) or [])  # a MaskedModel with attention pruning
    counts = []  # per layer AttentionLayerCount, attention pruning only
    heads = getattr(cfg, "num_attention_heads", getattr(cfg, "n_head", 1))
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    score_flops = 0
    for l, layer in enumerate(layers):
        attn = adapter.attention(layer)
        masker = maskers[l] if maskers else None
        if isinstance(attn, PrunedAttention) or (masker is not None and masker.qk_mask is not None):
            count = count_attention(attn, masker, adapter.model_type)
            counts.append(count)
            fixed = attn.o_bias.numel() if isinstance(attn, PrunedAttention) and attn.o_bias is not None else (
                0 if isinstance(attn, PrunedAttention) or attn.o_proj.bias is None else attn.o_proj.bias.numel())
            attention += count.qk_active + count.vo_active + fixed
            attention_dense += count.prunable + fixed
            attention_prunable += count.prunable
            attention_stored += (sum(p.numel() for p in attn.parameters()) - sum(
                p.numel() for p in attn.router.parameters()) if isinstance(attn, PrunedAttention)
                else adapter.attention_params(layer))
            score_flops += 2 * context * heads * (count.qk_dims + head_dim)  # q.k over kept dims, a.v over hd
        else:
            params = adapter.attention_params(layer)
            attention += params
            attention_dense += params
            attention_stored += params
            attention_prunable += prunable_attention_params(adapter, layer)
            score_flops += 4 * context * heads * head_dim
        mlp = adapter.mlp(layer)
        if isinstance(mlp, MoEMLP):
            cost = (3 if mlp.gate is not None else 2) * mlp.up.shape[1] + int(mlp.up_bias is not None)
            widths = [float(w) for w in mlp.expert_widths]
            dense_inter, kept = _dense_intermediate(cfg), mlp.union_size
        else:
            w = adapter.mlp_weights(mlp.dense_mlp if isinstance(mlp, MaskedMLP) else mlp)
            cost, dense_inter, kept = channel_cost(w), w.intermediate_size, w.intermediate_size
            masks = mlp.expert_masks if isinstance(mlp, MaskedMLP) else None
            widths = [float(dense_inter)] if masks is None else masks.sum(dim=1).float().tolist()
        mlp_dense += cost * dense_inter
        mlp_kept += cost * kept
        mlp_active += cost * max(widths)
        mlp_mean += cost * sum(widths) / len(widths)
    tied = base.get_output_embeddings().weight.data_ptr() == emb.weight.data_ptr()
    # norms, MLP output biases, routers, hypernetwork excluded (it is not part of `base`)
    # norms, MLP output biases, routers (attention routers too), hypernetwork excluded (not part of `base`)
    other = _unique_numel(base.parameters()) - embeddings - (0 if tied else lm_head) - attention_stored - mlp_kept
    active_total = attention + mlp_active + lm_head + other
    dense_total = attention_dense + mlp_dense + lm_head + other
    executed_attention = attention_prunable  # attention projections a token really computes
    pruning = None
    if counts:
        pruning = _attention_pruning_report(counts)
        executed_attention = pruning["executed_active"]
        # what the masks imply (the training budget's ratio), executed or not
        pruning["masked_active_ratio"] = (mlp_active + pruning["active"]) / (mlp_dense + attention_prunable)
    return ParamReport(
        embeddings=embeddings, lm_head=lm_head, attention=attention, mlp_dense=mlp_dense,
        mlp_active=int(mlp_active), mlp_active_mean=int(mlp_mean), other=int(other),
        mlp_active_ratio=mlp_active / mlp_dense, active_total=int(active_total), dense_total=int(dense_total),
        active_ratio_vs_dense=active_total / dense_total,
        flops_per_token=int(2 * (attention + mlp_active + lm_head) + score_flops), context=context,
        executed_active_ratio=(mlp_active + executed_attention) / (mlp_dense + attention_prunable),
        attention_pruning=pruning)


def _attention_pruning_report(counts) -> dict:
    """Q/K savings are executed once materialised (projections and cos/sin sliced); V/O savings are
    executed only by the materialised `PrunedAttention` (tokens grouped by expert), in a masked model
    they are masks that save nothing."""
    executed = all(c.executed for c in counts)
    qk_active = sum(c.qk_active for c in counts)
    vo_active = sum(c.vo_active for c in counts)
    prunable = sum(c.prunable for c in counts)
    qk_dense = sum(c.qk_dense for c in counts)
    vo_dense = prunable - qk_dense
    return {
        "executed": executed,  # False: a masked (training) model, nothing is saved yet
        "prunable_dense": prunable,
        "qk": {"dense": qk_dense, "active": qk_active, "saved": qk_dense - qk_active,
               "saved_executed": (qk_dense - qk_active) if executed else 0,
               "saved_masked_only": 0 if executed else qk_dense - qk_active,
               "kept_dims_per_head": [c.qk_dims for c in counts]},
        "vo": {"dense": vo_dense, "active_widest": vo_active,
               "active_mean": sum(c.vo_active_mean for c in counts), "saved": vo_dense - vo_active,
               "saved_executed": (vo_dense - vo_active) if executed else 0,
               "saved_masked_only": 0 if executed else vo_dense - vo_active,
               "executed_active": vo_active if executed else vo_dense},
        "active": qk_active + vo_active,
        "executed_active": (qk_active + vo_active) if executed else prunable,
    }


def _dense_intermediate(cfg) -> int:
    inter = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None)
    return inter or 4 * cfg.hidden_size
