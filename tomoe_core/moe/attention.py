"""The paper's second stage: pruning the attention projections (opt-in, `prune_attention`).

Legend: N = tokens, D = hidden size, H = query heads, G = H / KV query heads per kv head,
KV = kv heads, hd = head dim, P = hd / 2 rotary pairs, C = KV * hd value channels,
E = attention experts, U = value channels kept by a materialised layer (union of experts).

Q/K: one static mask over the P rotary pairs of a layer, shared by every head and by Q and
K. HF's rotary embedding (`rotate_half`) mixes dim i only with dim i + hd/2, so masking whole
pairs of the q_proj/k_proj outputs before the rotation equals masking after it, and the
materialised model simply keeps the rows of the kept dims (and the same slice of cos/sin).
The softmax keeps its original scale 1/sqrt(hd).

V/O: a per-layer attention router (Linear(D -> E)) picks one expert per token; expert k is a
mask over the C value channels. Token t's value vector is masked by its own expert (writer
side, what goes into the KV cache) and the o_proj input of token t by the same expert's mask
repeated over the G query heads that read each kv head (reader side). The materialised layer
computes only the expert's v_proj rows and o_proj columns, tokens grouped by expert.

Supported families: separate q/k/v/o projections, full rotary in the rotate_half layout, no
normalisation over the head dimension (llama, mistral, qwen2). Others are refused by name.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .families import FamilyAdapter, adapter_for
from .layer import RoutedMixin, RoutingPoint

ATTENTION_FAMILIES = ("llama", "mistral", "qwen2")
_REFUSED = {
    "qwen3": "q_norm/k_norm normalise each query/key head over its whole head dimension, so dropping head "
             "dimensions changes the normalisation of the ones kept",
    "gemma3_text": "q_norm/k_norm normalise each query/key head over its whole head dimension, so dropping head "
                   "dimensions changes the normalisation of the ones kept",
    "phi": "it applies rotary embeddings to only part of each head (partial_rotary_factor), so rotary pairs "
           "and pass-through dimensions would need separate masks",
    "phi3": "its query, key and value projections are fused into one qkv_proj",
    "gpt2": "it has no rotary embeddings and fuses q/k/v into one Conv1D (c_attn)",
}


def check_attention_supported(model_or_config) -> FamilyAdapter:
    """The adapter of a family whose attention can be pruned; a ValueError naming the fix otherwise."""
    adapter = adapter_for(model_or_config)
    if adapter.model_type in ATTENTION_FAMILIES:
        return adapter
    reason = _REFUSED.get(adapter.model_type, "its attention layout has not been checked for attention pruning")
    raise ValueError(f"attention pruning (prune_attention / --prune-attention) does not support model family "
                     f"{adapter.model_type!r}: {reason}. Convert it with MLP-only pruning (leave prune_attention "
                     f"off); attention pruning supports {', '.join(ATTENTION_FAMILIES)}.")


@dataclass(frozen=True)
class AttentionShape:
    hidden: int  # D
    heads: int  # H
    kv_heads: int  # KV
    head_dim: int  # hd
    qkv_bias: bool
    o_bias: bool

    @property
    def groups(self) -> int:  # G query heads read each kv head
        return self.heads // self.kv_heads

    @property
    def pairs(self) -> int:  # P
        return self.head_dim // 2

    @property
    def value_channels(self) -> int:  # C
        return self.kv_heads * self.head_dim

    @property
    def pair_cost(self) -> int:
        """Prunable parameters of one rotary pair: 2 dims x (H query + KV key rows) (+ biases)."""
        return 2 * (self.heads + self.kv_heads) * (self.hidden + int(self.qkv_bias))

    @property
    def channel_cost(self) -> int:
        """Prunable parameters of one value channel: its v_proj row (+ bias) and G o_proj columns."""
        return self.hidden + int(self.qkv_bias) + self.groups * self.hidden

    @property
    def prunable(self) -> int:  # q, k, v weights and biases + o weight = P * pair_cost + C * channel_cost
        return self.pairs * self.pair_cost + self.value_channels * self.channel_cost


def attention_shape(attn: nn.Module, model_type: str) -> AttentionShape:
    """Shapes of an HF attention module, asserting the projections look as the family adapter expects."""
    q, k, v, o = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
    hd = attn.head_dim
    hidden = q.weight.shape[1]
    heads, kv_heads = q.weight.shape[0] // hd, k.weight.shape[0] // hd
    assert hd % 2 == 0 and heads * hd == q.weight.shape[0] and heads % kv_heads == 0, (
        f"{model_type}: q_proj {tuple(q.weight.shape)} does not split into heads of {hd}")
    assert k.weight.shape == v.weight.shape == (kv_heads * hd, hidden), (
        f"{model_type}: k_proj {tuple(k.weight.shape)} / v_proj {tuple(v.weight.shape)} are not (KV x {hd}, {hidden})")
    assert o.weight.shape == (hidden, heads * hd), f"{model_type}: o_proj {tuple(o.weight.shape)}"
    assert attn.num_key_value_groups == heads // kv_heads, f"{model_type}: num_key_value_groups mismatch"
    biases = {q.bias is not None, k.bias is not None, v.bias is not None}
    assert len(biases) == 1, f"{model_type}: q/k/v projections disagree on having a bias"
    return AttentionShape(hidden, heads, kv_heads, hd, q.bias is not None, o.bias is not None)


def pair_dims(pair_mask: torch.Tensor) -> torch.Tensor:
    """(P,) per-pair values -> (hd,) per-dim values: pair i covers dims i and i + P (rotate_half)."""
    return torch.cat([pair_mask, pair_mask], dim=-1)


def query_columns(channels: torch.Tensor, shape: AttentionShape) -> torch.Tensor:
    """o_proj input columns that read value channels `channels` (ids into C): (n,) -> (n * G,), channel-major."""
    kv_head, dim = channels // shape.head_dim, channels % shape.head_dim
    heads = kv_head.unsqueeze(1) * shape.groups + torch.arange(shape.groups, device=channels.device)  # (n, G)
    return (heads * shape.head_dim + dim.unsqueeze(1)).reshape(-1)


# -- inference: the materialised attention ----------------------------------------------------------
def _rebuild_experts(module: "PrunedAttention", incompatible_keys) -> None:
    module.refresh()


class PrunedAttention(RoutedMixin, nn.Module):
    """Materialised attention of one layer: sliced Q/K, per-token expert V/O.

    Saved state: `q_proj`/`k_proj` restricted to the kept dims of every head, `qk_dims` (2K,)
    those dims (ids into hd; they slice cos/sin), `v_weight` (U, D) / `v_bias` the union value
    channels with ids `v_channels` (U,) into C, `o_weight` (D, U * G) the o_proj columns that
    read them (channel-major), the router, and each expert's channels as positions into the
    union (`expert_channels`, `expert_offsets`). Each expert's contiguous weights are derived
    at load time (`refresh`), never saved. The KV cache holds keys of 2K dims and full-width
    values (zero outside the writing token's expert).
    """

    def __init__(self, config, layer_idx: int, shape: AttentionShape, kept_dims: int, union_size: int,
                 expert_widths: list[int], sliding_window: int | None = None):
        super().__init__()
        s = self.shape = shape
        self.config = config  # the attention interfaces read _attn_implementation from it
        self.layer_idx = layer_idx
        self.head_dim = s.head_dim
        self.num_key_value_groups = s.groups
        self.scaling = s.head_dim ** -0.5  # the dense model's scale: pruning dims does not rescale scores
        self.attention_dropout = float(getattr(config, "attention_dropout", 0.0) or 0.0)
        self.is_causal = True
        self.sliding_window = sliding_window
        self.num_experts = len(expert_widths)
        with warnings.catch_warnings():  # a layer may keep no Q/K pair: zero-row projections are valid
            warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
            self.q_proj = nn.Linear(s.hidden, s.heads * kept_dims, bias=s.qkv_bias)
            self.k_proj = nn.Linear(s.hidden, s.kv_heads * kept_dims, bias=s.qkv_bias)
        self.v_weight = nn.Parameter(torch.empty(union_size, s.hidden), requires_grad=False)
        self.v_bias = nn.Parameter(torch.empty(union_size), requires_grad=False) if s.qkv_bias else None
        self.o_weight = nn.Parameter(torch.empty(s.hidden, union_size * s.groups), requires_grad=False)
        self.o_bias = nn.Parameter(torch.empty(s.hidden), requires_grad=False) if s.o_bias else None
        self.router = nn.Linear(s.hidden, self.num_experts, bias=True)
        self.register_buffer("qk_dims", torch.zeros(kept_dims, dtype=torch.long))
        self.register_buffer("v_channels", torch.zeros(union_size, dtype=torch.long))
        self.register_buffer("expert_channels", torch.zeros(sum(expert_widths), dtype=torch.long))
        self.register_buffer("expert_offsets", torch.tensor([0] + list(expert_widths)).cumsum(0))
        self.routing_point = RoutingPoint()
        self.requires_grad_(False)
        self._experts: list[tuple] | None = None
        self.register_load_state_dict_post_hook(_rebuild_experts)

    @classmethod
    def from_masks(cls, attn: nn.Module, config, layer_idx: int, router: nn.Linear, qk_mask: torch.Tensor,
                   vo_masks: torch.Tensor, model_type: str) -> "PrunedAttention":
        """qk_mask: (P,) or (1, P) in {0, 1}; vo_masks: (E, C) in {0, 1}."""
        s = attention_shape(attn, model_type)
        pairs = qk_mask.reshape(-1).bool().cpu().nonzero().squeeze(-1)  # kept pair ids (K,)
        dims = torch.cat([pairs, pairs + s.pairs])  # (2K,) rotate_half layout kept
        masks = vo_masks.bool().cpu()
        union = masks.any(dim=0).nonzero().squeeze(-1)  # (U,)
        position = torch.full((s.value_channels,), -1, dtype=torch.long)
        position[union] = torch.arange(len(union))
        per_expert = [position[m.nonzero().squeeze(-1)] for m in masks]
        sliding = getattr(attn, "sliding_window", None)
        if sliding is None and model_type == "mistral":
            sliding = getattr(config, "sliding_window", None)
        out = cls(config, layer_idx, s, len(dims), len(union), [len(c) for c in per_expert], sliding)
        dev = attn.q_proj.weight.device
        q_rows = (torch.arange(s.heads).unsqueeze(1) * s.head_dim + dims).reshape(-1).to(dev)  # (H * 2K,)
        k_rows = (torch.arange(s.kv_heads).unsqueeze(1) * s.head_dim + dims).reshape(-1).to(dev)
        u = union.to(dev)
        with torch.no_grad():
            out.q_proj.weight.data = attn.q_proj.weight.index_select(0, q_rows).clone()
            out.k_proj.weight.data = attn.k_proj.weight.index_select(0, k_rows).clone()
            if s.qkv_bias:
                out.q_proj.bias.data = attn.q_proj.bias.index_select(0, q_rows).clone()
                out.k_proj.bias.data = attn.k_proj.bias.index_select(0, k_rows).clone()
                out.v_bias.data = attn.v_proj.bias.index_select(0, u).clone()
            out.v_weight.data = attn.v_proj.weight.index_select(0, u).clone()
            out.o_weight.data = attn.o_proj.weight.index_select(1, query_columns(u, s)).clone()
            if s.o_bias:
                out.o_bias.data = attn.o_proj.bias.detach().clone()
            out.router.load_state_dict(router.state_dict())
            out.qk_dims = dims.to(dev)
            out.v_channels = u
            out.expert_channels = torch.cat(per_expert).to(dev) if per_expert else out.expert_channels
            out.expert_offsets = out.expert_offsets.to(dev)
        out.to(dev)
        out.refresh()
        return out

    # -- what it keeps ----------------------------------------------------------------------------
    @property
    def kept_dims(self) -> int:
        return self.qk_dims.numel()

    @property
    def union_size(self) -> int:
        return self.v_weight.shape[0]

    @property
    def expert_widths(self) -> list[int]:
        return (self.expert_offsets[1:] - self.expert_offsets[:-1]).tolist()

    def spec(self) -> dict:
        """What `ToMoEConfig.attention_layers` stores to rebuild this module before loading weights."""
        return {"kept_dims": self.kept_dims, "union_size": self.union_size, "expert_widths": self.expert_widths,
                "heads": self.shape.heads, "kv_heads": self.shape.kv_heads, "head_dim": self.shape.head_dim,
                "qkv_bias": self.shape.qkv_bias, "o_bias": self.shape.o_bias, "sliding_window": self.sliding_window}

    @classmethod
    def from_spec(cls, config, layer_idx: int, hidden: int, spec: dict) -> "PrunedAttention":
        shape = AttentionShape(hidden, spec["heads"], spec["kv_heads"], spec["head_dim"], spec["qkv_bias"],
                               spec["o_bias"])
        return cls(config, layer_idx, shape, spec["kept_dims"], spec["union_size"], spec["expert_widths"],
                   spec.get("sliding_window"))

    def refresh(self) -> None:
        """Derive each expert's contiguous v rows / o columns (and where they go) from the saved state."""
        experts = []
        with torch.no_grad():
            for k in range(self.num_experts):
                pos = self.expert_channels[self.expert_offsets[k]:self.expert_offsets[k + 1]]  # (W_k,)
                o_pos = (pos.unsqueeze(1) * self.shape.groups
                         + torch.arange(self.shape.groups, device=pos.device)).reshape(-1)  # (W_k * G,)
                channels = self.v_channels.index_select(0, pos)
                experts.append((self.v_weight.index_select(0, pos),
                                self.v_bias.index_select(0, pos) if self.v_bias is not None else None,
                                channels, self.o_weight.index_select(1, o_pos).contiguous(),
                                query_columns(channels, self.shape)))
        self._experts = experts

    def _apply(self, fn, *args, **kwargs):  # derived expert weights follow the module's device/dtype
        out = super()._apply(fn, *args, **kwargs)
        if getattr(self, "_experts", None) is not None:
            self.refresh()
        return out

    # -- forward --------------------------------------------------------------------------------------
    def _expert_groups(self, idx: torch.Tensor):
        """(expert, token ids) for every expert that has tokens; tokens grouped by expert."""
        if idx.numel() == 1:
            return [(int(idx[0]), None)]
        counts = torch.bincount(idx, minlength=self.num_experts).tolist()
        order = torch.argsort(idx, stable=True)
        groups, start = [], 0
        for k, count in enumerate(counts):
            if count:
                groups.append((k, order[start:start + count]))
                start += count
        return groups

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None, cache=None,
                past_key_values=None, **kwargs):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, eager_attention_forward

        cache = cache if cache is not None else past_key_values
        s = self.shape
        input_shape = hidden_states.shape[:-1]
        flat_x = hidden_states.reshape(-1, s.hidden)  # (N, D)
        query = self.q_proj(hidden_states).view(*input_shape, s.heads, -1).transpose(1, 2)  # (B, H, T, 2K)
        key = self.k_proj(hidden_states).view(*input_shape, s.kv_heads, -1).transpose(1, 2)  # (B, KV, T, 2K)
        logits = self.router(flat_x)  # (N, E)
        idx = self.choose_experts(logits)  # (N,)
        self.report_routing(logits, idx)
        groups = self._expert_groups(idx)
        values = flat_x.new_zeros(flat_x.shape[0], s.value_channels)  # (N, C), zero outside each token's expert
        for k, tokens in groups:
            v_w, v_b, channels, _o_w, _o_cols = self._experts[k]
            x = flat_x if tokens is None else flat_x.index_select(0, tokens)
            v = F.linear(x, v_w, v_b)  # (n, W_k)
            if tokens is None:
                values[:, channels] = v
            else:
                values[tokens.unsqueeze(1), channels] = v
        value = values.view(*input_shape, s.kv_heads, s.head_dim).transpose(1, 2)  # (B, KV, T, hd)
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos[..., self.qk_dims], sin[..., self.qk_dims])
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        extra = {"sliding_window": self.sliding_window} if self.sliding_window is not None else {}
        attn, weights = interface(self, query, key, value, attention_mask,
                                  dropout=0.0 if not self.training else self.attention_dropout,
                                  scaling=self.scaling, **extra, **kwargs)
        attn = attn.reshape(-1, s.heads * s.head_dim)  # (N, H * hd)
        out = flat_x.new_empty(flat_x.shape[0], s.hidden)
        for k, tokens in groups:
            _v_w, _v_b, _channels, o_w, o_cols = self._experts[k]
            if tokens is None:
                out = F.linear(attn[:, o_cols], o_w)
            else:
                out.index_copy_(0, tokens, F.linear(attn.index_select(0, tokens)[:, o_cols], o_w))
        if self.o_bias is not None:
            out = out + self.o_bias
        return out.view(*input_shape, s.hidden), weights
