"""Routing capture: forward hooks on the MoE layers' `RoutingPoint`s -> per-layer records.

`capture_routing(model)` attaches forward hooks to every MoE layer's `RoutingPoint` and
records, per layer, the chosen expert and its router probability for every token the model
sees. The tensors stay on the model's device; `RoutingRecords.stacked()` moves them to the
host in one copy per batch. The hooks are always removed when the block exits.

Legend: L = MoE layers, B = sequences in a batch, T = tokens per sequence, N = B * T.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np
import torch

from ..moe.layer import RoutingPoint
from .routing_log import RoutingLogError


def routing_points(model) -> list[RoutingPoint]:
    """The routing points of a converted (`moe_mlps`) or training-time (`mlps`) model, in layer order."""
    if hasattr(model, "moe_mlps"):
        mlps = list(model.moe_mlps)
    elif hasattr(model, "mlps"):
        mlps = list(model.mlps)
    else:
        mlps = [m for m in model.modules() if hasattr(m, "routing_point")]
    points = [m.routing_point for m in mlps if isinstance(getattr(m, "routing_point", None), RoutingPoint)]
    if not points:
        raise RoutingLogError(f"{type(model).__name__} has no routing points: pass a converted ToMoE model "
                              "(load_converted) or a MaskedModel")
    return points


class RoutingRecords:
    """What `capture_routing` saw: per layer, the (expert, prob) tensors of every forward call.

    A forward over (B, T) ids is one call of N = B * T tokens in row-major order.
    """

    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self.experts: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]  # L x calls x (N_c,)
        self.probs: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]

    def _hook(self, layer: int):
        def hook(_module, _inputs, output):
            expert_index, router_prob = output
            self.experts[layer].append(expert_index.detach())
            self.probs[layer].append(router_prob.detach())
        return hook

    @property
    def num_calls(self) -> int:
        return len(self.experts[0]) if self.num_layers else 0

    def _check(self) -> None:
        counts = {len(c) for c in self.experts}
        if self.num_calls == 0:
            raise RoutingLogError("no routing was recorded: run the model inside `with capture_routing(model)`")
        assert len(counts) == 1, f"layers saw different numbers of calls: {counts}"

    def stacked(self) -> tuple[np.ndarray, np.ndarray]:
        """All calls joined in call order: expert (L, N_total) int16, router_prob (L, N_total) float32.

        One device -> host copy per array, however many layers and calls.
        """
        self._check()
        experts = torch.stack([torch.cat(calls) for calls in self.experts]).to(torch.int16)  # (L, N)
        probs = torch.stack([torch.cat(calls) for calls in self.probs]).float()  # (L, N)
        return experts.cpu().numpy(), probs.cpu().numpy()


@contextlib.contextmanager
def capture_routing(model) -> Iterator[RoutingRecords]:
    """Record expert choices and router probabilities of every MoE layer while the block runs.

        with capture_routing(model) as records:
            model(input_ids)
        experts, probs = records.stacked()   # (L, B*T) each

    Hooks are removed on exit, also when the block raises; outside the block the model pays
    nothing (its routing points are not even called).
    """
    points = routing_points(model)
    records = RoutingRecords(len(points))
    handles = []
    try:
        for layer, point in enumerate(points):
            handles.append(point.register_forward_hook(records._hook(layer)))
        yield records
    finally:
        for handle in handles:
            handle.remove()
