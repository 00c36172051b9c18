"""How far can a router that picks channels *before* seeing the activations go? Two training-free probes.

    python -m benchmarks.expert_ceiling                         # codebook, E = 8 64 512, p = 0.5
    python -m benchmarks.expert_ceiling --probe predictor --rank 64 --budgets 0.5 0.7

Both start from the oracle's per-token channel score s = |act(gate x) * up x| * ||down column||
(the quantity `baselines` keeps the top p*I of), on the dense model's MLP inputs x over
--calibration-windows windows of the calibration split, one layer at a time, then evaluate on the
quality benchmark's 8 held-out windows x 512 against dense:

* codebook: E fixed channel sets per layer = the top p*I channels of each of E spherical k-means
  centres of the normalised score vectors (what ToMoE's experts are, without training). Routed
  (a) by the oracle: the set that keeps the most score given the activations (the ceiling of E
  fixed sets chosen well) and (b) by a linear router x -> E trained (cross-entropy) to predict it.
* predictor: a Deja Vu-style low-rank router relu(x B) A -> I channel logits (rank r) trained by
  BCE on "in the token's top half"; each token keeps its top (p - overhead) I predicted channels,
  the predictor's own weights counted against the budget.

Neither is fine-tuned end to end: they say how much of the gap to per-token channel choice is the
routing signal and how much the number of sets, not what a distilled conversion reaches.
Output: cache/results/expert_ceiling.json (rows: probe, budget, variant, perplexity, kl, agreement,
per-layer fit diagnostics) and a printed table.
"""
from __future__ import annotations

import argparse
import contextlib
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from tomoe_core.infra.locations import cache_dir
from tomoe_core.text.sources import text_windows
from tomoe_core.eval.metrics import evaluate_variants, logits_fn
from tomoe_core.moe.atomic import atomic_write_json
from tomoe_core.convert.masked_model import MaskedModel
from tomoe_core.convert.dense import load_dense
from tomoe_core.infra.machine import machine_info
from tomoe_core.moe.layer import mlp_intermediate


@torch.no_grad()
def mlp_inputs(model, adapter, calibration: torch.Tensor, batch: int = 4) -> list[torch.Tensor]:
    """Every layer's MLP input on the calibration windows. -> L x (N, D)"""
    layers = adapter.layers(model)
    xs: list[list[torch.Tensor]] = [[] for _ in layers]
    hooks = [adapter.mlp(layer).register_forward_pre_hook(
        lambda _m, args, i=i: xs[i].append(args[0].reshape(-1, args[0].shape[-1]).detach()))
        for i, layer in enumerate(layers)]
    try:
        for i in range(0, calibration.shape[0], batch):
            model.base_model(input_ids=calibration[i:i + batch])
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(x) for x in xs]


def oracle_scores(w, x: torch.Tensor) -> torch.Tensor:
    """(N, D) -> (N, I): the oracle's per-token channel score."""
    return mlp_intermediate(w, x).abs().float() * w.down.float().norm(dim=0)


def spherical_kmeans(v: torch.Tensor, k: int, iters: int = 25, generator: torch.Generator | None = None) -> torch.Tensor:
    """Unit-norm rows (N, C) -> k unit-norm centres (k, C); an empty cluster restarts at a random row."""
    centres = v[torch.randperm(v.shape[0], generator=generator)[:k]].clone()
    for _ in range(iters):
        assign = (v @ centres.T).argmax(1)
        sums = torch.zeros_like(centres).index_add_(0, assign, v)
        counts = torch.bincount(assign, minlength=k)
        empty = counts == 0
        if empty.any():
            sums[empty] = v[torch.randint(0, v.shape[0], (int(empty.sum()),), generator=generator)]
        centres = F.normalize(sums, dim=1)
    return centres


def train_classifier(module: nn.Module, x: torch.Tensor, loss_fn, steps: int, batch: int = 2048,
                     generator: torch.Generator | None = None) -> nn.Module:
    opt = torch.optim.Adam(module.parameters(), lr=3e-3)
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (min(batch, x.shape[0]),), generator=generator)
        loss = loss_fn(module(x[idx]), idx)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return module.eval()


