"""The masked MLP used for training, and the routing of the masked modules (Gumbel-softmax while training).

Legend: N = tokens, D = hidden size, I = intermediate channels, E = experts.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..moe.families import MLPWeights
from ..moe.layer import RoutedMixin, RoutingPoint, mlp_intermediate
from .hypernet import gumbel_noise, straight_through_softmax


class RouterStats(NamedTuple):
    """What a router did in one training forward (the load-balance loss reads it)."""

    probs: torch.Tensor  # (N, E) router softmax
    assignment: torch.Tensor  # (N, E) straight-through one-hot expert choice


class MaskedRouting(RoutedMixin):
    """The routing of the masked MLP and attention: `RoutedMixin` plus the training-time Gumbel-softmax."""

    def init_routing(self, hidden: int, num_experts: int, layer_idx: int) -> None:
        """The router (hidden -> E, normal init) and the routing state every masked module starts with."""
        self.layer_idx = layer_idx
        self.router = nn.Linear(hidden, num_experts, bias=True)
        nn.init.normal_(self.router.weight, std=hidden ** -0.5)
        nn.init.zeros_(self.router.bias)
        self.routing_point = RoutingPoint()
        self.train_routing = False
        self.router_tau = 0.4
        self.noise_generator: torch.Generator | None = None
        self.router_stats: RouterStats | None = None  # of the last forward, train_routing only

    def route_masks(self, logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Each token's mask from its router logits (N, E) and the experts' masks (E, X) -> (N, X).

        In `train_routing` mode (the masked modules while training) a straight-through Gumbel-softmax
        mixes the experts' masks and the router's statistics are kept in `router_stats`
        (`MaskedModel.take_router_stats`); otherwise each token takes its chosen expert's mask."""
        if self.train_routing:
            noise = gumbel_noise(logits.shape, self.noise_generator, logits.device)
            assignment = straight_through_softmax(logits + noise, self.router_tau)  # (N, E)
            self.router_stats = RouterStats(torch.softmax(logits, dim=-1), assignment)
            token_masks = assignment.to(masks.dtype) @ masks  # (N, X)
            self.report_routing(logits, assignment.argmax(-1))
        else:
            idx = self.choose_experts(logits)
            self.report_routing(logits, idx)
            token_masks = masks[idx]  # (N, X)
        return token_masks


class MaskedMLP(MaskedRouting, nn.Module):
    """A dense MLP whose intermediate channels are multiplied by the chosen expert's mask.

    `expert_masks` (E, I) is set from outside (hypernetwork output, a static baseline mask
    with E = 1, or None for the dense model). In `train_routing` mode the router uses a
    straight-through Gumbel-softmax and the router statistics of the last call are kept for
    the load-balance loss; otherwise routing is a deterministic argmax (`route_masks`).
    """

    def __init__(self, dense_mlp: nn.Module, weights: MLPWeights, num_experts: int, layer_idx: int):
        super().__init__()
        self.dense_mlp = dense_mlp  # keeps the frozen weights registered where they were
        self.weights = weights
        self.init_routing(weights.hidden_size, num_experts, layer_idx)
        self.expert_masks: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weights
        h = mlp_intermediate(w, x)  # (B, T, I)
        if self.expert_masks is not None:
            flat_x = x.reshape(-1, x.shape[-1])
            logits = self.router(flat_x).float()  # (N, E)
            token_masks = self.route_masks(logits, self.expert_masks.to(h.dtype))  # (N, I)
            h = h * token_masks.view(h.shape)
        return F.linear(h, w.down, w.down_bias)
