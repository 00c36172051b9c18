"""Layer-wise fitting: each layer's experts and router fitted to reconstruct that layer's dense MLP.

Legend: N = calibration tokens, D = hidden size, I = intermediate channels, E = experts, B = windows.

End-to-end distillation backpropagates through the whole model, vocabulary included, for every
token. Fitting a layer needs only its MLP inputs X (N, D): with the pretrained weights frozen,
H = act(gate X) * (up X) (N, I) is fixed, and an expert that drops the channel set S from token t
leaves the error
    || sum_{i in S} h_ti w_i ||^2 = 1_S^T (h_t h_t^T ⊙ W^T W) 1_S       (w_i: column i of down, W)
a quadratic form whose matrix Q_e = sum_{t routed to e} a_t h_t h_t^T ⊙ W^T W (I, I) is one matrix
product per expert, however many tokens it summarises. Each token's error is weighted by
a_t = 1 / ||residual_t||^2, its size relative to the residual stream it is added to (where the
next layer's normalisation sees it), and a window's first position (the attention sink, whose
activations are orders of magnitude larger) is left out.

Per layer, in order, on the inputs of the model converted so far (so later layers see and absorb
the errors of earlier ones):
  1. the router starts from k-means centroids of the standardised inputs;
  2. each expert's channels are ranked by greedy removal: drop the channel whose removal adds the
     least to 1_S^T Q_e 1_S given the channels already dropped. The order is one ranking for every
     budget (nested experts): an expert at budget p keeps the channels of rank < p, which is how a
     budget-conditioned conversion's prior reads it (`MaskedModel.mask_base`);
  3. the router is fitted to the experts' errors at the budget: minimise the expected error under
     its softmax, mean_t sum_e softmax(r(x_t))_e err_te, plus a load-balance term;
  2 and 3 alternate `rounds` times; the last experts are fitted to the last router's tokens.
The result initialises a MaskedModel like `cluster_init` (routers, mask priors, ranks), so the
end-to-end distillation that follows starts from it.
"""
from __future__ import annotations

import logging
import math
import time

import torch

from ..moe.layer import mlp_intermediate
from .masked_model import MaskedModel, balancing_bias

log = logging.getLogger(__name__)

SINK_POSITIONS = 1  # leading positions of each window left out of the fit (attention sink)


class _StopForward(Exception):
    pass


class LayerRunner:
    """Runs a model's decoder layers one at a time on stored hidden states.

    The keyword arguments each layer receives (attention mask, rotary embeddings, position ids) are
    captured once from a forward of one window; every window has the same length, so they hold for
    all. Caching is off, so no layer keeps keys and values between calls."""

    def __init__(self, masked: MaskedModel, window: torch.Tensor):
        self.layers = masked.adapter.layers(masked.model)
        self.model = masked.model
        self.kwargs: list[dict] = [{} for _ in self.layers]
        handles = [layer.register_forward_pre_hook(self._keep_kwargs(l), with_kwargs=True)
                   for l, layer in enumerate(self.layers)]
        try:
            with torch.no_grad(), masked.dense():
                self.model(window.unsqueeze(0), use_cache=False)
        finally:
            for h in handles:
                h.remove()

    def _keep_kwargs(self, l: int):
        def hook(module, args, kwargs):
            self.kwargs[l] = {k: v for k, v in kwargs.items()
                              if k not in ("hidden_states", "past_key_values", "past_key_value", "cache", "layer_past")}
        return hook

    @torch.no_grad()
    def embed(self, window: torch.Tensor) -> torch.Tensor:
        """The first layer's input for one window (1, T) -> (1, T, D)."""
        kept = []

        def stop(module, args, kwargs):
            kept.append(args[0] if args else kwargs["hidden_states"])
            raise _StopForward

        handle = self.layers[0].register_forward_pre_hook(stop, with_kwargs=True)
        try:
            self.model(window.unsqueeze(0), use_cache=False)
        except _StopForward:
            pass
        finally:
            handle.remove()
        return kept[0]

    @torch.no_grad()
    def run(self, l: int, hidden: torch.Tensor) -> torch.Tensor:
        out = self.layers[l](hidden, **self.kwargs[l])
        return out[0] if isinstance(out, tuple) else out


