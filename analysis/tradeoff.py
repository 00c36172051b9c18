"""Quality against cost: the cost model behind the budget explorer, KPIs at any budget, the Pareto figure.

Everything here is derived from files (conversion metadata, quality and speed results), not
from loaded networks, so the landing page renders without touching torch.

Cost model. A conversion's accounting (`tomoe_core.budget.ParamReport`, stored in tomoe.json)
splits the parameters multiplied per token into attention, MLP, lm_head and other. Only the MLP
scales with the budget p:  active(p) = attention + p * mlp_dense + lm_head + other,  and
FLOPs(p) = 2 * (attention + p * mlp_dense + lm_head) + attention-score FLOPs at the stated context.

Bandwidth-bound decode estimate (batch 1). Decoding one token reads every active weight once,
so tokens/s <= memory bandwidth / (active parameters * bytes per parameter). KV-cache reads,
kernel launch overheads and compute limits are ignored: a ceiling, labelled as an estimate.

Per-token baselines (quality benchmark). TEAL- and CATS-style sparsity pick a different set of MLP
weights for every token by magnitude thresholds, with no training (kind "dynamic, training-free");
their active parameters are the MLP weights the held-out tokens used, on average. The oracle keeps
each token's p * I most useful channels knowing all of its activations: a ceiling that no runnable
method reaches, drawn dashed and left off the Pareto front.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd
import plotly.graph_objects as go

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


# -- hardware and cost ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Hardware:
    name: str
    bandwidth_gb_s: float  # peak memory bandwidth, vendor data sheet
    price_per_hour: float  # a typical on-demand cloud price in USD; the user edits it


HARDWARE = (
    Hardware("NVIDIA H100 SXM 80GB", 3350, 2.50),
    Hardware("NVIDIA H200 141GB", 4800, 3.50),
    Hardware("NVIDIA A100 SXM 80GB", 2039, 1.50),
    Hardware("NVIDIA L4 24GB", 300, 0.70),
    Hardware("NVIDIA T4 16GB", 320, 0.35),
    Hardware("Apple M2 Max", 400, 0.0),
    Hardware("Server CPU, 8-channel DDR5", 300, 1.00),
)
BYTES_PER_PARAM = {"bf16 / fp16": 2.0, "fp32": 4.0, "int8": 1.0, "4-bit": 0.5625}  # q4: 4.5 bits with scales


def bandwidth_bound_tokens_per_s(active_params: float, bytes_per_param: float, bandwidth_gb_s: float) -> float:
    """Batch-1 decode ceiling: every active weight is read once per token."""
    return bandwidth_gb_s * 1e9 / (active_params * bytes_per_param)


def weights_memory_mb(cost: CostModel, bytes_per_param: float) -> float:
    """Weights held in memory by the shared layout: every union channel once (ToMoE keeps nearly all
    channels, so about the dense size); lm_head counted apart only when it is not tied to the embeddings."""
    tied = cost.lm_head == cost.embeddings
    stored = cost.embeddings + cost.attention + cost.mlp_dense + cost.other + (0 if tied else cost.lm_head)
    return stored * bytes_per_param / 2**20


def cost_per_million_tokens(tokens_per_s: float, price_per_hour: float) -> float:
    if not tokens_per_s or tokens_per_s <= 0:
        return math.nan
    return price_per_hour / (tokens_per_s * 3600) * 1e6


# -- quality points from result files ------------------------------------------------------------

POINT_COLUMNS = ["eval_set", "model", "variant", "kind", "method", "budget", "perplexity", "kl_to_dense",
                 "top1_agreement", "active_params", "source", "conversion"]
ABLATION_PREFIXES = ("tomoe-random", "tomoe-fixed")


def variant_kind(variant: str) -> str:
    if variant == "dense":
        return "dense"
    if variant.startswith(ABLATION_PREFIXES):
        return "ablation"
    if variant.startswith("tomoe"):
        return "tomoe"
    return "baseline"


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
                     "top1_agreement": r.get("top1_agreement"), "active_params": active,
                     "source": source, "conversion": conv_name if kind in ("tomoe", "ablation", "fallback") else None})
    return rows


_BENCHMARK_KINDS = {"tomoe": "tomoe", "fallback": "fallback", "ablation": "ablation", "baseline": "baseline",
                    "external-baseline": "baseline", "dynamic, training-free": "dynamic, training-free",
                    "ceiling": "ceiling"}
# per-token baselines of the quality benchmark: a different channel set per token, no training; the
# oracle needs every activation to choose its channels, so it is a ceiling, not something one can run
DYNAMIC_LABELS = {"teal": "TEAL-style", "cats": "CATS-style", "oracle": "oracle per-token top-k channels"}
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
                     "active_params": cost.dense_params if cost else None, "source": source, "conversion": None})
    for r in res["rows"]:
        kind = _BENCHMARK_KINDS.get(str(r.get("kind")), "baseline")
        ratio = r.get("active_mlp_ratio") or r.get("budget")
        method = str(r.get("method"))
        rows.append({"eval_set": label, "model": model, "variant": method, "kind": kind,
                     "method": TOMOE_METHOD_LABELS.get(method, method), "budget": r.get("budget"),
                     "perplexity": r.get("perplexity"), "kl_to_dense": r.get("kl_to_dense"),
                     "top1_agreement": r.get("top1_agreement"),
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


def _interpolate(lo: pd.Series, hi: pd.Series, budget: float, key: str, log: bool = False) -> float:
    t = (budget - lo["budget"]) / (hi["budget"] - lo["budget"])
    a, b = float(lo[key]), float(hi[key])
    if log:
        return math.exp((1 - t) * math.log(a) + t * math.log(b))
    return (1 - t) * a + t * b


def quality_at_budget(points: pd.DataFrame, eval_set: str, budget: float, tol: float = 0.011,
                      conversion: str | None = None) -> QualityAtBudget:
    """ToMoE quality at `budget` in one evaluation set: measured, interpolated between measured
    budgets (log-perplexity linear in p), or the nearest measurement, and the label saying which.

    Where budget-conditioned conversions were measured, the slider reads one of their curves: the
    named `conversion`'s, else the best-ranked curve whose measured span covers `budget`."""
    pts = points[points["eval_set"] == eval_set]
    dense = pts[pts["kind"] == "dense"]
    dense_ppl = float(dense["perplexity"].iloc[0]) if not dense.empty else None
    tomoe = pts[pts["kind"] == "tomoe"].dropna(subset=["budget", "perplexity"])
    conditioned = conditioned_curves(tomoe)
    kind = ""
    if conditioned:  # one conversion serves every budget: the slider reads one conversion's curve
        covering = [n for n, c in conditioned.items() if c["budget"].min() - tol <= budget <= c["budget"].max() + tol]
        name = conversion if conversion in conditioned else (covering or list(conditioned))[0]
        tomoe, kind = conditioned[name], "conditioned "
    tomoe = tomoe.sort_values("perplexity").drop_duplicates("budget").sort_values("budget")
    best = _best_baseline(pts, budget, tol)
    if tomoe.empty:
        return QualityAtBudget(None, None, None, dense_ppl, "no ToMoE measurement in this evaluation set", False, best)
    dist = (tomoe["budget"] - budget).abs()
    near = tomoe.loc[dist.idxmin()]
    if dist.min() <= tol:
        return QualityAtBudget(float(near["perplexity"]), float(near["kl_to_dense"]), float(near["top1_agreement"]),
                               dense_ppl, f"measured: {kind}{near['conversion'] or near['variant']} "
                                          f"(p = {near['budget']:g})", True, best)
    below, above = tomoe[tomoe["budget"] < budget], tomoe[tomoe["budget"] > budget]
    if not below.empty and not above.empty:
        lo, hi = below.iloc[-1], above.iloc[0]
        return QualityAtBudget(_interpolate(lo, hi, budget, "perplexity", log=True),
                               _interpolate(lo, hi, budget, "kl_to_dense"),
                               _interpolate(lo, hi, budget, "top1_agreement"), dense_ppl,
                               f"interpolated between measured {kind}p = {lo['budget']:g} and p = {hi['budget']:g}"
                               + (f" ({lo['conversion']})" if kind else ""), False, best)
    return QualityAtBudget(float(near["perplexity"]), float(near["kl_to_dense"]), float(near["top1_agreement"]),
                           dense_ppl, f"not measured at p = {budget:g}: nearest {kind}conversion is p = "
                                      f"{near['budget']:g}" + (f" ({near['conversion']})" if kind else ""), False, best)


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


