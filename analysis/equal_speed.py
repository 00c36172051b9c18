"""Quality at equal measured speed: the executive's question once a method's speed depends on how the
model is served (one user decoding, a batch of users, long prompts).

Speed comes from one speed file (`benchmarks.speed`: dense, ToMoE and the baselines at the same
budgets in one interleaved run; `speed_cards.method_speed_rows`), quality from the quality points of
one evaluation set (`tradeoff.quality_points`). Per serving scenario each method is a curve of
(speed ratio to dense, perplexity) over its budgets; `equal_speed_sentence` names the best method at
the speed ToMoE reaches at the slider's budget, reading the other curves between their measured
points (linear in speed, log-linear in perplexity); nothing is extrapolated.

TEAL-style's speed is TEAL as deployed (decode sparse, the prompt pass dense, so its prefill is
dense's); its perplexity is the quality benchmark's, with every token sparse (the prompt too): a
pessimistic reading of its quality under the deployed speed.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

SCENARIOS = {  # label -> (what is timed, batch): the CPU file's; `scenarios` reads a file's own batch sizes
    "decode, batch 1": ("decode", 1),
    "decode, batch 8": ("decode", 8),
    "prompt (prefill)": ("prefill", 1),
}


def scenarios(speed: pd.DataFrame) -> dict[str, tuple[str, int]]:
    """The serving scenarios a speed file measured: decode at each of its batch sizes, and the prompt pass."""
    batches = sorted({int(b) for b in speed["batch"].dropna()}) or [1]
    out = {f"decode, batch {b}": ("decode", b) for b in batches}
    if speed["prefill_tokens_per_s"].notna().any():
        out["prompt (prefill)"] = ("prefill", 1)
    return out
METHOD_LABELS = {"tomoe": "ToMoE", "teal": "TEAL-style", "wanda-sp": "Wanda-sp", "flap": "FLAP", "dense": "dense"}
METHODS = ("tomoe", "teal", "wanda-sp", "flap")
TABLE_COLUMNS = ["method", "label", "budget", "tokens_per_s", "speedup", "speedup_low", "speedup_high", "perplexity",
                 "peak_memory_mb"]


def equal_speed_table(speed: pd.DataFrame, quality: pd.DataFrame, scenario: str, threads: int | None,
                      layout: str = "indexed", dense_perplexity: float | None = None) -> pd.DataFrame:
    """One row per (method, measured budget) with both a speed and a perplexity, plus dense.

    speed: `speed_cards.method_speed_rows` (method, layout, threads, batch, budget, <what>_tokens_per_s,
    <what>_speedup, <what>_speedup_iqr); quality: method (as METHODS), budget, perplexity.
    Columns: TABLE_COLUMNS; speedup is the paired median ratio to dense, low/high its IQR."""
    what, batch = SCENARIOS.get(scenario) or scenarios(speed)[scenario]
    sel = speed[(speed["batch"].fillna(1).astype(int) == batch)]
    if threads is not None:
        sel = sel[sel["threads"] == threads]
    sel = sel[(sel["method"] != "tomoe") | (sel["layout"] == layout)].dropna(subset=[f"{what}_tokens_per_s"])
    rows = []
    for _, r in sel.iterrows():
        method = r["method"]
        if r[f"{what}_speedup"] is None or pd.isna(r[f"{what}_speedup"]):
            continue
        if method == "dense":
            ppl = dense_perplexity
        else:
            q = quality[(quality["method"] == method) & ((quality["budget"] - r["budget"]).abs() < 0.011)]
            ppl = float(q["perplexity"].iloc[0]) if len(q) else None
        if ppl is None or (isinstance(ppl, float) and math.isnan(ppl)):
            continue
        iqr = r.get(f"{what}_speedup_iqr")
        iqr = list(iqr) if isinstance(iqr, (list, tuple, np.ndarray)) else [None, None]
        rows.append({"method": method, "label": METHOD_LABELS.get(method, method), "budget": float(r["budget"]),
                     "tokens_per_s": float(r[f"{what}_tokens_per_s"]), "speedup": float(r[f"{what}_speedup"]),
                     "speedup_low": iqr[0], "speedup_high": iqr[1], "perplexity": ppl,
                     "peak_memory_mb": _number(r.get("peak_memory_mb"))})
    out = pd.DataFrame(rows, columns=TABLE_COLUMNS)
    return out.sort_values(["method", "budget"]).reset_index(drop=True)


def _number(value) -> float:
    return float(value) if value is not None and not pd.isna(value) else float("nan")


def pareto_front(table: pd.DataFrame) -> pd.Series:
    """True for the points no other point beats on both speed (higher) and perplexity (lower)."""
    s, p = table["speedup"].to_numpy(), table["perplexity"].to_numpy()
    return pd.Series([not np.any((s >= s[i]) & (p <= p[i]) & ((s > s[i]) | (p < p[i]))) for i in range(len(table))],
                     index=table.index)


def perplexity_at_speed(curve: pd.DataFrame, speedup: float) -> tuple[float, float] | None:
    """A method's (perplexity, budget) at `speedup`, between its two measured points that bracket it
    (log-linear in perplexity); None outside its measured speeds."""
    pts = curve.sort_values("speedup")
    s, p, b = pts["speedup"].to_numpy(), pts["perplexity"].to_numpy(), pts["budget"].to_numpy()
    for i in range(len(pts) - 1):
        lo, hi = s[i], s[i + 1]
        if min(lo, hi) - 1e-9 <= speedup <= max(lo, hi) + 1e-9:
            t = 0.0 if hi == lo else (speedup - lo) / (hi - lo)
            return float(np.exp((1 - t) * np.log(p[i]) + t * np.log(p[i + 1]))), float((1 - t) * b[i] + t * b[i + 1])
    if len(pts) == 1 and abs(s[0] - speedup) < 1e-9:
        return float(p[0]), float(b[0])
    return None


def _no_faster_than_dense(point: pd.Series) -> bool:
    low = point.get("speedup_low")
    return low is not None and not pd.isna(low) and low <= 1.0


def _within_noise(curve: pd.DataFrame, speedup: float) -> pd.Series | None:
    """The method's measured point nearest `speedup` when `speedup` lies outside its measured speeds but
    inside that point's IQR (the two are not told apart by the measurement); else None."""
    pts = curve.dropna(subset=["speedup_low", "speedup_high"])
    near = pts[(pts["speedup_low"] <= speedup) & (speedup <= pts["speedup_high"])]
    if near.empty:
        return None
    return near.iloc[(near["speedup"] - speedup).abs().argmin()]


