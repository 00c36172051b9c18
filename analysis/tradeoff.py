"""Quality against cost: the budget explorer's cost model and quality at any budget (the speed cards: speed_cards.py).

Everything here is derived from files (conversion metadata, quality and speed results), not
from loaded networks, so the landing page renders without touching torch.

Cost model. A conversion's accounting (`tomoe_core.convert.accounting.ParamReport`, stored in tomoe.json)
splits the parameters multiplied per token into attention, MLP, lm_head and other. Only the MLP
scales with the budget p:  active(p) = attention + p * mlp_dense + lm_head + other,  and
FLOPs(p) = 2 * (attention + p * mlp_dense + lm_head) + attention-score FLOPs at the stated context.

Speed and memory (the cost cards) come from one speed benchmark file (`python -m benchmarks.speed`,
one file per machine: dense and every budget measured in one run, same protocol), at the layout,
thread count and batch size chosen on the page. Between measured budgets they are interpolated
(linear in p); outside the measured range they are a labelled estimate, linear through the two
nearest measurements with dense counting as p = 1; at p = 1 they are the dense model's.
Cost per million tokens = price per hour / (tokens/s * 3600) * 1e6, at that speed. Other models
and hardware are projected by `analysis.projection`, labelled as such.

Quality (the quality cards) is measured, interpolated between measured budgets (log-perplexity
linear in p), dense at p = 1, or, outside the measured range, the nearest measurement, with its own
budget named on the card.
Last-word accuracy (LAMBADA-style) is shown where the quality benchmark measured it.

Per-token baselines (quality benchmark). TEAL- and CATS-style sparsity pick a different set of MLP
weights for every token by magnitude thresholds, with no training (kind "dynamic, training-free");
their active parameters are the MLP weights the held-out tokens used, on average. The oracle keeps
each token's p * I most useful channels knowing all of its activations: a ceiling that no runnable
method reaches, drawn dashed and left off the Pareto front.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Collection

import pandas as pd

# -- cost model ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CostModel:
    """Parameter split of one model (from a ParamReport dict); evaluates any budget p."""
    model: str
    attention: int
    mlp_dense: int
    lm_head: int
    other: int  # norms, MLP output biases, routers
    embeddings: int
    score_flops: int  # attention QK^T and AV FLOPs per token at `context`
    context: int

    @classmethod
    def from_accounting(cls, model: str, acc: dict) -> "CostModel":
        matmul = acc["attention"] + acc["mlp_active"] + acc["lm_head"]
        return cls(model=model, attention=int(acc["attention"]), mlp_dense=int(acc["mlp_dense"]),
                   lm_head=int(acc["lm_head"]), other=int(acc["other"]), embeddings=int(acc["embeddings"]),
                   score_flops=int(acc["flops_per_token"] - 2 * matmul), context=int(acc.get("context", 512)))

    def active_params(self, budget: float) -> float:
        return self.attention + budget * self.mlp_dense + self.lm_head + self.other

    def flops_per_token(self, budget: float) -> float:
        return 2 * (self.attention + budget * self.mlp_dense + self.lm_head) + self.score_flops

    @property
    def dense_params(self) -> float:
        return self.active_params(1.0)

    def at_budget(self, budget: float) -> dict:
        active = self.active_params(budget)
        return {"budget": budget, "active_params": active, "dense_params": self.dense_params,
                "active_ratio": active / self.dense_params, "mlp_active": budget * self.mlp_dense,
                "flops_per_token": self.flops_per_token(budget), "dense_flops": self.flops_per_token(1.0),
                "context": self.context}


# -- cost ----------------------------------------------------------------------------------------


def cost_per_million_tokens(tokens_per_s: float | None, price_per_hour: float) -> float | None:
    """USD per million generated tokens at `tokens_per_s`; None where undefined (no speed, a price
    below 0). A price of 0 gives 0: the page says so rather than dividing by a dense cost of 0."""
    if tokens_per_s is None or not tokens_per_s > 0 or price_per_hour is None or price_per_hour < 0:
        return None
    return price_per_hour / (tokens_per_s * 3600) * 1e6


# -- quality points from result files ------------------------------------------------------------

POINT_COLUMNS = ["eval_set", "model", "variant", "kind", "method", "budget", "perplexity", "kl_to_dense",
                 "top1_agreement", "last_word_accuracy", "active_params", "source", "conversion"]
ABLATION_PREFIXES = ("tomoe-random", "tomoe-fixed")


def variant_kind(variant: str) -> str:
    if variant == "dense":
        return "dense"
    if variant.startswith(ABLATION_PREFIXES):
        return "ablation"
    if variant.startswith("tomoe"):
        return "tomoe"
    return DYNAMIC_KINDS.get(variant, "baseline")


# per-token baselines of `evaluate --baselines` (benchmarks.quality rows carry their kind themselves)
DYNAMIC_KINDS = {"teal": "dynamic, training-free", "teal-half-dense": "dynamic, training-free",
                 "cats": "dynamic, training-free", "oracle": "ceiling"}


def eval_set_label(result: dict) -> str:
    windows, window = result.get("windows"), result.get("window")
    return f"{result.get('model', '?')} · {result.get('text', '?')} · {windows} x {window} tokens"


def cost_models(conversions, results: dict[str, dict]) -> dict[str, CostModel]:
    """One cost model per dense model name, from conversion metadata or result accounting."""
    out: dict[str, CostModel] = {}
    sources = [(c.model, c.accounting) for c in conversions]
    sources += [(r.get("model"), r.get("accounting")) for r in results.values()]
    for model, acc in sources:
        if model and acc and model not in out:
            try:
                out[str(model)] = CostModel.from_accounting(str(model), acc)
            except (KeyError, TypeError):
                continue
    return out


def quality_points(results: dict[str, dict], costs: dict[str, CostModel]) -> pd.DataFrame:
    """One row per (result file, variant) of every quality result: `python -m tomoe_core evaluate`
    files (`kind: quality`) and the quality benchmark (`kind: quality-benchmark`, every budget)."""
    rows = []
    for source, res in results.items():
        if res.get("kind") == "quality" and isinstance(res.get("results"), dict):
            rows += _evaluate_rows(source, res, costs.get(str(res.get("model", "?"))))
        elif res.get("kind") == "quality-benchmark" and isinstance(res.get("rows"), list):
            rows += _benchmark_rows(source, res, costs.get(str(res.get("model", "?"))))
    df = pd.DataFrame(rows, columns=POINT_COLUMNS)
    if not df.empty:
        # one dense row per evaluation set (every result file re-measures it on the same windows)
        dense = df["kind"] == "dense"
        df = pd.concat([df[dense].drop_duplicates("eval_set"), df[~dense]], ignore_index=True)
    return df


def _evaluate_rows(source: str, res: dict, cost: CostModel | None) -> list[dict]:
    model, budget, label = str(res.get("model", "?")), res.get("budget"), eval_set_label(res)
    conversion = res.get("conversion")
    conv_name = conversion.rstrip("/").rsplit("/", 1)[-1] if conversion else None
    rows = []
    source_kind = res.get("budget_source", "trained")  # how the evaluated conversion reached its budget
    if source_kind in ("conditioned", "threshold-moved") and res.get("derived_from"):
        conv_name = str(res["derived_from"]).rstrip("/").rsplit("/", 1)[-1]  # a rebudgeted copy: its source's curve
    for variant, r in res["results"].items():
        kind = variant_kind(variant)
        if variant == "tomoe" and source_kind in ("conditioned", "threshold-moved"):
            variant, kind = ("tomoe-conditioned", "tomoe") if source_kind == "conditioned" else \
                ("tomoe-threshold-moved", "fallback")
        b = 1.0 if kind == "dense" else r.get("budget", budget)
        active = None
        if kind == "tomoe" and res.get("accounting"):
            active = res["accounting"].get("active_total")
        if active is None and cost is not None and b is not None:
            active = cost.active_params(float(b))
        rows.append({"eval_set": label, "model": model, "variant": variant, "kind": kind,
                     "method": TOMOE_METHOD_LABELS.get(variant, variant), "budget": b,
                     "perplexity": r.get("perplexity"), "kl_to_dense": r.get("kl_to_dense"),
                     "top1_agreement": r.get("top1_agreement"),
                     "last_word_accuracy": r.get("last_word_accuracy"), "active_params": active,
                     "source": source, "conversion": conv_name if kind in ("tomoe", "ablation", "fallback") else None})
    return rows


_BENCHMARK_KINDS = {"tomoe": "tomoe", "fallback": "fallback", "ablation": "ablation", "baseline": "baseline",
                    "external-baseline": "baseline", "dynamic, training-free": "dynamic, training-free",
                    "ceiling": "ceiling"}
# how a ToMoE row of the quality benchmark reached its budget (benchmarks.quality `method`)
TOMOE_METHOD_LABELS = {"tomoe": "ToMoE", "tomoe-conditioned": "ToMoE, budget-conditioned",
                       "tomoe-threshold-moved": "ToMoE, threshold moved (no retraining)"}


def _benchmark_rows(source: str, res: dict, cost: CostModel | None) -> list[dict]:
    model, label = str(res.get("model", "?")), eval_set_label(res)
    dense = res.get("dense") or {}
    rows = []
    if dense.get("perplexity") is not None:
        rows.append({"eval_set": label, "model": model, "variant": "dense", "kind": "dense", "method": "dense",
                     "budget": 1.0, "perplexity": dense["perplexity"], "kl_to_dense": dense.get("kl_to_dense", 0.0),
                     "top1_agreement": dense.get("top1_agreement", 1.0),
                     "last_word_accuracy": dense.get("last_word_accuracy"),
                     "active_params": cost.dense_params if cost else None, "source": source, "conversion": None})
    for r in res["rows"]:
        kind = _BENCHMARK_KINDS.get(str(r.get("kind")), "baseline")
        ratio = r.get("active_mlp_ratio") or r.get("budget")
        method = str(r.get("method"))
        rows.append({"eval_set": label, "model": model, "variant": method, "kind": kind,
                     "method": TOMOE_METHOD_LABELS.get(method, method), "budget": r.get("budget"),
                     "perplexity": r.get("perplexity"), "kl_to_dense": r.get("kl_to_dense"),
                     "top1_agreement": r.get("top1_agreement"), "last_word_accuracy": r.get("last_word_accuracy"),
                     "active_params": cost.active_params(float(ratio)) if cost and ratio is not None else None,
                     "source": source, "conversion": r.get("conversion")})
    return rows


def eval_sets(points: pd.DataFrame) -> list[str]:
    """Evaluation sets: those with ToMoE points first, then by number of ToMoE and baseline points."""
    if points.empty:
        return []
    counts = points[points["kind"] != "dense"].groupby("eval_set").size()
    tomoe = points[points["kind"] == "tomoe"].groupby("eval_set").size()
    return sorted(points["eval_set"].unique(), key=lambda s: (-int(tomoe.get(s, 0) > 0), -int(counts.get(s, 0))))


@dataclass
class QualityAtBudget:
    perplexity: float | None
    kl_to_dense: float | None
    top1_agreement: float | None
    dense_perplexity: float | None
    label: str  # where the numbers come from: measured, interpolated, nearest
    exact: bool
    best_baseline: dict | None  # {"method", "perplexity", "budget"} at the nearest baseline budget
    status: str = "measured"  # "dense", "measured", "interpolated", "nearest" (outside the measured range), "missing"
    budget: float | None = None  # the budget the numbers belong to (the nearest measured one for "nearest")
    last_word_accuracy: float | None = None  # where the evaluation measured it
    dense_last_word_accuracy: float | None = None


def _interpolate(lo: pd.Series, hi: pd.Series, budget: float, key: str, log: bool = False) -> float | None:
    t = (budget - lo["budget"]) / (hi["budget"] - lo["budget"])
    if pd.isna(lo.get(key)) or pd.isna(hi.get(key)):
        return None
    a, b = float(lo[key]), float(hi[key])
    if log:
        return math.exp((1 - t) * math.log(a) + t * math.log(b))
    return (1 - t) * a + t * b


def _value(row: pd.Series, key: str) -> float | None:
    v = row.get(key)
    return None if v is None or pd.isna(v) else float(v)


def quality_at_budget(points: pd.DataFrame, eval_set: str, budget: float, tol: float = 0.011,
                      conversion: str | None = None, available: Collection[str] | None = None) -> QualityAtBudget:
    """ToMoE quality at `budget` in one evaluation set: the dense model's at p = 1, measured,
    interpolated between measured budgets (log-perplexity linear in p), or outside the measured range
    the nearest measurement (status "nearest", `budget` naming its own budget), and the label saying which.
    `available`: the conversions the user has (by folder name); when given, ToMoE rows of any other
    conversion are ignored, so every number on a card belongs to a model the user can open.

    Where budget-conditioned conversions were measured, the slider reads one of their curves: the
    named `conversion`'s, else the best-ranked curve whose measured span covers `budget`."""
    pts = points[points["eval_set"] == eval_set]
    dense = pts[pts["kind"] == "dense"]
    dense_ppl = float(dense["perplexity"].iloc[0]) if not dense.empty else None
    dense_lwa = _value(dense.iloc[0], "last_word_accuracy") if not dense.empty else None
    best = _best_baseline(pts, budget, tol)
    if budget >= 1.0 - 1e-9 and dense_ppl is not None:
        d = dense.iloc[0]
        return QualityAtBudget(dense_ppl, _value(d, "kl_to_dense") or 0.0, _value(d, "top1_agreement") or 1.0,
                               dense_ppl, "the dense model (p = 1)", True, None, "dense", 1.0, dense_lwa, dense_lwa)
    tomoe = pts[pts["kind"] == "tomoe"].dropna(subset=["budget", "perplexity"])
    if available is not None:
        tomoe = tomoe[tomoe["conversion"].isin(set(available))]
    conditioned = conditioned_curves(tomoe)
    kind = ""
    if conditioned:  # one conversion serves every budget: the slider reads one conversion's curve
        covering = [n for n, c in conditioned.items() if c["budget"].min() - tol <= budget <= c["budget"].max() + tol]
        name = conversion if conversion in conditioned else (covering or list(conditioned))[0]
        tomoe, kind = conditioned[name], "conditioned "
    tomoe = tomoe.sort_values("perplexity").drop_duplicates("budget").sort_values("budget")
    if tomoe.empty:
        return QualityAtBudget(None, None, None, dense_ppl, "no ToMoE measurement in this evaluation set"
                               + (" of a conversion you have" if available is not None else ""), False, best,
                               "missing", None, None, dense_lwa)
    dist = (tomoe["budget"] - budget).abs()
    near = tomoe.loc[dist.idxmin()]
    if dist.min() <= tol:
        return QualityAtBudget(float(near["perplexity"]), _value(near, "kl_to_dense"), _value(near, "top1_agreement"),
                               dense_ppl, f"measured: {kind}{near['conversion'] or near['variant']} "
                                          f"(p = {near['budget']:g})", True, best, "measured", float(near["budget"]),
                               _value(near, "last_word_accuracy"), dense_lwa)
    below, above = tomoe[tomoe["budget"] < budget], tomoe[tomoe["budget"] > budget]
    if not below.empty and not above.empty:
        lo, hi = below.iloc[-1], above.iloc[0]
        return QualityAtBudget(_interpolate(lo, hi, budget, "perplexity", log=True),
                               _interpolate(lo, hi, budget, "kl_to_dense"),
                               _interpolate(lo, hi, budget, "top1_agreement"), dense_ppl,
                               f"interpolated between measured {kind}p = {lo['budget']:g} and p = {hi['budget']:g}"
                               + (f" ({lo['conversion']})" if kind else ""), False, best, "interpolated", budget,
                               _interpolate(lo, hi, budget, "last_word_accuracy"), dense_lwa)
    lo_b, hi_b = tomoe["budget"].min(), tomoe["budget"].max()
    span = f"{lo_b:g} only" if lo_b == hi_b else f"{lo_b:g}-{hi_b:g}"
    return QualityAtBudget(float(near["perplexity"]), _value(near, "kl_to_dense"), _value(near, "top1_agreement"),
                           dense_ppl, f"p = {budget:g} is outside the measured range (p = {span}): these are the "
                                      f"numbers of the nearest measured {kind}conversion, p = {near['budget']:g}"
                                      + (f" ({near['conversion']})" if kind else ""), False, best, "nearest",
                           float(near["budget"]), _value(near, "last_word_accuracy"), dense_lwa)