# -- speed results -------------------------------------------------------------------------------


SPEED_COLUMNS = ["model", "machine", "layout", "batch", "budget", "decode_tokens_per_s", "prefill_tokens_per_s",
                 "peak_memory_mb", "peak_memory_kind", "source"]


def speed_rows(results: dict[str, dict]) -> pd.DataFrame:
    """Measured speed rows of speed-benchmark files (`kind: speed`, `python -m benchmarks.speed`)."""
    rows = []
    for source, res in results.items():
        if res.get("kind") != "speed":
            continue
        machine = res.get("machine") or {}
        for r in res.get("rows") or []:
            # one file may hold several thread counts (`--threads 1 2`): each row names its own
            threads = {"torch_threads": r["threads"]} if r.get("threads") else {}
            rows.append({"model": str(res.get("model")), "machine": _machine_label({**machine, **threads}, res.get("dtype")),
                         "layout": r.get("layout") or "dense",
                         "batch": r.get("batch", 1), "budget": r.get("budget"),
                         "decode_tokens_per_s": r.get("decode_tokens_per_s"),
                         "prefill_tokens_per_s": r.get("prefill_tokens_per_s"),
                         "peak_memory_mb": r.get("peak_memory_mb"), "peak_memory_kind": r.get("peak_memory_kind"),
                         "source": source})
    return pd.DataFrame(rows, columns=SPEED_COLUMNS)