def _compare(curve: pd.DataFrame, speedup: float) -> tuple[float, float, bool] | None:
    """(perplexity, budget, within noise) of a method at `speedup`: interpolated between its measured
    points, or its nearest point when the speed is only within that point's IQR; None otherwise."""
    hit = perplexity_at_speed(curve, speedup)
    if hit is not None:
        return hit[0], hit[1], False
    point = _within_noise(curve, speedup)
    return None if point is None else (float(point["perplexity"]), float(point["budget"]), True)


def equal_speed_sentence(table: pd.DataFrame, budget: float, scenario: str) -> str | None:
    """'At decode, batch 8, ToMoE at p = 0.5 runs at 1.43x dense with perplexity 61.1; at that speed
    TEAL-style (p ~ 0.62) reaches 29.0 ...': the best method at ToMoE's measured speed at the measured
    budget nearest `budget`. None without a ToMoE point."""
    tomoe = table[table["method"] == "tomoe"]
    if tomoe.empty:
        return None
    at = tomoe.iloc[(tomoe["budget"] - budget).abs().argmin()]
    speed, ppl = at["speedup"], at["perplexity"]
    near = "" if abs(at["budget"] - budget) < 0.011 else f" (the measured budget nearest p = {budget:g})"
    others, outside = [], []
    for method, curve in table[~table["method"].isin(["tomoe", "dense"])].groupby("method"):
        hit = _compare(curve, speed)
        label = METHOD_LABELS.get(method, method)
        if hit is None:
            fastest = curve["speedup"].max()
            outside.append(f"{label} ({'never this fast: at most' if fastest < speed else 'always faster: at least'} "
                           f"{fastest if fastest < speed else curve['speedup'].min():.2f}x)")
        else:
            others.append(hit + (label,))
    head = (f"At {scenario}, ToMoE at p = {at['budget']:g}{near} runs at {speed:.2f}x dense speed with perplexity "
            f"{ppl:.1f}.")
    if _no_faster_than_dense(at):
        where = ("lies below 1.0: slower than" if at["speedup_high"] < 1.0
                 else "includes 1.0: not measurably faster than")
        return head + (f" Its IQR ({at['speedup_low']:.2f}-{at['speedup_high']:.2f}x) {where} the dense model, "
                       "which is better.")
    if not others:
        return head + (" No other method's measured budgets reach that speed" + (": " + "; ".join(outside) if outside
                                                                                  else "") + ".")
    others.sort()
    best_ppl, best_budget, _, best_label = others[0]
    parts = [f"{label} {p:.1f} ({'p = %g, within noise of this speed' % b if noisy else 'p ~ %.2f' % b})"
             for p, b, noisy, label in others]
    verdict = ("ToMoE is the best measured method at this speed" if ppl <= best_ppl
               else f"{best_label} is better at equal speed")
    tail = f"; {', '.join(outside)} not comparable" if outside else ""
    return f"{head} At that speed: {', '.join(parts)}{tail}. {verdict}."


