"""Parameter accounting: active parameters per token and FLOPs per token.

The budget p is a fraction of the *prunable* MLP parameters (every projection weight and
bias that belongs to an intermediate channel). A layer's active width is that of its
widest expert, as in the official code, so the active ratio is an upper bound per token.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from .families import FamilyAdapter, MLPWeights, adapter_for


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

    def as_dict(self) -> dict:
        return asdict(self)


def _unique_numel(params) -> int:
    seen, total = set(), 0
    for p in params:
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel()
    return total


def account(model: nn.Module, context: int = 512) -> ParamReport:
    """Account a dense HF model, a masked model (uses its current expert masks) or a materialised one."""
    from .routing import MaskedMLP, MoEMLP

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
    for layer in layers:
        attention += adapter.attention_params(layer)
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
    other = _unique_numel(base.parameters()) - embeddings - (0 if tied else lm_head) - attention - mlp_kept
    heads = getattr(cfg, "num_attention_heads", getattr(cfg, "n_head", 1))
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    score_flops = 4 * len(layers) * context * heads * head_dim
    active_total = attention + mlp_active + lm_head + other
    dense_total = attention + mlp_dense + lm_head + other
    return ParamReport(
        embeddings=embeddings, lm_head=lm_head, attention=attention, mlp_dense=mlp_dense,
        mlp_active=int(mlp_active), mlp_active_mean=int(mlp_mean), other=int(other),
        mlp_active_ratio=mlp_active / mlp_dense, active_total=int(active_total), dense_total=int(dense_total),
        active_ratio_vs_dense=active_total / dense_total,
        flops_per_token=int(2 * (attention + mlp_active + lm_head) + score_flops), context=context)


def _dense_intermediate(cfg) -> int:
    inter = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None)
    return inter or 4 * cfg.hidden_size