def _machine_label(machine: dict, dtype: str | None = None) -> str:
    if machine.get("gpu"):
        label = str(machine["gpu"])
    elif machine.get("cpu_count"):
        label = f"CPU, {machine['cpu_count']} cores, {machine.get('torch_threads')} torch threads"
    else:
        label = str(machine.get("platform", "unknown machine"))
    return f"{label}, {dtype}" if dtype else label


@dataclass
class Measured:
    tokens_per_s: float | None
    peak_memory_mb: float | None
    label: str  # machine, layout, budget the numbers were measured at, or how they were interpolated


def measured_speed(speed: pd.DataFrame, budget: float, tol: float = 0.011) -> Measured | None:
    """Batch-1 decode speed at `budget` from the fastest measured layout: measured within `tol`,
    interpolated between the nearest measured budgets, or None outside them."""
    if speed is None or speed.empty:
        return None
    rows = speed.dropna(subset=["budget", "decode_tokens_per_s"])
    rows = rows[rows["batch"].fillna(1) == rows["batch"].fillna(1).min()]
    if rows.empty:
        return None
    best = (rows.sort_values("decode_tokens_per_s", ascending=False).drop_duplicates("budget")
            .sort_values("budget").reset_index(drop=True))
    machine = best["machine"].iloc[0]
    dist = (best["budget"] - budget).abs()
    if dist.min() <= tol:
        r = best.loc[dist.idxmin()]
        mem = None if pd.isna(r["peak_memory_mb"]) else float(r["peak_memory_mb"])
        kind = f" ({r['peak_memory_kind']})" if isinstance(r["peak_memory_kind"], str) else ""
        return Measured(float(r["decode_tokens_per_s"]), mem,
                        f"measured on {machine}: batch-1 greedy decode, fastest layout ({r['layout']}) at "
                        f"p = {r['budget']:g}; memory{kind}; {r['source']}")
    below, above = best[best["budget"] < budget], best[best["budget"] > budget]
    if below.empty or above.empty:
        return None
    lo, hi = below.iloc[-1], above.iloc[0]
    t = (budget - lo["budget"]) / (hi["budget"] - lo["budget"])
    tps = (1 - t) * lo["decode_tokens_per_s"] + t * hi["decode_tokens_per_s"]
    mems = [lo["peak_memory_mb"], hi["peak_memory_mb"]]
    mem = None if any(pd.isna(m) for m in mems) else (1 - t) * mems[0] + t * mems[1]
    return Measured(float(tps), mem, f"interpolated between measurements on {machine} at p = {lo['budget']:g} "
                                     f"({lo['layout']}) and p = {hi['budget']:g} ({hi['layout']}); {lo['source']}")


# -- figures -------------------------------------------------------------------------------------