def winners(table: pd.DataFrame) -> dict[float, str]:
    """For each ToMoE budget: the method with the lowest perplexity at ToMoE's speed there, "dense" when
    ToMoE's speed IQR includes 1.0, or "none comparable" when no other method's measurements reach
    that speed (for the README)."""
    out = {}
    for _, at in table[table["method"] == "tomoe"].iterrows():
        if _no_faster_than_dense(at):
            out[float(at["budget"])] = "dense"
            continue
        best, compared = ("tomoe", at["perplexity"]), False
        for method, curve in table[~table["method"].isin(["tomoe", "dense"])].groupby("method"):
            hit = _compare(curve, at["speedup"])
            if hit is not None:
                compared = True
                if hit[0] < best[1]:
                    best = (method, hit[0])
        out[float(at["budget"])] = best[0] if compared else "none comparable"
    return out


COLORS = {"tomoe": "#4338ca", "teal": "#d97706", "wanda-sp": "#059669", "flap": "#6b7280", "dense": "#1f2937"}


def equal_speed_figure(table: pd.DataFrame, scenario: str, budget: float | None = None):
    """Perplexity (log) against measured speed (x dense), one line per method over its budgets, dense a
    star, the Pareto front a dotted line, ToMoE's point nearest `budget` ringed."""
    import plotly.graph_objects as go

    fig = go.Figure()
    front = table[pareto_front(table)].sort_values("speedup")
    if len(front) > 1:
        fig.add_trace(go.Scatter(x=front["speedup"], y=front["perplexity"], mode="lines", name="Pareto front",
                                 line=dict(color="#9ca3af", dash="dot", width=6), opacity=0.5, hoverinfo="skip"))
    for method, curve in table.groupby("method", sort=False):
        curve = curve.sort_values("budget")
        if method == "dense":
            fig.add_trace(go.Scatter(x=curve["speedup"], y=curve["perplexity"], mode="markers", name="dense",
                                     marker=dict(color=COLORS["dense"], symbol="star", size=14),
                                     hovertemplate="dense: perplexity %{y:.2f}<extra></extra>"))
            continue
        err = None
        if curve["speedup_low"].notna().all():
            err = dict(type="data", symmetric=False, array=(curve["speedup_high"] - curve["speedup"]).tolist(),
                       arrayminus=(curve["speedup"] - curve["speedup_low"]).tolist(), thickness=1)
        fig.add_trace(go.Scatter(
            x=curve["speedup"], y=curve["perplexity"], mode="lines+markers+text", name=METHOD_LABELS.get(method, method),
            text=[f"{b:g}" for b in curve["budget"]], textposition="top center", error_x=err,
            marker=dict(color=COLORS.get(method), size=9), line=dict(color=COLORS.get(method)),
            customdata=[[b, t, "" if pd.isna(m) else f"<br>peak memory {m:,.0f} MiB"]  # no "NaN MiB" when unprobed
                        for b, t, m in zip(curve["budget"], curve["tokens_per_s"], curve["peak_memory_mb"])],
            hovertemplate=f"{METHOD_LABELS.get(method, method)}, " + "p = %{customdata[0]:g}<br>%{x:.2f}x dense speed "
                          "(%{customdata[1]:,.1f} tokens/s)<br>perplexity %{y:.2f}%{customdata[2]}<extra></extra>"))
    tomoe = table[table["method"] == "tomoe"]
    if budget is not None and not tomoe.empty:
        at = tomoe.iloc[(tomoe["budget"] - budget).abs().argmin()]
        fig.add_trace(go.Scatter(x=[at["speedup"]], y=[at["perplexity"]], mode="markers", name=f"ToMoE at p = {at['budget']:g}",
                                 marker=dict(size=20, color="rgba(0,0,0,0)", line=dict(color=COLORS["tomoe"], width=3)),
                                 hoverinfo="skip"))
    fig.add_vline(x=1.0, line_color="#d1d5db")
    fig.update_layout(title=f"Quality at equal measured speed: {scenario} (labels: budget p)",
                      xaxis_title="measured speed, x dense (paired median; bars: IQR)",
                      yaxis_title="perplexity (log)", yaxis_type="log", height=420, template="plotly_white",
                      legend=dict(orientation="h", yanchor="top", y=-0.2, x=0))
    return fig