def conditioned_curves(points: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The measured curve (one row per budget, the best if repeated) of every budget-conditioned
    conversion in `points`, best first: most budgets measured, then, among curves with as many,
    lowest mean log-perplexity over the budgets they all share (over each one's own where they
    share none). Curves of different conversions are never mixed."""
    cond = points[points["variant"] == "tomoe-conditioned"].dropna(subset=["budget", "perplexity"])
    if cond.empty:
        return {}
    cond = cond.assign(budget_key=cond["budget"].round(4))
    curves = {str(name): df.sort_values("perplexity").drop_duplicates("budget_key").sort_values("budget")
              .drop(columns="budget_key") for name, df in cond.groupby(cond["conversion"].fillna("unnamed"))}
    budgets = {n: set(c["budget"].round(4)) for n, c in curves.items()}

    def score(name: str) -> tuple:
        c = curves[name]
        peers = [b for n, b in budgets.items() if len(b) == len(c)]  # the curves it is ranked against
        shared = set.intersection(*peers)
        on = c[c["budget"].round(4).isin(shared)] if shared else c
        return -len(c), sum(math.log(p) for p in on["perplexity"]) / len(on)

    return {n: curves[n] for n in sorted(curves, key=score)}


def _best_baseline(pts: pd.DataFrame, budget: float, tol: float) -> dict | None:
    base = pts[(pts["kind"] == "baseline")].dropna(subset=["budget", "perplexity"])
    if base.empty:
        return None
    near_budget = base.loc[(base["budget"] - budget).abs().idxmin(), "budget"]
    if abs(near_budget - budget) > tol:
        return None
    row = base[base["budget"] == near_budget].sort_values("perplexity").iloc[0]
    return {"method": row["variant"], "perplexity": float(row["perplexity"]), "budget": float(row["budget"])}


def tomoe_curve(points: pd.DataFrame, eval_set: str, conversion: str | None = None) -> pd.DataFrame:
    """The measured ToMoE quality curve the cards read (the chosen or best budget-conditioned conversion,
    else the best dedicated conversion per budget): columns budget, perplexity, ratio (to dense)."""
    pts = points[points["eval_set"] == eval_set]
    dense = pts[pts["kind"] == "dense"]
    tomoe = pts[pts["kind"] == "tomoe"].dropna(subset=["budget", "perplexity"])
    curves = conditioned_curves(tomoe)
    if curves:
        tomoe = curves[conversion] if conversion in curves else next(iter(curves.values()))
    tomoe = tomoe.sort_values("perplexity").drop_duplicates("budget").sort_values("budget")
    out = tomoe[["budget", "perplexity"]].reset_index(drop=True)
    dense_ppl = float(dense["perplexity"].iloc[0]) if not dense.empty else math.nan
    return out.assign(ratio=out["perplexity"] / dense_ppl)
