"""The quality/cost figure: perplexity relative to dense against active parameters per token, every
method of the quality results on one chart, with its Pareto front."""
from __future__ import annotations

import math

import pandas as pd
import plotly.graph_objects as go

from analysis.tradeoff import CostModel, conditioned_curves


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
                  "teal-half-dense": dict(color="#0e7490", symbol="hexagon-open", size=10),
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
                "teal-half-dense": "TEAL-style, first half dense (TEAL's protocol)",
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
        yaxis_type="log", height=500, margin=dict(l=10, r=10, t=95, b=10), hovermode="closest",
        legend=dict(orientation="h", yanchor="top", y=-0.18, x=0), template="plotly_white")
    fig.update_yaxes(**ratio_ticks(shown) if dense_ppl else log_ticks(shown))
    if hidden:
        fig.add_annotation(text=f"hidden: {', '.join(method_name(m) for m in hidden)} (over "
                                f"{CATASTROPHIC_RATIO:g}x dense perplexity at every budget)",
                           showarrow=False, xref="paper", yref="paper", x=0, y=1.22, xanchor="left",
                           font=dict(size=11, color="#6b7280"))
    if dense_ppl and (pts.loc[~pts["variant"].isin(hidden), "ratio"] > clip).any():
        fig.add_annotation(text=f"axis clipped at {clip:g}x dense: triangles mark worse points (hover for values)",
                           showarrow=False, xref="paper", yref="paper", x=0, y=1.14, xanchor="left",
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