KIND_STYLE = {
    "dense": dict(color="#1f2937", symbol="star", size=16),
    "tomoe": dict(color="#4338ca", symbol="circle", size=12),
    "ablation": dict(color="#a5b4fc", symbol="circle-open", size=10),
    "conditioned": dict(color="#7c3aed", symbol="star-diamond", size=12),
    "fallback": dict(color="#c4b5fd", symbol="circle-dot", size=10),
    "dynamic": dict(color="#0e7490", symbol="hexagon", size=10),
    "ceiling": dict(color="#6b7280", symbol="line-ew-open", size=12),
}
DYNAMIC_STYLES = {"teal": dict(color="#0e7490", symbol="hexagon", size=10),
                  "cats": dict(color="#be185d", symbol="pentagon", size=10)}
BASELINE_COLORS = ["#d97706", "#059669", "#dc2626", "#0891b2", "#9333ea", "#65a30d"]
BASELINE_SYMBOLS = ["square", "diamond", "triangle-up", "cross", "x", "pentagon"]


def pareto_front(points: pd.DataFrame) -> pd.DataFrame:
    """Points not dominated (fewer or equal active params and lower perplexity), by active params."""
    pts = points.dropna(subset=["active_params", "perplexity"]).sort_values(["active_params", "perplexity"])
    front, best = [], math.inf
    for idx, row in pts.iterrows():
        if row["perplexity"] < best:
            front.append(idx)
            best = row["perplexity"]
    return pts.loc[front]


def pareto_figure(points: pd.DataFrame, eval_set: str | None = None, budget: float | None = None,
                  cost: CostModel | None = None) -> go.Figure:
    """Held-out perplexity (log) against active parameters per token: dense, every ToMoE conversion,
    its routing ablations, every static pruning baseline, the per-token training-free baselines and the
    per-token oracle as a labelled ceiling (left off the Pareto front), with the front and the slider's budget."""
    pts = points if eval_set is None else points[points["eval_set"] == eval_set]
    pts = pts.dropna(subset=["active_params", "perplexity"])
    fig = go.Figure()

    def hover(df: pd.DataFrame) -> list[str]:
        return [f"<b>{r.variant}</b>{' · ' + r.conversion if isinstance(r.conversion, str) else ''}<br>"
                f"budget p = {r.budget:g}<br>active params {r.active_params / 1e6:.1f} M<br>"
                f"perplexity {r.perplexity:.2f}<br>KL to dense {r.kl_to_dense:.3f}<br>"
                f"top-1 agreement {r.top1_agreement:.1%}<br><i>{r.source}</i>" for r in df.itertuples()]

    groups = [("Dense", pts[pts["kind"] == "dense"], KIND_STYLE["dense"], True),
              ("ToMoE", pts[(pts["kind"] == "tomoe") & (pts["variant"] != "tomoe-conditioned")]
               .sort_values("active_params"), KIND_STYLE["tomoe"], True),
              *_conditioned_groups(pts),
              ("ToMoE, threshold moved (no retraining)", pts[pts["kind"] == "fallback"].sort_values("active_params"),
               KIND_STYLE["fallback"], "legendonly"),
              ("ToMoE, random or fixed routing (ablation)", pts[pts["kind"] == "ablation"], KIND_STYLE["ablation"],
               "legendonly")]
    baselines = sorted(pts.loc[pts["kind"] == "baseline", "variant"].unique())
    for i, method in enumerate(baselines):
        style = dict(color=BASELINE_COLORS[i % len(BASELINE_COLORS)], symbol=BASELINE_SYMBOLS[i % 6], size=11)
        groups.append((f"static pruning: {method}", pts[pts["variant"] == method].sort_values("active_params"),
                       style, True))
    for method in sorted(pts.loc[pts["kind"] == "dynamic, training-free", "variant"].unique()):
        groups.append((f"dynamic, training-free: {DYNAMIC_LABELS.get(method, method)}",
                       pts[pts["variant"] == method].sort_values("active_params"),
                       DYNAMIC_STYLES.get(method, KIND_STYLE["dynamic"]), True))
    for method in sorted(pts.loc[pts["kind"] == "ceiling", "variant"].unique()):
        groups.append((f"ceiling: {DYNAMIC_LABELS.get(method, method)} (not a runnable method)",
                       pts[pts["variant"] == method].sort_values("active_params"), KIND_STYLE["ceiling"], True))
    for name, df, style, visible in groups:
        if df.empty:
            continue
        lines = name.startswith("ToMoE,") and "ablation" not in name or name == "ToMoE" or \
            name.startswith(("static", "dynamic", "ceiling")) and len(df) > 1
        fig.add_trace(go.Scatter(
            x=df["active_params"] / 1e6, y=df["perplexity"], name=name, visible=visible,
            mode="lines+markers" if lines and len(df) > 1 else "markers",
            marker=dict(color=style["color"], symbol=style["symbol"], size=style["size"],
                        line=dict(width=1, color="white")),
            line=dict(color=style["color"], width=2 if name == "ToMoE" else 1,
                      dash=None if name == "ToMoE" else "dash" if name.startswith("ceiling") else "dot"),
            hovertext=hover(df), hoverinfo="text"))
    if not (ceiling := pts[pts["kind"] == "ceiling"]).empty:  # label the ceiling where it ends, on the chart
        end = ceiling.loc[ceiling["active_params"].idxmin()]
        fig.add_annotation(x=end["active_params"] / 1e6, y=math.log10(end["perplexity"]), text="ceiling",
                           showarrow=False, yshift=-12, font=dict(color=KIND_STYLE["ceiling"]["color"], size=11))
    front = pareto_front(pts[~pts["kind"].isin(("ablation", "fallback", "ceiling"))])
    if len(front) > 1:
        fig.add_trace(go.Scatter(x=front["active_params"] / 1e6, y=front["perplexity"], name="Pareto front",
                                 mode="lines", line=dict(color="rgba(67,56,202,0.25)", width=10), hoverinfo="skip"))
    if budget is not None and cost is not None:
        x = cost.active_params(budget) / 1e6
        fig.add_vline(x=x, line=dict(color="#4338ca", dash="dash", width=1.5),
                      annotation_text=f"p = {budget:.2f}", annotation_position="top")
    fig.update_layout(
        xaxis_title="active parameters per token (millions)", yaxis_title="held-out perplexity (log scale)",
        yaxis_type="log", height=440, margin=dict(l=10, r=10, t=40, b=10), hovermode="closest",
        legend=dict(orientation="h", yanchor="top", y=-0.18, x=0), template="plotly_white")
    fig.update_yaxes(**log_ticks(pts["perplexity"]))
    if pts.empty:
        fig.add_annotation(text="no quality results yet: run `python -m tomoe_core evaluate CONVERSION`",
                           showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5)
    return fig


