"""Routers, the masked MLP used for training, and the materialised MoE MLP used for inference.

Legend: N = tokens, D = hidden size, I = intermediate channels, U = union channels kept
by a materialised layer, E = experts, W_k = width of expert k.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .families import MLPWeights
from .hypernet import gumbel_noise, straight_through_softmax


def mlp_intermediate(w: MLPWeights, x: torch.Tensor) -> torch.Tensor:
    """act(gate x) * (up x) for gated MLPs, act(up x) for plain ones.  (..., D) -> (..., I)"""
    up = F.linear(x, w.up, w.up_bias)
    if w.gate is None:
        return w.act(up)
    return w.act(F.linear(x, w.gate, w.gate_bias)) * up


class RoutingPoint(nn.Module):
    """Named identity marking where a routing decision is made (TransformerLens-style hook point).

    Its forward receives `(expert_index (N,), router_prob (N,))`; forward hooks observe them.
    Modules call it only when a hook is attached, so nothing is paid when nobody listens.
    """

    def forward(self, expert_index: torch.Tensor, router_prob: torch.Tensor):
        return expert_index, router_prob

    @property
    def listening(self) -> bool:
        return bool(self._forward_hooks)


class RoutedMixin:
    """Routing choice shared by the masked and the materialised MLP.

    `routing_override`: None (learned argmax), "random" (uniform expert per token, from
    `random_generator`), or an int (that fixed expert for every token): the three ways the
    evaluation runs a conversion.
    """

    routing_override: int | str | None = None
    random_generator: torch.Generator | None = None

    def choose_experts(self, logits: torch.Tensor) -> torch.Tensor:  # (N, E) -> (N,)
        num_experts = logits.shape[-1]
        if self.routing_override is None:
            return logits.argmax(dim=-1)
        if self.routing_override == "random":
            idx = torch.randint(num_experts, logits.shape[:-1], generator=self.random_generator)
            return idx.to(logits.device)
        assert 0 <= int(self.routing_override) < num_experts, self.routing_override
        return torch.full(logits.shape[:-1], int(self.routing_override), dtype=torch.long, device=logits.device)

    def report_routing(self, logits: torch.Tensor, expert_index: torch.Tensor) -> None:
        if self.routing_point.listening:
            probs = torch.softmax(logits.float(), dim=-1)
            self.routing_point(expert_index, probs.gather(-1, expert_index.unsqueeze(-1)).squeeze(-1))


class MaskedMLP(RoutedMixin, nn.Module):
    """A dense MLP whose intermediate channels are multiplied by the chosen expert's mask.

    `expert_masks` (E, I) is set from outside (hypernetwork output, a static baseline mask
    with E = 1, or None for the dense model). In `train_routing` mode the router uses a
    straight-through Gumbel-softmax and the router statistics of the last call are kept for
    the load-balance loss; otherwise routing is a deterministic argmax.
    """

    def __init__(self, dense_mlp: nn.Module, weights: MLPWeights, num_experts: int, layer_idx: int):
        super().__init__()
        self.dense_mlp = dense_mlp  # keeps the frozen weights registered where they were
        self.weights = weights
        self.layer_idx = layer_idx
        self.router = nn.Linear(weights.hidden_size, num_experts, bias=True)
        nn.init.normal_(self.router.weight, std=weights.hidden_size ** -0.5)
        nn.init.zeros_(self.router.bias)
        self.routing_point = RoutingPoint()
        self.expert_masks: torch.Tensor | None = None
        self.train_routing = False
        self.router_tau = 0.4
        self.noise_generator: torch.Generator | None = None
        self.last_router_probs: torch.Tensor | None = None  # (N, E), train_routing only
        self.last_assignment: torch.Tensor | None = None  # (N, E) one-hot, train_routing only

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weights
        h = mlp_intermediate(w, x)  # (B, T, I)
        if self.expert_masks is not None:
            flat_x = x.reshape(-1, x.shape[-1])
            logits = self.router(flat_x).float()  # (N, E)
            masks = self.expert_masks.to(h.dtype)
            if self.train_routing:
                noise = gumbel_noise(logits.shape, self.noise_generator, logits.device)
                assignment = straight_through_softmax(logits + noise, self.router_tau)  # (N, E)
                self.last_router_probs = torch.softmax(logits, dim=-1)
                self.last_assignment = assignment
                token_masks = assignment.to(h.dtype) @ masks  # (N, I)
                self.report_routing(logits, assignment.argmax(-1))
            else:
                idx = self.choose_experts(logits)
                self.report_routing(logits, idx)
                token_masks = masks[idx]  # (N, I)
            h = h * token_masks.view(h.shape)
        return F.linear(h, w.down, w.down_bias)


def _channels(flat: torch.Tensor, offsets: torch.Tensor, k: int) -> torch.Tensor:
    return flat[offsets[k]:offsets[k + 1]]


class MoEMLP(RoutedMixin, nn.Module):
    """Materialised ToMoE layer: union weights, expert index lists into them, and the router.

    Persistent state (what is saved): `up`, `gate`, biases, `down` restricted to the U union
    channels, `union_channels` (U,) ids of those channels in the dense MLP, `expert_channels`
    (sum W_k,) indices into the union and `expert_offsets` (E+1,). Layouts are derived
    from it at load time and are not saved:
      * "shared": experts gather their rows from the union weights on every call (leanest);
      * "packed": each expert's weights contiguous (fastest decode, about E * p of the MLP memory).
    """

    def __init__(self, hidden_size: int, union_size: int, expert_widths: list[int], gated: bool,
                 act: nn.Module, has_up_bias: bool = False, has_down_bias: bool = False):
        super().__init__()
        num_experts = len(expert_widths)
        self.num_experts = num_experts
        self.act = act
        self.up = nn.Parameter(torch.empty(union_size, hidden_size), requires_grad=False)
        self.gate = nn.Parameter(torch.empty(union_size, hidden_size), requires_grad=False) if gated else None
        self.up_bias = nn.Parameter(torch.empty(union_size), requires_grad=False) if has_up_bias else None
        self.gate_bias = None
        self.down = nn.Parameter(torch.empty(hidden_size, union_size), requires_grad=False)
        self.down_bias = nn.Parameter(torch.empty(hidden_size), requires_grad=False) if has_down_bias else None
        self.router = nn.Linear(hidden_size, num_experts, bias=True)
        self.register_buffer("union_channels", torch.zeros(union_size, dtype=torch.long))  # ids in the dense MLP
        self.register_buffer("expert_channels", torch.zeros(sum(expert_widths), dtype=torch.long))
        offsets = torch.tensor([0] + list(expert_widths)).cumsum(0)
        self.register_buffer("expert_offsets", offsets)
        self.routing_point = RoutingPoint()
        self.layout = "shared"
        self._packed: list[tuple] | None = None

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_masks(cls, weights: MLPWeights, router: nn.Linear, expert_masks: torch.Tensor) -> "MoEMLP":
        """Keep the union of the experts' channels of one layer.  expert_masks: (E, I) in {0, 1}."""
        masks = expert_masks.bool().cpu()
        union = masks.any(dim=0).nonzero().squeeze(-1)  # (U,) channel ids into the dense MLP
        position = torch.full((masks.shape[1],), -1, dtype=torch.long)
        position[union] = torch.arange(len(union))
        per_expert = [position[m.nonzero().squeeze(-1)] for m in masks]
        moe = cls(weights.hidden_size, len(union), [len(c) for c in per_expert], weights.gated, weights.act,
                  has_up_bias=weights.up_bias is not None, has_down_bias=weights.down_bias is not None)
        with torch.no_grad():
            dev = weights.up.device
            u = union.to(dev)
            moe.up.data = weights.up.index_select(0, u).clone()
            if weights.gated:
                moe.gate.data = weights.gate.index_select(0, u).clone()
            if weights.up_bias is not None:
                moe.up_bias.data = weights.up_bias.index_select(0, u).clone()
            moe.down.data = weights.down.index_select(1, u).clone()
            if weights.down_bias is not None:
                moe.down_bias.data = weights.down_bias.detach().clone()
            moe.router.load_state_dict(router.state_dict())
            moe.expert_channels = torch.cat(per_expert).to(dev) if per_expert else moe.expert_channels
            moe.expert_offsets = moe.expert_offsets.to(dev)
            moe.union_channels = union.to(dev)
        moe.to(dev)
        return moe

    @property
    def expert_widths(self) -> list[int]:
        return (self.expert_offsets[1:] - self.expert_offsets[:-1]).tolist()

    @property
    def union_size(self) -> int:
        return self.up.shape[0]

    def set_layout(self, layout: str) -> None:
        if layout not in ("shared", "packed"):
            raise ValueError(f"unknown MoE layout {layout!r}; choose 'shared' or 'packed'")
        self.layout = layout
        self._packed = [self._expert_weights(k) for k in range(self.num_experts)] if layout == "packed" else None

    def _apply(self, fn, *args, **kwargs):  # keep derived packed weights on the module's device/dtype
        out = super()._apply(fn, *args, **kwargs)
        if self._packed is not None:
            self.set_layout("packed")
        return out

    # -- forward ----------------------------------------------------------------------------
    def _expert_weights(self, k: int) -> tuple:
        ch = _channels(self.expert_channels, self.expert_offsets, k)
        gate = self.gate.index_select(0, ch) if self.gate is not None else None
        up_bias = self.up_bias.index_select(0, ch) if self.up_bias is not None else None
        return (self.up.index_select(0, ch), gate, up_bias, self.down.index_select(1, ch).contiguous())

    def _expert_forward(self, k: int, x: torch.Tensor) -> torch.Tensor:  # (n, D) -> (n, D), no bias
        up, gate, up_bias, down = self._packed[k] if self._packed is not None else self._expert_weights(k)
        h = F.linear(x, up, up_bias)
        h = self.act(h) if gate is None else self.act(F.linear(x, gate)) * h
        return F.linear(h, down)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat_x = x.reshape(-1, shape[-1])  # (N, D)
        logits = self.router(flat_x)  # (N, E)
        idx = self.choose_experts(logits)
        self.report_routing(logits, idx)
        if flat_x.shape[0] == 1:  # batch-1 decode: one expert, no sort
            out = self._expert_forward(int(idx[0]), flat_x)
        else:
            counts = torch.bincount(idx, minlength=self.num_experts).tolist()  # one host sync per layer
            order = torch.argsort(idx, stable=True)
            grouped = flat_x.index_select(0, order)
            pieces, start = [], 0
            for k, count in enumerate(counts):
                if count:
                    pieces.append(self._expert_forward(k, grouped[start:start + count]))
                    start += count
            out = torch.empty_like(flat_x).index_copy_(0, order, torch.cat(pieces))
        if self.down_bias is not None:
            out = out + self.down_bias
        return out.view(shape)
