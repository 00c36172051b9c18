"""How much of a layer's MLP output each expert structure loses at budget p, routed and at best.

    python -m benchmarks.layer_error --layers 3 12 25 --experts 1 8 32 64      # SmolLM2-135M, p = 0.5

Per layer, on the dense model's MLP inputs (--calibration-windows x 512 tokens of the calibration
split to fit, the quality benchmark's held-out windows to measure), the relative error
sum_t a_t ||y_t - y^_t||^2 / sum_t a_t ||y_t||^2 of the layer's MLP output, each token weighted by
a_t = 1 / ||residual_t||^2 (its size against the residual stream it joins) and the first position
of each window left out, exactly the objective of `convert --init layerwise`:

* channel oracle: each token keeps its own top p*I channels by |h_ti| * ||down column i|| (TEAL-like
  per-token choice knowing the activations; the ceiling of any structure at p);
* E experts, top-1: E channel sets fitted as `--init layerwise` fits them (greedy ranks, cost-
  sensitive linear router, `--rounds` alternations), reported with the router's choice ("routed")
  and with the best expert per token ("best expert": the ceiling of E sets with a perfect router).
  E = 1 is static pruning by the same objective.
* shared + groups (--groups G, --shared s): the s*I channels of lowest greedy rank over all tokens
  always on, the other channels split into G groups by k-means on their activation profiles, and
  each token adds whole groups, densest first, until it has p*I channels; groups chosen by their
  actual scores ("best groups": the ceiling of this structure), by a linear router (ridge
  regression x -> every group's score density: "routed"), and by one that also sees the shared
  block's activations, which the token has computed by then ("after shared").

A training-free probe: what end-to-end distillation adds is not in it, but it says how far a
structure is from per-token channel choice before any training. Output: a printed table and
cache/results/layer_error.json.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from benchmarks.result_file import write_result
from tomoe_core.convert.dense import load_dense
from tomoe_core.convert.layerwise import expert_errors, expert_ranks, fit_layer, token_weights
from tomoe_core.convert.masked_model import MaskedModel
from tomoe_core.moe.layer import mlp_intermediate
from tomoe_core.text.sources import text_windows


@torch.no_grad()
def layer_data(masked: MaskedModel, ids: torch.Tensor, layers: list[int]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer: MLP inputs (N, D) and token weights a_t (N,), the first positions weighted 0."""
    inputs: dict[int, list] = {l: [] for l in layers}
    outputs: dict[int, list] = {l: [] for l in layers}
    blocks = masked.adapter.layers(masked.model)
    hooks = [masked.mlps[l].register_forward_pre_hook(lambda m, a, l=l: inputs[l].append(a[0].reshape(-1, a[0].shape[-1])))
             for l in layers]
    hooks += [blocks[l].register_forward_hook(lambda m, a, o, l=l: outputs[l].append(
        (o[0] if isinstance(o, tuple) else o).reshape(-1, masked.config.hidden_size))) for l in layers]
    try:
        for row in ids:
            masked.model(row.unsqueeze(0), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return {l: (torch.cat(inputs[l]).float(), token_weights(torch.cat(outputs[l]).float().pow(2).sum(1), ids.shape[1]))
            for l in layers}


def relative(errors: torch.Tensor, weight: torch.Tensor, total: float) -> float:
    return round(float((errors * weight).sum()) / total, 5)


def measure_layer(mlp, fit: tuple, held: tuple, budget: float, experts: list[int], rounds: int, steps: int,
                  seed: int) -> dict:
    w = mlp.weights
    down = w.down.float()
    x, weight = fit
    xt, weight_t = held
    h, ht = mlp_intermediate(w, x), mlp_intermediate(w, xt)  # (N, I)
    total = float(((ht @ down.T).pow(2).sum(1) * weight_t).sum())
    score = ht.abs() * down.norm(dim=0)
    dropped = torch.zeros_like(ht).scatter_(1, score.argsort(1)[:, :int(round((1 - budget) * ht.shape[1]))], 1.0)
    row = {"channel_oracle": relative(((ht * dropped) @ down.T).pow(2).sum(1), weight_t, total)}
    for e in experts:
        t0 = time.time()
        router, _, ranks = fit_layer(x, h, weight, down, e, budget, rounds, steps, balance=0.05, seed=seed)
        masks = (ranks < budget).float()
        errors = expert_errors(ht, down, masks, torch.ones(len(ht)))  # (N, E) per held-out token, unweighted
        chosen = router(xt).argmax(1).detach()
        row[f"E{e}"] = {"routed": relative(errors.gather(1, chosen[:, None])[:, 0], weight_t, total),
                        "best_expert": relative(errors.min(1).values, weight_t, total),
                        "seconds": round(time.time() - t0, 1)}
    return row


def channel_groups(h: torch.Tensor, channels: torch.Tensor, groups: int, seed: int) -> torch.Tensor:
    """Group id of each of `channels` (C,): k-means on their normalised |activation| profiles. -> (C,)"""
    from sklearn.cluster import KMeans

    sample = torch.randperm(len(h), generator=torch.Generator().manual_seed(seed))[:2048]
    profiles = torch.nn.functional.normalize(h[sample][:, channels].abs().T, dim=1)  # (C, 2048)
    km = KMeans(n_clusters=min(groups, len(channels)), n_init=1, random_state=seed).fit(profiles.numpy())
    return torch.from_numpy(km.labels_).long()


def densest_groups(density: torch.Tensor, sizes: torch.Tensor, room: int) -> torch.Tensor:
    """Per token, whole groups in order of density while they fit in `room` channels. (N, G) -> (N, G) 0/1"""
    order = density.argsort(dim=1, descending=True)
    fits = sizes[order].cumsum(1) <= room
    return torch.zeros_like(density).scatter_(1, order, fits.float())


def measure_groups(mlp, fit: tuple, held: tuple, budget: float, shared: float, groups: int, seed: int) -> dict:
    w = mlp.weights
    down = w.down.float()
    x, weight = fit
    xt, weight_t = held
    h, ht = mlp_intermediate(w, x), mlp_intermediate(w, xt)  # (N, I)
    size = h.shape[1]
    total = float(((ht @ down.T).pow(2).sum(1) * weight_t).sum())
    rank = expert_ranks(h, weight, down.T @ down, torch.zeros(len(h), dtype=torch.long), 1)[0]  # (I,)
    always = rank < shared
    rest = (~always).nonzero()[:, 0]
    group_of = channel_groups(h, rest, groups, seed)  # (C,)
    count = int(group_of.max()) + 1
    member = torch.zeros(count, size).index_put_((group_of, rest), torch.ones(len(rest)))  # (G, I)
    sizes = member.sum(1)
    room = int(round(budget * size)) - int(always.sum())
    norms = down.norm(dim=0)

    def density(hh):  # (N, I) -> (N, G) score per channel of each group
        return (hh.abs() * norms) @ member.T / sizes

    def ridge_router(features, features_t):  # least squares of every group's density, predicted for held-out tokens
        design = torch.cat([features, torch.ones(len(features), 1)], 1)
        coef = torch.linalg.solve(design.T @ design + 1e-3 * len(features) * torch.eye(design.shape[1]),
                                  design.T @ density(h))
        return torch.cat([features_t, torch.ones(len(features_t), 1)], 1) @ coef

    row = {}
    # routed: from the layer input; routed_after_shared: from the input and the shared block's activations,
    # which a token computes before its groups anyway (a second routing stage)
    for name, chosen in (("best_groups", densest_groups(density(ht), sizes, room)),
                         ("routed", densest_groups(ridge_router(x, xt), sizes, room)),
                         ("routed_after_shared", densest_groups(ridge_router(
                             torch.cat([x, h[:, always].abs()], 1), torch.cat([xt, ht[:, always].abs()], 1)),
                             sizes, room))):
        kept = (chosen @ member).clamp_max(1) + always.float()  # (N, I)
        row[name] = relative(((ht * (1 - kept)) @ down.T).pow(2).sum(1), weight_t, total)
    row["active"] = round(float(((chosen @ member).sum(1).mean() + always.sum()) / size), 4)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="dense model (built-in name, folder or hub id)")
    ap.add_argument("--layers", type=int, nargs="+", default=[3, 12, 25], help="decoder layers to measure")
    ap.add_argument("--experts", type=int, nargs="+", default=[1, 8, 32, 64], help="experts per layer E")
    ap.add_argument("--budget", type=float, default=0.5, help="active MLP ratio p")
    ap.add_argument("--groups", type=int, nargs="*", default=[64, 256], help="group counts G of shared + groups")
    ap.add_argument("--shared", type=float, default=0.25, help="always-on share s of shared + groups")
    ap.add_argument("--rounds", type=int, default=2, help="expert / router alternations")
    ap.add_argument("--router-steps", type=int, default=200, help="router fitting steps per round")
    ap.add_argument("--calibration-windows", type=int, default=24, help="calibration windows x 512 tokens")
    ap.add_argument("--windows", type=int, default=8, help="held-out windows x 512 tokens")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", type=Path, default=None, help="JSON (default cache/results/layer_error.json)")
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    model, tokenizer = load_dense(args.model)
    masked = MaskedModel(model, num_experts=1)
    tag = Path(args.model).name
    fit = layer_data(masked, text_windows(tokenizer, "wiki", "calibration", tag, 512, args.calibration_windows), args.layers)
    held = layer_data(masked, text_windows(tokenizer, "wiki", "heldout", tag, 512, args.windows), args.layers)
    rows = []
    for l in args.layers:
        row = {"layer": l, **measure_layer(masked.mlps[l], fit[l], held[l], args.budget, args.experts, args.rounds,
                                           args.router_steps, args.seed)}
        for g in args.groups:
            row[f"shared{args.shared}+G{g}"] = measure_groups(masked.mlps[l], fit[l], held[l], args.budget, args.shared,
                                                                g, args.seed)
        rows.append(row)
        cells = [f"channel oracle {row['channel_oracle']:.4f}"] + [
            f"E={e}: routed {row[f'E{e}']['routed']:.4f}, best expert {row[f'E{e}']['best_expert']:.4f}" for e in args.experts]
        cells += [f"shared {args.shared} + G={g}: routed {r['routed']:.4f}, after shared {r['routed_after_shared']:.4f}, "
                  f"best groups {r['best_groups']:.4f}" for g in args.groups for r in [row[f"shared{args.shared}+G{g}"]]]
        print(f"layer {l}: " + " | ".join(cells), flush=True)
    result = {"kind": "layer-error", "model": args.model, "budget": args.budget, "text": "wiki", "rows": rows,
              "settings": vars(args) | {"output": str(args.output)}}
    write_result(result, "benchmarks.layer_error", argv, args.output, "layer_error.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
