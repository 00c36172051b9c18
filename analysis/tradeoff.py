"""Quality against cost: the cost model behind the budget explorer, KPIs at any budget, the Pareto figure.

Everything here is derived from files (conversion metadata, quality and speed results), not
from loaded networks, so the landing page renders without touching torch.

Cost model. A conversion's accounting (`tomoe_core.budget.ParamReport`, stored in tomoe.json)
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
linear in p), dense at p = 1, or, outside the measured range, the nearest measurement shown as
outside the measured range, the nearest measurement, its own budget named on the card.
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
DYNAMIC_KINDS = {"teal": "dynamic, training-free", "cats": "dynamic, training-free", "oracle": "ceiling"}


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
    span = f"{tomoe['budget'].min():g}-{tomoe['budget'].max():g}"
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


# -- speed results -------------------------------------------------------------------------------

# The files `python -m benchmarks.speed` (and `benchmarks.gpu_speed`) write: one per machine, dense and
# every budget measured in one run under one protocol. The cards read one of these, never a mix.
SPEED_FILES = ("speed_benchmark.json", "speed_benchmark-cuda.json")
SPEED_COLUMNS = ["model", "machine", "layout", "threads", "batch", "budget", "decode_tokens_per_s",
                 "decode_speedup_iqr", "prefill_tokens_per_s", "peak_memory_mb", "peak_memory_kind", "source"]


def speed_sources(results: dict[str, dict]) -> list[str]:
    """Names of the speed benchmark files among `results` (local before shipped, as `list_results` keys them)."""
    names = [n for n, r in results.items() if r.get("kind") == "speed" and n.rsplit("/", 1)[-1] in SPEED_FILES]
    return sorted(names, key=lambda n: (n.startswith("shipped/"), SPEED_FILES.index(n.rsplit("/", 1)[-1])))


def speed_rows(results: dict[str, dict], source: str | None = None) -> pd.DataFrame:
    """Measured rows of one speed benchmark file (`source`, default the first of `speed_sources`)."""
    sources = speed_sources(results)
    source = source if source in sources else (sources[0] if sources else None)
    rows = []
    res = results.get(source) or {}
    machine = res.get("machine") or {}
    settings_threads = (res.get("settings") or {}).get("threads")
    for r in res.get("rows") or []:
        threads = r.get("threads") or (settings_threads if isinstance(settings_threads, int) else None) \
            or machine.get("torch_threads")
        rows.append({"model": str(res.get("model")), "machine": _machine_label(machine, res.get("dtype")),
                     "layout": r.get("layout") or "dense", "threads": threads, "batch": r.get("batch", 1),
                     "budget": r.get("budget"), "decode_tokens_per_s": r.get("decode_tokens_per_s"),
                     "decode_speedup_iqr": r.get("decode_speedup_iqr"),
                     "prefill_tokens_per_s": r.get("prefill_tokens_per_s"), "peak_memory_mb": r.get("peak_memory_mb"),
                     "peak_memory_kind": r.get("peak_memory_kind"), "source": source})
    return pd.DataFrame(rows, columns=SPEED_COLUMNS)


def _machine_label(machine: dict, dtype: str | None = None) -> str:
    if machine.get("gpu"):
        label = str(machine["gpu"])
    elif machine.get("cpu_count"):
        label = f"CPU, {machine['cpu_count']} cores"
    else:
        label = str(machine.get("platform", "unknown machine"))
    return f"{label}, {dtype}" if dtype else label


def speed_choices(speed: pd.DataFrame) -> dict[str, list]:
    """The layouts (dense excluded), thread counts and batch sizes a speed file measured."""
    if speed is None or speed.empty:
        return {"layouts": [], "threads": [], "batches": []}
    layouts = [lay for lay in dict.fromkeys(speed["layout"]) if lay != "dense"]
    return {"layouts": layouts, "threads": sorted(int(t) for t in speed["threads"].dropna().unique()),
            "batches": sorted(int(b) for b in speed["batch"].dropna().unique())}


@dataclass
class CurveValue:
    value: float | None
    status: str  # "dense", "measured", "interpolated", "estimate" or "missing"
    how: str  # in words: which measurements gave the value


def curve_value(points: list[tuple[float, float]], dense: float | None, budget: float,
                tol: float = 0.011) -> CurveValue:
    """A quantity measured at some budgets (and for dense at p = 1) read at `budget`: dense at p = 1,
    measured within `tol`, linear between measured budgets ("interpolated"), and outside the measured
    range an "estimate": linear through the two nearest points, dense counting as p = 1 (so between the
    highest measured budget and 1 it moves towards dense). Never a neighbour's value as this budget's."""
    pts = sorted((float(b), float(v)) for b, v in points if b is not None and v is not None and not pd.isna(v))
    if budget >= 1.0 - 1e-9:
        return CurveValue(dense, "dense", "the dense model") if dense is not None else \
            CurveValue(None, "missing", "dense not measured")
    if not pts:
        return CurveValue(None, "missing", "no measurement of this layout")
    near = min(pts, key=lambda bv: abs(bv[0] - budget))
    if abs(near[0] - budget) <= tol:
        return CurveValue(near[1], "measured", f"measured at p = {near[0]:g}")
    lo, hi = pts[0][0], pts[-1][0]
    if lo < budget < hi:
        a = max(bv for bv in pts if bv[0] < budget)
        b = min(bv for bv in pts if bv[0] > budget)
        return CurveValue(_line(a, b, budget), "interpolated", f"interpolated between measured p = {a[0]:g} and {b[0]:g}")
    span = f"p = {lo:g}" if lo == hi else f"p = {lo:g}-{hi:g}"
    anchors = pts + ([(1.0, float(dense))] if dense is not None else [])
    if len(anchors) < 2:
        return CurveValue(None, "missing", f"outside the measured range ({span}) and nothing to estimate from")
    a, b = (anchors[0], anchors[1]) if budget < lo else (anchors[-2], anchors[-1])
    value = max(_line(a, b, budget), 0.05 * min(abs(a[1]), abs(b[1])))
    through = "dense (p = 1)" if b[0] == 1.0 and dense is not None else f"p = {b[0]:g}"
    return CurveValue(value, "estimate", f"estimate outside the measured range ({span}): linear through "
                                         f"p = {a[0]:g} and {through}")


def _line(a: tuple[float, float], b: tuple[float, float], x: float) -> float:
    t = (x - a[0]) / (b[0] - a[0])
    return (1 - t) * a[1] + t * b[1]


@dataclass
class SpeedAtBudget:
    tokens_per_s: CurveValue
    memory_mb: CurveValue
    dense_tokens_per_s: float | None
    dense_memory_mb: float | None
    setting: str  # machine, layout, threads, batch, file
    speedup_iqr: list | None = None  # [q1, q3] of the paired per-repeat speed ratios to dense, where measured
    memory_kind: str | None = None  # what the peak memory is (peak RSS of a fresh process ...)


def speed_at_budget(speed: pd.DataFrame, budget: float, layout: str, threads: int | None, batch: int,
                    tol: float = 0.011) -> SpeedAtBudget:
    """Greedy-decode tokens/s (all sequences of the batch) and peak memory of one layout at one thread count
    and batch size, from one speed file (`speed_rows`), at any budget (`curve_value`). Peak memory was
    measured once per variant and batch (the benchmark's first thread count): it is taken from any
    thread count's row."""
    sel = speed[(speed["batch"].fillna(1).astype(int) == int(batch))]
    at_threads = sel if threads is None else sel[sel["threads"] == threads]
    dense_t = at_threads[at_threads["layout"] == "dense"]["decode_tokens_per_s"].dropna()
    dense_m = sel[sel["layout"] == "dense"]["peak_memory_mb"].dropna()
    conv = at_threads[at_threads["layout"] == layout]
    mem = sel[sel["layout"] == layout].dropna(subset=["peak_memory_mb"]).drop_duplicates("budget")
    dense_tps = float(dense_t.iloc[0]) if not dense_t.empty else None
    dense_mb = float(dense_m.iloc[0]) if not dense_m.empty else None
    tps = curve_value(list(zip(conv["budget"], conv["decode_tokens_per_s"])), dense_tps, budget, tol)
    memory = curve_value(list(zip(mem["budget"], mem["peak_memory_mb"])), dense_mb, budget, tol)
    machine = speed["machine"].iloc[0] if not speed.empty else "?"
    source = speed["source"].iloc[0] if not speed.empty else "?"
    thread_words = "" if threads is None else f", {threads} thread{'s' if threads != 1 else ''}"
    setting = f"{machine}, {layout} layout{thread_words}, batch {batch}; {source}"
    iqr = None
    if tps.status == "measured":
        at = conv[(conv["budget"] - budget).abs() <= tol]["decode_speedup_iqr"]
        iqr = at.iloc[0] if not at.empty and isinstance(at.iloc[0], (list, tuple)) else None
    kinds = sel["peak_memory_kind"].dropna()
    return SpeedAtBudget(tps, memory, dense_tps, dense_mb, setting, iqr, str(kinds.iloc[0]) if not kinds.empty else None)


def relative_delta(value: float | None, reference: float | None, what: str = "vs dense") -> str | None:
    """'+17% vs dense' / '-29% vs dense' (the sign decides the colour st.metric gives it), 'same as dense'
    within half a percent, or None where there is nothing to compare."""
    if value is None or reference is None or not reference or any(map(math.isnan, (value, reference))):
        return None
    change = value / reference - 1
    return f"same as {what.removeprefix('vs ')}" if abs(change) < 0.005 else f"{change:+.0%} {what}"


def metric_delta(value: float | None, reference: float | None, lower_is_better: bool) -> dict:
    """`delta` and `delta_color` for st.metric: green only for a saving or a gain (lower cost, memory,
    FLOPs, perplexity; higher speed), red for a loss, grey when equal or not comparable."""
    text = relative_delta(value, reference)
    if text is None or text.startswith("same"):
        return {"delta": text, "delta_color": "off", "delta_arrow": "off"}
    return {"delta": text, "delta_color": "inverse" if lower_is_better else "normal"}


def format_mb(mb: float | None) -> str:
    if mb is None or (isinstance(mb, float) and math.isnan(mb)):
        return "—"
    return f"{mb / 1024:.2f} GiB" if mb >= 1024 else f"{mb:,.0f} MiB"


# -- figures -------------------------------------------------------------------------------------

KIND_STYLE = {
    "dense": dict(color="#1f2937", symbol="star", size=18),
    "tomoe": dict(color="#4338ca", symbol="circle", size=11),
    "ablation": dict(color="#a5b4fc", symbol="circle-open", size=10),
    "conditioned": dict(color="#7c3aed", symbol="star-diamond", size=13),
    "other-conditioned": dict(color="#c4b5fd", symbol="star-diamond-open", size=9),
    "fallback": dict(color="#c4b5fd", symbol="circle-dot", size=10),
    "dynamic": dict(color="#0e7490", symbol="hexagon", size=10),
    "ceiling": dict(color="#6b7280", symbol="line-ew-open", size=12),
}
DYNAMIC_STYLES = {"teal": dict(color="#0e7490", symbol="hexagon", size=10),
                  "cats": dict(color="#be185d", symbol="pentagon", size=10)}
BASELINE_STYLES = {"wanda-sp": dict(color="#d97706", symbol="square", size=10),
                   "flap": dict(color="#059669", symbol="diamond", size=11),
                   "magnitude": dict(color="#dc2626", symbol="triangle-up", size=10),
                   "torch-pruning": dict(color="#9333ea", symbol="x", size=10)}
BASELINE_COLORS = ["#0891b2", "#65a30d", "#b45309", "#7c2d12"]
BASELINE_SYMBOLS = ["cross", "pentagon", "triangle-down", "hourglass"]
# legend names a reader knows; the result files' method names stay in the hover text
METHOD_NAMES = {"wanda-sp": "Wanda-sp (static pruning)", "flap": "FLAP (static pruning)",
                "magnitude": "Magnitude (static pruning)", "torch-pruning": "Torch-Pruning (static pruning)",
                "teal": "TEAL-style (training-free, per token)", "cats": "CATS-style (training-free, per token)",
                "oracle": "Oracle per-token top-k (ceiling)"}
CATASTROPHIC_RATIO = 10.0  # a method worse than this multiple of dense perplexity at every budget it was measured
CLIP_RATIO = 100.0  # with catastrophic methods shown, the axis stops here and worse points sit on its edge


def method_name(variant: str) -> str:
    return METHOD_NAMES.get(variant, variant)


def pareto_front(points: pd.DataFrame, y: str = "perplexity", x_tol: float = 0.0) -> pd.DataFrame:
    """Points not dominated (fewer or equal active params and lower `y`), by active params. With `x_tol`,
    active params within that relative distance count as equal (a per-token method that used 0.1 % fewer
    weights than ToMoE at the same budget does not make the front drop vertically there)."""
    pts = points.dropna(subset=["active_params", y]).sort_values(["active_params", y])
    front, best = [], math.inf
    for idx, row in pts.iterrows():
        if row[y] < best:
            front.append(idx)
            best = row[y]
    out = pts.loc[front]
    if x_tol > 0:
        xs, ys = pts["active_params"].to_numpy(), pts[y].to_numpy()
        out = out[[not ((xs <= x * (1 + x_tol)) & (ys < v)).any() for x, v in zip(out["active_params"], out[y])]]
    return out


def catastrophic_methods(points: pd.DataFrame, dense_perplexity: float | None,
                         ratio: float = CATASTROPHIC_RATIO) -> list[str]:
    """Baselines whose perplexity exceeds `ratio` x dense at every budget measured (magnitude pruning, say)."""
    if not dense_perplexity:
        return []
    base = points[points["kind"].isin(("baseline", "dynamic, training-free"))].dropna(subset=["perplexity"])
    worst = base.groupby("variant")["perplexity"].min()
    return sorted(worst[worst > ratio * dense_perplexity].index)


def pareto_figure(points: pd.DataFrame, eval_set: str | None = None, budget: float | None = None,
                  cost: CostModel | None = None, show_catastrophic: bool = False,
                  conversion: str | None = None) -> go.Figure:
    """Perplexity relative to dense (log axis) against active parameters per token: dense (marked),
    ToMoE (the budget-conditioned conversion the cards read, dedicated conversions per budget), static
    pruning and per-token training-free baselines, and the per-token oracle as a dashed ceiling; the
    Pareto front over the series shown (never the ceiling, the ablations or hidden series). Baselines
    worse than CATASTROPHIC_RATIO x dense everywhere are left out unless `show_catastrophic`; then the
    axis is clipped at CLIP_RATIO x dense and worse points sit on its edge (their hover gives the value)."""
    pts = points if eval_set is None else points[points["eval_set"] == eval_set]
    pts = pts.dropna(subset=["active_params", "perplexity"])
    dense_ppl = float(pts.loc[pts["kind"] == "dense", "perplexity"].iloc[0]) if (pts["kind"] == "dense").any() else None
    pts = pts.assign(ratio=pts["perplexity"] / dense_ppl if dense_ppl else pts["perplexity"])
    dense_rows = pts[pts["kind"] == "dense"]
    hidden = set() if show_catastrophic else set(catastrophic_methods(pts, dense_ppl))
    clip = CLIP_RATIO if dense_ppl else math.inf
    fig = go.Figure()

    def hover(df: pd.DataFrame) -> list[str]:
        def num(r: dict, key: str):
            v = r.get(key)
            return None if v is None or pd.isna(v) else float(v)

        out = []
        for r in df.to_dict("records"):
            name = r.get("method") if r.get("kind") == "tomoe" and isinstance(r.get("method"), str) else \
                method_name(str(r.get("variant")))
            kl, top1, lwa = num(r, "kl_to_dense"), num(r, "top1_agreement"), num(r, "last_word_accuracy")
            out.append(
                f"<b>{name}</b>{' · ' + r['conversion'] if isinstance(r.get('conversion'), str) else ''}<br>"
                f"budget p = {r['budget']:g}<br>active params {r['active_params'] / 1e6:.1f} M<br>"
                f"perplexity {r['perplexity']:,.2f}" + (f" ({r['ratio']:,.2f}x dense)" if dense_ppl else "")
                + (f"<br>KL to dense {kl:.3f}" if kl is not None else "")
                + (f"<br>top-1 agreement {top1:.1%}" if top1 is not None else "")
                + (f"<br>last-word accuracy {lwa:.1%}" if lwa is not None else "")
                + (f"<br><i>{r['source']}</i>" if isinstance(r.get("source"), str) else ""))
        return out

    curves = conditioned_curves(pts)
    main = conversion if conversion in curves else next(iter(curves), None)
    others = pd.concat([c for n, c in curves.items() if n != main]) if len(curves) > 1 else pts.iloc[:0]
    dedicated = pts[(pts["kind"] == "tomoe") & (pts["variant"] != "tomoe-conditioned")]
    groups = [  # (legend name, rows, style, visible, draw a line, on the front)
        ("Dense", dense_rows, KIND_STYLE["dense"], True, False, True),
        ("ToMoE (one conversion, any budget)", curves[main].sort_values("active_params") if main else pts.iloc[:0],
         KIND_STYLE["conditioned"], True, True, True),
        ("ToMoE (one conversion per budget)", dedicated.sort_values("active_params"), KIND_STYLE["tomoe"], True,
         False, True),
        ("ToMoE, other budget-conditioned conversions", others, KIND_STYLE["other-conditioned"], "legendonly",
         False, False),
        ("ToMoE, threshold moved (no retraining)", pts[pts["kind"] == "fallback"], KIND_STYLE["fallback"],
         "legendonly", False, False),
        ("ToMoE, random or fixed routing (ablation)", pts[pts["kind"] == "ablation"], KIND_STYLE["ablation"],
         "legendonly", False, False)]
    baselines = sorted(pts.loc[pts["kind"] == "baseline", "variant"].unique(),
                       key=lambda m: (m not in BASELINE_STYLES, list(BASELINE_STYLES).index(m) if m in BASELINE_STYLES
                                      else 0, m))
    for i, method in enumerate(m for m in baselines if m not in hidden):
        style = BASELINE_STYLES.get(method) or dict(color=BASELINE_COLORS[i % len(BASELINE_COLORS)],
                                                    symbol=BASELINE_SYMBOLS[i % len(BASELINE_SYMBOLS)], size=10)
        groups.append((method_name(method), pts[pts["variant"] == method].sort_values("active_params"), style, True,
                       True, True))
    for method in sorted(pts.loc[pts["kind"] == "dynamic, training-free", "variant"].unique()):
        if method not in hidden:
            groups.append((method_name(method), pts[pts["variant"] == method].sort_values("active_params"),
                           DYNAMIC_STYLES.get(method, KIND_STYLE["dynamic"]), True, True, True))
    for method in sorted(pts.loc[pts["kind"] == "ceiling", "variant"].unique()):
        groups.append((method_name(method) if method in METHOD_NAMES else f"{method} (ceiling)",
                       pts[pts["variant"] == method].sort_values("active_params"), KIND_STYLE["ceiling"], True, True,
                       False))
    on_front = []
    for name, df, style, visible, line, front in groups:
        if df.empty:
            continue
        y = df["ratio"].clip(upper=clip)
        ceiling = name.startswith("Oracle") or name.endswith("(ceiling)")
        fig.add_trace(go.Scatter(
            x=df["active_params"] / 1e6, y=y, name=name, visible=visible,
            mode="lines+markers" if line and len(df) > 1 else "markers",
            marker=dict(color=style["color"], size=style["size"], line=dict(width=1, color="white"),
                        symbol=[style["symbol"] if r <= clip else "triangle-up" for r in df["ratio"]]),
            line=dict(color=style["color"], width=2.5 if name.startswith("ToMoE") else 1.2,
                      dash="dash" if ceiling else None if name.startswith("ToMoE") else "dot"),
            hovertext=hover(df), hoverinfo="text"))
        if front and visible is True:
            on_front.append(df)
    if dense_ppl:
        fig.add_hline(y=1.0, line=dict(color=KIND_STYLE["dense"]["color"], width=1, dash="dot"))
        fig.add_annotation(x=float(dense_rows["active_params"].iloc[0]) / 1e6, y=0, text=f"dense ({dense_ppl:.2f})",
                           showarrow=False, yshift=16, font=dict(color=KIND_STYLE["dense"]["color"], size=11))
    if not (ceiling_rows := pts[pts["kind"] == "ceiling"]).empty:  # label the ceiling where it ends, on the chart
        end = ceiling_rows.loc[ceiling_rows["active_params"].idxmin()]
        fig.add_annotation(x=end["active_params"] / 1e6, y=math.log10(min(end["ratio"], clip)), text="ceiling",
                           showarrow=False, yshift=-12, font=dict(color=KIND_STYLE["ceiling"]["color"], size=11))
    front = pareto_front(pd.concat(on_front), y="ratio", x_tol=0.005) if on_front else pts.iloc[:0]
    if len(front) > 1:
        fig.add_trace(go.Scatter(x=front["active_params"] / 1e6, y=front["ratio"].clip(upper=clip),
                                 name="Pareto front (of the series shown)", mode="lines", line_shape="hv",
                                 line=dict(color="rgba(67,56,202,0.22)", width=6), hoverinfo="skip"))
    if budget is not None and cost is not None:
        fig.add_vline(x=cost.active_params(budget) / 1e6, line=dict(color="#4338ca", dash="dash", width=1.5),
                      annotation_text=f"p = {budget:.2f}", annotation_position="top")
    shown = pts[~pts["variant"].isin(hidden)]["ratio"].clip(upper=clip)
    fig.update_layout(
        xaxis_title="active parameters per token (millions)",
        yaxis_title="perplexity relative to dense (x dense, log scale)" if dense_ppl else "perplexity (log scale)",
        yaxis_type="log", height=480, margin=dict(l=10, r=10, t=70, b=10), hovermode="closest",
        legend=dict(orientation="h", yanchor="top", y=-0.18, x=0), template="plotly_white")
    fig.update_yaxes(**ratio_ticks(shown) if dense_ppl else log_ticks(shown))
    if hidden:
        fig.add_annotation(text=f"hidden: {', '.join(method_name(m) for m in hidden)} (over "
                                f"{CATASTROPHIC_RATIO:g}x dense perplexity at every budget)",
                           showarrow=False, xref="paper", yref="paper", x=0, y=1.13, xanchor="left",
                           font=dict(size=11, color="#6b7280"))
    if dense_ppl and (pts.loc[~pts["variant"].isin(hidden), "ratio"] > clip).any():
        fig.add_annotation(text=f"axis clipped at {clip:g}x dense: triangles mark worse points (hover for values)",
                           showarrow=False, xref="paper", yref="paper", x=0, y=1.07, xanchor="left",
                           font=dict(size=11, color="#6b7280"))
    if pts.empty:
        fig.add_annotation(text="no quality results yet: run `python -m tomoe_core evaluate CONVERSION`",
                           showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5)
    return fig


def ratio_ticks(values: pd.Series) -> dict:
    """Ticks of a ratio-to-dense log axis, labelled '1x', '1.5x', '2x', '5x' ..."""
    vals = pd.to_numeric(values, errors="coerce").dropna()
    vals = vals[vals > 0]
    if vals.empty:
        return {}
    hi = max(float(vals.max()), 1.0)
    candidates = [1, 1.25, 1.5, 2, 3, 5, 10, 20, 50, 100, 200, 500, 1000] if hi <= 1000 else \
        [10 ** e for e in range(0, int(math.log10(hi)) + 2)]
    if hi > 12:
        candidates = [c for c in candidates if c not in (1.25, 3)]
    lo = min(float(vals.min()), 1.0)
    ticks = [t for t in candidates if lo / 1.3 <= t <= hi * 1.3]
    return {"tickvals": ticks, "ticktext": [f"{t:g}x" for t in ticks]}


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


def structural_speed_summary(results: dict[str, dict]) -> str | None:
    """One sentence from `benchmarks.teal_speed`: where ToMoE and TEAL-style each save time (None without it)."""
    res = next((r for r in results.values() if r.get("kind") == "teal-speed" and r.get("rows")), None)
    if res is None:
        return None
    by = {(r["workload"], r["variant"]): r["vs_dense"] for r in res["rows"]}
    parts = []
    for workload in ("decode, batch 1", "decode, batch 8", "prefill"):
        if (workload, "ToMoE") in by and (workload, "TEAL-style") in by:
            parts.append(f"{workload}: ToMoE {by[workload, 'ToMoE']:.2f}x, TEAL-style {by[workload, 'TEAL-style']:.2f}x")
    if not parts:
        return None
    return (f"Time of the MLPs relative to dense at p = {res.get('budget'):g} ({res.get('threads', 1)} thread, "
            f"`python -m benchmarks.teal_speed`): " + "; ".join(parts) + ". Per-token gathers lose their savings "
            "once tokens are batched; ToMoE's experts group tokens into dense products.")