TEAL_QUALITY = {"teal": "every token sparse", "teal-half-dense": "first half of each window dense (TEAL's protocol)"}


def quality_by_method(points: pd.DataFrame, eval_set: str, tomoe_curve: pd.DataFrame | None = None,
                      teal_variant: str = "teal") -> pd.DataFrame:
    """method (METHODS), budget, perplexity from the quality points of one evaluation set; ToMoE from
    `tomoe_curve` (tradeoff.tomoe_curve: the conversion the cards read) when given; TEAL-style's from
    `teal_variant` (a key of TEAL_QUALITY)."""
    pts = points[points["eval_set"] == eval_set]
    source = {m: m for m in METHODS} | {"teal": teal_variant}
    rows = [pts[pts["variant"] == source[m]][["budget", "perplexity"]].assign(method=m) for m in METHODS if m != "tomoe"]
    if tomoe_curve is not None and not tomoe_curve.empty:
        rows.append(tomoe_curve[["budget", "perplexity"]].assign(method="tomoe"))
    else:
        rows.append(pts[pts["kind"] == "tomoe"][["budget", "perplexity"]].assign(method="tomoe"))
    return pd.concat(rows, ignore_index=True)[["method", "budget", "perplexity"]]


def report(results: dict, points: pd.DataFrame, eval_set: str, model: str, layout: str = "indexed",
           speed_source: str | None = None) -> str:
    """Every scenario and thread count of one speed file, in words: the table behind the README's results."""
    from . import speed_cards, tradeoff

    speed = speed_cards.method_speed_rows(results, speed_source)
    speed = speed[speed["model"] == model]
    pts = points[points["eval_set"] == eval_set]
    dense = pts[pts["kind"] == "dense"]["perplexity"]
    quality = quality_by_method(points, eval_set, tradeoff.tomoe_curve(points, eval_set))
    lines = [f"speed: {speed['source'].iloc[0] if len(speed) else '-'} ({speed['machine'].iloc[0] if len(speed) else '-'}); "
             f"quality: {eval_set}; ToMoE layout {layout}"]
    for threads in sorted(speed["threads"].dropna().unique()):
        for scenario in scenarios(speed):
            table = equal_speed_table(speed, quality, scenario, int(threads), layout,
                                      float(dense.iloc[0]) if len(dense) else None)
            if table[table["method"] == "tomoe"].empty:
                continue
            lines.append(f"\n{scenario}, {int(threads)} thread(s): best method at ToMoE's speed, per ToMoE budget: "
                         + ", ".join(f"p = {b:g}: {METHOD_LABELS.get(m, m)}" for b, m in winners(table).items()))
            lines.append("  " + " | ".join(f"{r.label} p={r.budget:g} {r.speedup:.2f}x ppl {r.perplexity:.1f}"
                                           + ("" if pd.isna(r.peak_memory_mb) else f" {r.peak_memory_mb:,.0f} MiB")
                                           for r in table.itertuples()))
            for b in sorted(table.loc[table["method"] == "tomoe", "budget"]):
                lines.append("  " + (equal_speed_sentence(table, b, scenario) or ""))
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse

    from . import catalog, tradeoff

    p = argparse.ArgumentParser(prog="python -m analysis.equal_speed",
                                description="Quality at equal measured speed, per serving scenario, from the "
                                            "speed and quality files the studio reads.")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--eval-set", default=None, help="default: the 8 x 512 held-out set (the quality benchmark's)")
    p.add_argument("--layout", default="indexed")
    args = p.parse_args(argv)
    cat = catalog.read_catalog()
    points = tradeoff.quality_points(cat.results, tradeoff.cost_models(cat.conversions, cat.results))
    points = points[points["model"] == args.model]
    sets = tradeoff.eval_sets(points)
    eval_set = args.eval_set or next((s for s in sets if "8 x 512" in s), sets[0] if sets else None)
    if eval_set is None:
        print("error: no quality results for this model", file=__import__("sys").stderr)
        return 2
    print(report(cat.results, points, eval_set, args.model, args.layout))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
