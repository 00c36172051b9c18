"""The attention pruning of training (the paper's second stage): the masked attention hooks, the
attention parameter count of the budget, and the energy priors of its initial masks. The materialised
`PrunedAttention` is the runtime's (`moe.attention`)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..moe.attention import AttentionShape, PrunedAttention, attention_shape, pair_dims, query_columns
from ..moe.families import FamilyAdapter, adapter_for
from .masked_mlp import MaskedRouting


# -- training: masks applied by hooks on the dense projections ----------------------------------
class MaskedAttention(MaskedRouting, nn.Module):
    """Masks of one layer's attention, applied by hooks on its (frozen) q/k/v/o projections.

    `qk_mask` (1, P) and `vo_masks` (E, C) are set from outside (None: dense). The v_proj hook
    sees the attention input, so the router runs there; the o_proj pre-hook reads its choice.
    """

    def __init__(self, attn: nn.Module, shape: AttentionShape, num_experts: int, layer_idx: int):
        super().__init__()
        self.shape = shape
        self.init_routing(shape.hidden, num_experts, layer_idx)
        self.qk_mask: torch.Tensor | None = None
        self.vo_masks: torch.Tensor | None = None
        self._token_masks: torch.Tensor | None = None  # (N, C) from the v_proj hook to the o_proj pre-hook
        self._projections = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)
        self._handles: list = []
        self.attach()

    def attach(self) -> None:
        if self._handles:
            return
        q, k, v, o = self._projections
        self._handles = [q.register_forward_hook(self._mask_qk), k.register_forward_hook(self._mask_qk),
                         v.register_forward_hook(self._mask_values), o.register_forward_pre_hook(self._mask_output)]

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _mask_qk(self, module, args, out):  # (B, T, heads * hd)
        if self.qk_mask is None:
            return None
        dims = pair_dims(self.qk_mask.reshape(-1)).to(out.dtype)  # (hd,)
        return (out.unflatten(-1, (-1, self.shape.head_dim)) * dims).flatten(-2)

    def _mask_values(self, module, args, out):  # out: (B, T, C)
        if self.vo_masks is None:
            self._token_masks = None
            return None
        x = args[0]
        logits = self.router(x.reshape(-1, x.shape[-1])).float()  # (N, E)
        token_masks = self.route_masks(logits, self.vo_masks.to(out.dtype))  # (N, C)
        self._token_masks = token_masks
        return out * token_masks.view(out.shape)

    def _mask_output(self, module, args):  # o_proj input: (B, T, H * hd)
        if self.vo_masks is None:
            return None
        token_masks, self._token_masks = self._token_masks, None
        assert token_masks is not None, "o_proj ran without its v_proj: the attention forward changed"
        s = self.shape
        reader = token_masks.view(-1, s.kv_heads, 1, s.head_dim).expand(-1, s.kv_heads, s.groups, s.head_dim)
        x = args[0]
        return (x * reader.reshape(x.shape).to(x.dtype),)


# -- accounting ---------------------------------------------------------------------------------------
@dataclass
class AttentionLayerCount:
    prunable: int  # dense q, k, v (+ biases) and o weight parameters
    qk_dense: int  # dense q and k (+ biases)
    qk_active: int  # per token: Q/K rows kept
    qk_dims: int  # kept dims per head
    vo_active: int  # per token: widest expert's V rows and O columns
    vo_active_mean: int
    executed: bool  # True: a materialised layer computes only these; False: masks only


def count_attention(layer_attn: nn.Module, masker: MaskedAttention | None, model_type: str) -> AttentionLayerCount:
    """Prunable attention parameters of one layer: dense, and active per token under its masks."""
    if isinstance(layer_attn, PrunedAttention):
        s = layer_attn.shape
        pairs, widths, executed = layer_attn.kept_dims // 2, layer_attn.expert_widths, True
    else:
        s = attention_shape(layer_attn, model_type)
        if masker is None or masker.qk_mask is None:
            pairs, widths = s.pairs, [s.value_channels]
        else:
            pairs, widths = int(masker.qk_mask.sum()), [float(w) for w in masker.vo_masks.sum(dim=1)]
        executed = False
    return AttentionLayerCount(s.prunable, s.pairs * s.pair_cost, pairs * s.pair_cost, 2 * pairs,
                               int(max(widths) * s.channel_cost), int(sum(widths) / len(widths) * s.channel_cost),
                               executed)


def prunable_attention_params(adapter: FamilyAdapter, layer: nn.Module) -> int:
    """Attention projection parameters a pruning could remove: all but the output projection's bias."""
    attn = adapter.attention(layer)
    if isinstance(attn, PrunedAttention):
        return attn.shape.prunable
    out_bias = getattr(getattr(attn, adapter.attn_proj[-1]), "bias", None)
    return adapter.attention_params(layer) - (out_bias.numel() if out_bias is not None else 0)


# -- calibration prior ----------------------------------------------------------------------------------
@torch.no_grad()
def energy_priors(model: nn.Module, maskers: list[MaskedAttention], calibration_ids: torch.Tensor,
                  budget: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (pair keep (P,), channel keep (C,)) in {0, 1}: the top `budget` fraction by energy.

    Pair energy: sum over heads of E|q_i| E|k_i| over both dims of the pair (a pair's share of
    the attention scores). Channel energy: E|v_c| x ||o_proj columns reading c||.
    """
    adapter = adapter_for(model)
    stats: list[dict[str, torch.Tensor]] = [{} for _ in maskers]
    handles = []
    for l, (layer, masker) in enumerate(zip(adapter.layers(model), maskers)):
        attn = adapter.attention(layer)
        for name in ("q_proj", "k_proj", "v_proj"):
            def hook(mod, args, out, l=l, name=name):
                mean_abs = out.detach().abs().float().reshape(-1, out.shape[-1]).sum(0)
                stats[l][name] = stats[l].get(name, 0) + mean_abs
            handles.append(getattr(attn, name).register_forward_hook(hook))
    saved = [(m.qk_mask, m.vo_masks) for m in maskers]
    try:
        for m in maskers:
            m.qk_mask = m.vo_masks = None
        device = next(model.parameters()).device
        for row in calibration_ids:
            model(row.unsqueeze(0).to(device))
    finally:
        for h in handles:
            h.remove()
        for m, (qk, vo) in zip(maskers, saved):
            m.qk_mask, m.vo_masks = qk, vo
    priors = []
    for l, (layer, masker) in enumerate(zip(adapter.layers(model), maskers)):
        s = masker.shape
        q = stats[l]["q_proj"].view(s.kv_heads, s.groups, s.head_dim).sum(1)  # (KV, hd) summed over the group
        k = stats[l]["k_proj"].view(s.kv_heads, s.head_dim)
        dim_energy = (q * k).sum(0)  # (hd,)
        pair_energy = dim_energy[:s.pairs] + dim_energy[s.pairs:]  # (P,)
        o_w = adapter.attention(layer).o_proj.weight.float()  # (D, H * hd)
        col_norm = o_w.norm(dim=0)[query_columns(torch.arange(s.value_channels, device=o_w.device), s)]
        channel_energy = stats[l]["v_proj"].to(o_w.device) * col_norm.view(s.value_channels, s.groups).norm(dim=1)
        priors.append((_top_fraction(pair_energy, budget), _top_fraction(channel_energy, budget)))
    return priors


def _top_fraction(score: torch.Tensor, fraction: float) -> torch.Tensor:
    keep = torch.zeros_like(score)
    keep[score.argsort(descending=True)[:max(1, int(round(fraction * score.numel())))]] = 1
    return keep