def greedy_channel_rank(q: torch.Tensor) -> torch.Tensor:
    """Rank of every channel in greedy removal order, as a fraction of I (0: removed last, kept at
    every budget). q: (I, I) the error quadratic form. -> (I,)"""
    size, device = q.shape[0], q.device
    q = q.double().cpu()  # I sequential steps: a host loop, cheaper than I device round trips
    cost = q.diagonal().clone()  # error added by dropping i alone; + 2 (Q 1_S)_i once S is dropped
    removed = torch.zeros(size, dtype=torch.bool)
    order = torch.empty(size, dtype=torch.long)
    for step in range(size):
        i = int(cost.masked_fill(removed, math.inf).argmin())
        order[size - 1 - step] = i
        removed[i] = True
        cost += 2 * q[:, i]
    rank = torch.empty(size)
    rank[order] = torch.arange(size, dtype=torch.float32) / size
    return rank.to(device)


def kmeans_router(x: torch.Tensor, num_experts: int, seed: int) -> torch.nn.Linear:
    """Nearest-centroid router over k-means clusters of the standardised inputs, logits scaled down
    so the fitting that follows can move them."""
    from sklearn.cluster import KMeans

    x = x.float().cpu()  # k-means and the balancing run on the CPU; the router goes back to x's device
    mu, sigma = x.mean(0), x.std(0).clamp_min(1e-6)
    sample = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:8192]]
    km = KMeans(n_clusters=num_experts, n_init=2, random_state=seed).fit(((sample - mu) / sigma).numpy())
    centers = torch.from_numpy(km.cluster_centers_).float()  # (E, D)
    router = torch.nn.Linear(x.shape[1], num_experts)
    raw = ((x - mu) / sigma) @ centers.T - 0.5 * (centers ** 2).sum(1)  # (N, E)
    scale = 1.0 / float(raw.std().clamp_min(1e-6))
    shift = balancing_bias(raw * scale)
    with torch.no_grad():
        router.weight.copy_(centers / sigma * scale)
        router.bias.copy_((-(centers * (mu / sigma)).sum(1) - 0.5 * (centers ** 2).sum(1)) * scale + shift)
    return router


