"""Hypernetwork that generates expert channel masks, and the relaxations used to train it.

Legend: L = decoder layers, E = experts per layer, I = MLP intermediate channels,
H = hypernetwork embedding width (128).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def gumbel_noise(shape, generator: torch.Generator | None, device, dtype=torch.float32) -> torch.Tensor:
    """Standard Gumbel noise; drawn on CPU from `generator` so runs are reproducible on any device."""
    u = torch.rand(shape, generator=generator, dtype=torch.float32).clamp_(1e-6, 1 - 1e-6)
    return (-torch.log(-torch.log(u))).to(device=device, dtype=dtype)


def logistic_noise(shape, generator: torch.Generator | None, device, dtype=torch.float32) -> torch.Tensor:
    """Difference of two Gumbels = logistic noise: the noise of a binary Gumbel-sigmoid."""
    u = torch.rand(shape, generator=generator, dtype=torch.float32).clamp_(1e-6, 1 - 1e-6)
    return (torch.log(u) - torch.log1p(-u)).to(device=device, dtype=dtype)


def straight_through_sigmoid(logits: torch.Tensor, tau: float) -> torch.Tensor:
    """Hard 0/1 forward, sigmoid(logits / tau) gradient backward."""
    soft = torch.sigmoid(logits / tau)
    hard = (logits > 0).to(soft.dtype)
    return hard + soft - soft.detach()


def straight_through_softmax(logits: torch.Tensor, tau: float) -> torch.Tensor:
    """One-hot argmax forward, softmax(logits / tau) gradient backward, over the last dim."""
    soft = torch.softmax(logits / tau, dim=-1)
    hard = F.one_hot(soft.argmax(dim=-1), soft.shape[-1]).to(soft.dtype)
    return hard + soft - soft.detach()


class HyperNetwork(nn.Module):
    """Bidirectional GRU over layers -> per-layer decoder -> channel logits of every expert.

    Inputs are fixed random vectors (a buffer, not trained), one per (layer, expert).
    `mask_logits()` returns, per layer, logits (E, I_l) *before* the offset/prior, so
    `expert_mask = 1[logits + base > 0]` where `base` is the offset (paper init) or a
    per-channel prior from calibration clusters (see `routing.cluster_init`).
    """

    def __init__(self, intermediate_sizes: list[int], num_experts: int, embed_dim: int = 128,
                 input_dim: int = 64, seed: int = 0, decoder_init_scale: float = 1.0, conditioned: bool = False):
        super().__init__()
        self.num_layers = len(intermediate_sizes)
        self.num_experts = num_experts
        self.conditioned = conditioned  # budget-conditioned: forward(budget) sees p as an input
        g = torch.Generator().manual_seed(seed)
        # (E, L, input_dim): experts act as the GRU batch, layers as its sequence.
        self.register_buffer("inputs", torch.randn(num_experts, self.num_layers, input_dim, generator=g))
        extra = len(budget_features(0.5)) if conditioned else 0
        self.gru = nn.GRU(input_dim + extra, embed_dim // 2, batch_first=True, bidirectional=True)
        self.decoders = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(embed_dim), nn.GELU(), nn.Linear(embed_dim, size))
            for size in intermediate_sizes)
        if decoder_init_scale != 1.0:
            with torch.no_grad():
                for dec in self.decoders:
                    dec[2].weight.mul_(decoder_init_scale)
                    dec[2].bias.mul_(decoder_init_scale)

    def forward(self, budget: float | None = None) -> list[torch.Tensor]:
        inputs = self.inputs
        if self.conditioned:
            if budget is None:
                raise ValueError("a budget-conditioned hypernetwork needs the budget to generate masks")
            feats = torch.tensor(budget_features(budget), dtype=inputs.dtype, device=inputs.device)
            inputs = torch.cat([inputs, feats.expand(*inputs.shape[:2], -1)], dim=-1)
        emb, _ = self.gru(inputs)  # (E, L, H)
        return [dec(emb[:, layer]) for layer, dec in enumerate(self.decoders)]  # L x (E, I_l)


def budget_features(budget: float) -> list[float]:
    """What a conditioned hypernetwork sees of the budget p: centred p and log p (both O(1))."""
    return [2.0 * (budget - 0.5), math.log(budget)]