class CodebookMLP(nn.Module):
    """E fixed channel sets (E, I) of one layer, picked per token by the oracle or by a linear router."""

    def __init__(self, w, masks: torch.Tensor, router: nn.Module, route: str):
        super().__init__()
        self.w, self.masks, self.router, self.route = w, masks, router, route
        self.down_norm = w.down.float().norm(dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, T, D)
        h = mlp_intermediate(self.w, x)
        if self.route == "oracle":
            expert = ((h.abs().float() * self.down_norm) @ self.masks.T).argmax(-1)
        else:
            expert = self.router(x).argmax(-1)
        return F.linear(h * self.masks[expert].to(h.dtype), self.w.down, self.w.down_bias)


class Predictor(nn.Module):
    def __init__(self, hidden: int, intermediate: int, rank: int):
        super().__init__()
        self.b = nn.Linear(hidden, rank, bias=False)
        self.a = nn.Linear(rank, intermediate)

    def forward(self, x):
        return self.a(F.relu(self.b(x)))


class PredictedMLP(nn.Module):
    def __init__(self, w, predictor: Predictor, keep: float):
        super().__init__()
        self.w, self.predictor, self.keep = w, predictor, keep

    def forward(self, x):
        h = mlp_intermediate(self.w, x)
        k = max(1, round(self.keep * self.w.intermediate_size))
        top = self.predictor(x).topk(k, -1).indices
        return F.linear(h * torch.zeros_like(h).scatter_(-1, top, 1.0), self.w.down, self.w.down_bias)


@contextlib.contextmanager
def installed(model, adapter, modules):
    layers = adapter.layers(model)
    originals = [adapter.mlp(layer) for layer in layers]
    try:
        for layer, m in zip(layers, modules):
            adapter.set_mlp(layer, m)
        yield
    finally:
        for layer, m in zip(layers, originals):
            adapter.set_mlp(layer, m)


def fit_codebook(masked, xs, budget: float, experts: int, steps: int, seed: int, log=print):
    gen = torch.Generator().manual_seed(seed)
    fits, diag = [], []
    for li, (m, x) in enumerate(zip(masked.mlps, xs)):
        w = m.weights
        k = max(1, round(budget * w.intermediate_size))
        with torch.no_grad():
            s = oracle_scores(w, x)
            centres = spherical_kmeans(F.normalize(s, dim=1), experts, generator=gen)
            masks = torch.zeros(experts, w.intermediate_size).scatter_(1, centres.topk(k, 1).indices, 1.0)
            best = (s @ masks.T).argmax(1)  # (N,) the oracle's set per token
        torch.manual_seed(seed + li)
        router = train_classifier(nn.Linear(x.shape[1], experts), x,
                                  lambda out, idx: F.cross_entropy(out, best[idx]), steps, generator=gen)
        with torch.no_grad():
            held = slice(-min(2048, x.shape[0]), None)  # the last tokens: a rough in-sample check
            picked = router(x[held]).argmax(1)
            top_mass = s[held].topk(k, 1).values.sum(1)
            diag.append({"layer": li, "router_accuracy": float((picked == best[held]).float().mean()),
                         "mass_oracle_route": float(((s[held] * masks[best[held]]).sum(1) / top_mass).mean()),
                         "mass_router": float(((s[held] * masks[picked]).sum(1) / top_mass).mean())})
        fits.append((w, masks, router))
        if li % 10 == 0:
            log(f"[ceiling] E={experts} layer {li}: {diag[-1]}")
    return fits, diag


def fit_predictor(masked, xs, rank: int, steps: int, seed: int, log=print):
    gen = torch.Generator().manual_seed(seed)
    preds, diag = [], []
    for li, (m, x) in enumerate(zip(masked.mlps, xs)):
        w = m.weights
        with torch.no_grad():
            s = oracle_scores(w, x)
            half = w.intermediate_size // 2
            label = (s >= s.topk(half, 1).values[:, -1:]).float()
        torch.manual_seed(seed + li)
        p = train_classifier(Predictor(w.hidden_size, w.intermediate_size, rank), x,
                             lambda out, idx: F.binary_cross_entropy_with_logits(out, label[idx]), steps,
                             batch=1024, generator=gen)
        with torch.no_grad():
            held = slice(-min(2048, x.shape[0]), None)
            true = torch.zeros_like(s[held]).scatter_(1, s[held].topk(half, 1).indices, 1.0)
            got = torch.zeros_like(s[held]).scatter_(1, p(x[held]).topk(half, 1).indices, 1.0)
            diag.append({"layer": li, "recall_top_half": float((true * got).sum(1).mean() / half),
                         "mass": float(((s[held] * got).sum(1) / (s[held] * true).sum(1)).mean())})
        preds.append((w, p))
        if li % 10 == 0:
            log(f"[ceiling] predictor rank {rank} layer {li}: {diag[-1]}")
    return preds, diag