def _conditioned_groups(pts: pd.DataFrame) -> list[tuple]:
    """One chart series per conditioned conversion (the best one drawn in full colour, others fainter)."""
    curves = conditioned_curves(pts)
    if len(curves) == 1:
        return [("ToMoE, one budget-conditioned conversion", next(iter(curves.values())).sort_values("active_params"),
                 KIND_STYLE["conditioned"], True)]
    return [(f"ToMoE, budget-conditioned: {name}", df.sort_values("active_params"),
             KIND_STYLE["conditioned"] if i == 0 else {**KIND_STYLE["conditioned"], "color": "#c4b5fd", "size": 9},
             True) for i, (name, df) in enumerate(curves.items())]


def log_ticks(values: pd.Series) -> dict:
    """1-2-5 ticks with plain labels for a log axis (plotly's own minor labels read '2', '5')."""
    vals = pd.to_numeric(values, errors="coerce").dropna()
    vals = vals[vals > 0]
    if vals.empty:
        return {}
    lo, hi = math.floor(math.log10(vals.min())), math.ceil(math.log10(vals.max()))
    steps = (1, 2, 5) if hi - lo <= 3 else (1,)  # a wide range gets one tick per decade
    ticks = [m * 10 ** e for e in range(lo, hi + 1) for m in steps]
    ticks = [t for t in ticks if vals.min() / 2.5 <= t <= vals.max() * 2.5]
    return {"tickvals": ticks, "ticktext": [f"{t:,.0f}" if t >= 1 else f"{t:g}" for t in ticks]}


def format_params(n: float) -> str:
    return f"{n / 1e9:.3g} B" if n >= 1e9 else f"{n / 1e6:.4g} M"


def format_flops(n: float) -> str:
    return f"{n / 1e9:.3g} G" if n >= 1e9 else f"{n / 1e6:.4g} M"


def format_usd(x: float) -> str:
    return "—" if x is None or math.isnan(x) else (f"${x:,.2f}" if x >= 10 else f"${x:.3g}")