def fit_router(router: torch.nn.Linear, x: torch.Tensor, errors: torch.Tensor, steps: int, balance: float) -> None:
    """Minimise the expected error of the router's choice. errors: (N, E) per token and expert."""
    cost = errors / errors.mean().clamp_min(1e-12)
    num_experts = errors.shape[1]
    opt = torch.optim.Adam(router.parameters(), lr=1e-2)
    for _ in range(steps):
        probs = torch.softmax(router(x), dim=1)  # (N, E)
        loss = (probs * cost).sum(1).mean() + balance * num_experts * (probs.mean(0) ** 2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()


@torch.no_grad()
def expert_ranks(h: torch.Tensor, weight: torch.Tensor, gram: torch.Tensor, assign: torch.Tensor,
                  num_experts: int) -> torch.Tensor:
    """Greedy channel ranks of every expert over the tokens assigned to it. -> (E, I)"""
    ranks = []
    for e in range(num_experts):
        mine = assign == e
        he, we = (h[mine], weight[mine]) if int(mine.sum()) > 0 else (h, weight)
        ranks.append(greedy_channel_rank(((he * we[:, None]).T @ he) * gram))
    return torch.stack(ranks)


@torch.no_grad()
def expert_errors(h: torch.Tensor, down: torch.Tensor, masks: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Weighted error of every token under every expert's mask. h (N, I), masks (E, I) -> (N, E)"""
    return torch.stack([((h * (1 - m)) @ down.T).pow(2).sum(1) * weight for m in masks], dim=1)


def token_weights(residual_sq: torch.Tensor, window: int) -> torch.Tensor:
    """a_t = 1 / ||residual_t||^2 for tokens laid out window after window, 0 at each window's first
    SINK_POSITIONS positions. residual_sq: (N,) -> (N,)"""
    first = (torch.arange(len(residual_sq), device=residual_sq.device) % window) < SINK_POSITIONS
    return torch.where(first, torch.zeros_like(residual_sq), 1 / residual_sq.clamp_min(1e-12))


def fit_layer(x: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, down: torch.Tensor, num_experts: int,
              budget: float, rounds: int, router_steps: int, balance: float, seed: int):
    """One layer's router and expert ranks (module docstring, steps 1-3). x (N, D) MLP inputs, h (N, I)
    their intermediate activations, weight (N,) token weights, down (D, I).
    -> (router, assign (N,) its choice per token, ranks (E, I))"""
    gram = down.T @ down  # (I, I)
    router = kmeans_router(x, num_experts, seed).to(x.device)
    with torch.no_grad():
        assign = router(x).argmax(1)
    for _ in range(rounds if num_experts > 1 else 0):  # one expert: nothing to route
        masks = (expert_ranks(h, weight, gram, assign, num_experts) < budget).float()
        with torch.enable_grad():
            fit_router(router, x, expert_errors(h, down, masks, weight), router_steps, balance)
        with torch.no_grad():
            assign = router(x).argmax(1)
    return router, assign, expert_ranks(h, weight, gram, assign, num_experts)


def layerwise_init(masked: MaskedModel, calibration_ids: torch.Tensor, budget: float, prior_scale: float,
                   seed: int = 0, rounds: int = 1, router_steps: int = 200, balance: float = 0.05,
                   progress=None) -> dict:
    """Fit every layer's router and expert priors in order (module docstring). calibration_ids: (B, T).

    Sets what `cluster_init` sets: routers, mask bases (+s on the channels of rank < budget, -s
    elsewhere) and, conditioned, the ranks. Returns per-layer relative errors and expert sizes."""
    torch.manual_seed(seed)
    device = next(masked.model.parameters()).device
    ids = calibration_ids.to(device)
    runner = LayerRunner(masked, ids[0])
    hidden = [runner.embed(row) for row in ids]  # B x (1, T, D)
    length = ids.shape[1]
    masked.prior_scale.fill_(prior_scale)
    masked.set_masks(None)
    report = {"layers": [], "tokens": int(ids.numel()), "rounds": rounds}
    t0 = time.time()
    for l, mlp in enumerate(masked.mlps):
        inputs = []
        handle = mlp.register_forward_pre_hook(lambda mod, args: inputs.append(args[0].reshape(-1, args[0].shape[-1])))
        try:
            # the dense MLP on the converted model's inputs; the layer runs again below with its experts
            # (re-running it, attention included, works for every family, post-MLP norms too)
            outputs = [runner.run(l, h) for h in hidden]
        finally:
            handle.remove()
        x = torch.cat(inputs).float()  # (N, D)
        weight = token_weights(torch.cat([o.reshape(-1, o.shape[-1]) for o in outputs]).float().pow(2).sum(1), length)
        w = mlp.weights
        h = mlp_intermediate(w, x.to(w.up.dtype)).float()  # (N, I)
        down = w.down.float()  # (D, I)
        router, assign, ranks = fit_layer(x, h, weight, down, masked.num_experts, budget, rounds, router_steps,
                                          balance, seed + l)
        masks = (ranks < budget).float()
        errors = expert_errors(h, down, masks, weight)
        total = float(((h @ down.T).pow(2).sum(1) * weight).sum())
        with torch.no_grad():
            mlp.router.weight.copy_(router.weight.to(mlp.router.weight))
            mlp.router.bias.copy_(router.bias.to(mlp.router.bias))
            masked.mask_bases[l].copy_(torch.where(ranks < budget, prior_scale, -prior_scale).to(masked.mask_bases[l]))
            if masked.conditioned:
                masked.mask_ranks[l].copy_(ranks.to(masked.mask_ranks[l]))
            mlp.expert_masks = masks.to(w.up.dtype)  # the next layer fits on this layer's converted output
            hidden = [runner.run(l, hid) for hid in hidden]
        report["layers"].append({
            "relative_error": round(float(errors.gather(1, assign[:, None]).sum()) / total, 5),
            "oracle_relative_error": round(float(errors.min(1).values.sum()) / total, 5),
            "expert_tokens": torch.bincount(assign, minlength=masked.num_experts).tolist()})
        log.info("layer-wise fit: layer %d/%d, relative error %.4f (best expert per token %.4f), %.0f s",
                 l + 1, len(masked.mlps), report["layers"][-1]["relative_error"],
                 report["layers"][-1]["oracle_relative_error"], time.time() - t0)
        if progress is not None:
            progress(l + 1, len(masked.mlps))
    masked.set_masks(None)
    if masked.attention is not None:  # attention pruning: the same energy priors as the cluster init
        masked.attention_init(calibration_ids, budget, prior_scale)
        report["attention_init"] = "energy"
    report["seconds"] = round(time.time() - t0, 1)
    return report