def predictor_overhead(w, rank: int) -> float:
    """Predictor weights as a fraction of the layer's MLP matrix weights."""
    projections = 3 if w.gated else 2
    return (w.hidden_size * rank + rank * w.intermediate_size + w.intermediate_size) / (
        projections * w.hidden_size * w.intermediate_size)


def run(args, log=print) -> dict:
    t_start = time.time()
    dense, tokenizer = load_dense(args.model, log=log)
    masked = MaskedModel(dense, num_experts=1)
    adapter = masked.adapter
    tag = Path(args.model).name
    calibration = text_windows(tokenizer, "wiki", "calibration", tag, 512, args.calibration_windows)
    held = text_windows(tokenizer, "wiki", "heldout", tag, 512, args.windows)
    xs = mlp_inputs(dense, adapter, calibration)
    log(f"[ceiling] {xs[0].shape[0]} calibration tokens per layer ({time.time() - t_start:.0f} s)")
    variants, info = {}, {}
    if args.probe == "predictor":  # one predictor ranks the channels at every budget
        predictors, predictor_fit = fit_predictor(masked, xs, args.rank, args.steps, args.seed, log)
        overhead = predictor_overhead(predictors[0][0], args.rank)
    for budget in args.budgets:
        if args.probe == "codebook":
            for e in args.experts:
                layers, diag = fit_codebook(masked, xs, budget, e, args.steps, args.seed, log)
                for route in ("oracle", "router"):
                    name = f"p{budget}-E{e}-{route}"
                    mods = [CodebookMLP(w, masks, r, route) for w, masks, r in layers]
                    variants[name] = lambda ids, mods=mods: _run(dense, adapter, mods, ids)
                    info[name] = {"probe": "codebook", "budget": budget, "experts": e, "route": route,
                                  "fit": diag}
        else:
            name = f"p{budget}-rank{args.rank}"
            mods = [PredictedMLP(w, p, budget - overhead) for w, p in predictors]
            variants[name] = lambda ids, mods=mods: _run(dense, adapter, mods, ids)
            info[name] = {"probe": "predictor", "budget": budget, "rank": args.rank, "overhead": overhead,
                          "kept_channels": budget - overhead, "fit": predictor_fit}
    results = evaluate_variants(logits_fn(dense), variants, held)
    rows = [{**info[n], "variant": n, "perplexity": r.perplexity, "kl_to_dense": r.kl_to_dense,
             "top1_agreement": r.top1_agreement} for n, r in results.items() if n != "dense"]
    return {"kind": "expert-ceiling", "model": args.model, "probe": args.probe,
            "text": "wiki (held-out split)", "windows": int(held.shape[0]), "window": 512,
            "calibration_tokens": int(xs[0].shape[0]), "dense": results["dense"].perplexity, "rows": rows,
            "machine": machine_info("cpu"), "seconds": round(time.time() - t_start, 1),
            "command": "python -m benchmarks.expert_ceiling " + " ".join(shlex.quote(a) for a in args.argv)}


@torch.no_grad()
def _run(model, adapter, modules, ids):
    with installed(model, adapter, modules):
        return model(input_ids=ids).logits


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="dense model (built-in name, folder or hub id)")
    ap.add_argument("--probe", choices=["codebook", "predictor"], default="codebook", help="which probe")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.5], help="active MLP ratios")
    ap.add_argument("--experts", type=int, nargs="+", default=[8, 64, 512], help="codebook sizes E")
    ap.add_argument("--rank", type=int, default=64, help="predictor rank")
    ap.add_argument("--steps", type=int, default=300, help="router / predictor training steps per layer")
    ap.add_argument("--calibration-windows", type=int, default=16, help="calibration windows x 512 tokens")
    ap.add_argument("--windows", type=int, default=8, help="held-out windows x 512 tokens")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", type=Path, default=None, help="JSON (default cache/results/expert_ceiling-PROBE.json)")
    args = ap.parse_args(argv)
    args.argv = argv
    result = run(args)
    out = args.output or cache_dir() / "results" / f"expert_ceiling-{args.probe}.json"
    atomic_write_json(out, result)
    print(f"dense {result['dense']:.2f}")
    for r in result["rows"]:
        print(f"{r['variant']:>24}: ppl {r['perplexity']:8.2f}  KL {r['kl_to_dense']:.3f}  "
              f"agreement {r['top1_agreement']:.3f}")
    print(f"wrote {out} ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
