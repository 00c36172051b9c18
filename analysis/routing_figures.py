"""Plotly figures of routing logs. Plain functions: DataFrames in, `go.Figure` out (no Streamlit).

Inputs come from `tomoe_core.trace.queries` and `analysis.experts`:
  load_heatmap(expert_load(run))                         layer x expert share of tokens
  lift_heatmap(expert_pos(run), layer=None)              (layer, expert) x POS lift
  nmi_figure(nmi_per_layer(token_labels(run)))           NMI per layer against its permutation bands
  contextual_figure(nmi_per_layer(..., bootstrap=100))   NMI above the within-token baseline, with intervals
  nmi_compare_figure({"spaCy UPOS": nmi, ...})           NMI per layer for several tag sources (gold vs spaCy)
  k_choice_figure(clusters.silhouette, clusters.stability, clusters.k)
  expert_map(cluster_experts(expert_pos(run)).experts)   PCA map of expert POS profiles by cluster
  token_strip(document_tokens(run, doc_id), layer)       a document's tokens coloured by expert
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative

from .syntax import UPOS

EXPERT_COLORS = qualitative.Plotly + qualitative.D3  # 20 distinct colours; experts beyond wrap around


def load_heatmap(load: pd.DataFrame, title: str = "Share of tokens per expert") -> go.Figure:
    """Layer x expert heatmap. load: columns layer, expert, share (and tokens) — `queries.expert_load`."""
    wide = load.pivot_table(index="layer", columns="expert", values="share", fill_value=0.0).sort_index()
    tokens = load.pivot_table(index="layer", columns="expert", values="tokens", fill_value=0).reindex_like(wide) \
        if "tokens" in load else wide * 0
    fig = go.Figure(go.Heatmap(
        z=wide.to_numpy(), x=[str(c) for c in wide.columns], y=[str(i) for i in wide.index],
        colorscale="Viridis", zmin=0, colorbar=dict(title="share", tickformat=".0%"),
        customdata=tokens.to_numpy(),
        hovertemplate="layer %{y}, expert %{x}<br>%{z:.1%} of tokens (%{customdata:,})<extra></extra>"))
    fig.update_layout(title=title, xaxis_title="expert", yaxis_title="layer", yaxis_autorange="reversed")
    return fig


NO_DATA_COLOR = "#d9d9d9"  # heatmap cells without data: grey with a dot, never white (white is 1x)


MAX_TAGS = 20  # a heatmap keeps the most frequent tags as columns and pools the rest (XPOS has ~50)
OTHER_TAGS = "other"


def top_tags(counts: pd.DataFrame, max_tags: int = MAX_TAGS) -> pd.DataFrame:
    """`counts` (column `pos`, `tokens`) with the tags beyond the `max_tags` most frequent pooled as
    "other (N tags)"."""
    totals = counts.groupby("pos")["tokens"].sum().sort_values(ascending=False, kind="stable")
    if len(totals) <= max_tags:
        return counts
    keep = set(totals.index[: max_tags - 1])
    pooled = f"{OTHER_TAGS} ({len(totals) - len(keep)} tags)"
    out = counts.assign(pos=counts["pos"].where(counts["pos"].isin(keep), pooled))
    keys = [c for c in out.columns if c not in ("tokens",)]
    return out.groupby(keys, as_index=False, sort=False)["tokens"].sum()


def lift_heatmap(counts: pd.DataFrame, layer: int | None = None, min_tokens: int = 0,
                 title: str | None = None, num_experts: int | None = None, tag_name: str = "universal POS",
                 max_tags: int = MAX_TAGS) -> go.Figure:
    """Expert x POS lift (P(pos | expert) / P(pos | layer)), log2 colour scale centred on 1x.

    counts: columns layer, expert, pos, tokens — `queries.expert_pos`. layer: one layer
    (rows = experts; with num_experts every expert gets a row) or None (rows = every
    layer:expert). A cell is "no data" (grey, marked with a dot) when the expert has no tokens,
    or the tag does not occur in the expert's layer: lift is undefined there. A tag the expert
    never gets although its layer has it is a lift of 0, drawn at the bottom of the scale.
    """
    from .experts import pos_profiles

    prof = pos_profiles(top_tags(counts, max_tags))
    if layer is not None:
        prof = prof[prof.layer == layer]
    prof = prof[prof.expert_tokens >= min_tokens]
    tags = [p for p in UPOS if p in set(prof.pos)] + sorted(set(prof.pos) - set(UPOS))
    rows_index = sorted(set(zip(prof.layer, prof.expert)))
    if layer is not None and num_experts:
        rows_index = [(layer, e) for e in range(num_experts)]
    index = pd.MultiIndex.from_tuples(rows_index, names=["layer", "expert"]) if rows_index else \
        pd.MultiIndex.from_arrays([[], []], names=["layer", "expert"])
    tokens = prof.pivot_table(index=["layer", "expert"], columns="pos", values="tokens", aggfunc="sum",
                              fill_value=0).reindex(index=index, columns=tags, fill_value=0)
    expert_tokens = tokens.sum(axis=1)
    layer_tags = tokens.groupby(level="layer").transform("sum")
    layer_share = layer_tags.div(layer_tags.sum(axis=1).replace(0, np.nan), axis=0)
    share = tokens.div(expert_tokens.replace(0, np.nan), axis=0)
    has_data = (expert_tokens.to_numpy()[:, None] > 0) & (layer_tags.to_numpy() > 0)
    lift = np.where(has_data, (share / layer_share).to_numpy(dtype=float), np.nan)
    expected = (layer_share.mul(expert_tokens, axis=0)).to_numpy(dtype=float)
    rows = [f"E{e}" if layer is not None else f"L{l}:E{e}" for l, e in index]
    with np.errstate(divide="ignore"):
        log_lift = np.where(lift > 0, np.log2(np.where(lift > 0, lift, 1.0)), -3.0)  # 0x at the bottom
    log_lift = np.where(has_data, np.clip(log_lift, -3, 3), np.nan)
    hover = np.where(has_data, np.char.add(np.char.add(
        np.char.mod("lift %.2fx: ", np.nan_to_num(lift)), np.char.mod("%d tokens, ", tokens.to_numpy())),
        np.char.mod("%.1f expected", np.nan_to_num(expected))), "no data (no tokens of this expert, or tag absent "
                                                                "from the layer)")
    fig = go.Figure()
    if (~has_data).any():
        fig.add_trace(go.Heatmap(  # underneath: no-data cells grey, a dot in each
            z=np.where(has_data, np.nan, 0.0), x=tags, y=rows, colorscale=[(0, NO_DATA_COLOR), (1, NO_DATA_COLOR)],
            showscale=False, text=np.where(has_data, "", "·"), texttemplate="%{text}", customdata=hover,
            hovertemplate="%{y} %{x}: %{customdata}<extra></extra>", name="no data"))
    fig.add_trace(go.Heatmap(
        z=log_lift, x=tags, y=rows, zmid=0, zmin=-3, zmax=3, colorscale="RdBu_r", customdata=hover,
        colorbar=dict(title="lift", tickvals=[-3, -2, -1, 0, 1, 2, 3],
                      ticktext=["<=1/8x", "1/4x", "1/2x", "1x", "2x", "4x", ">=8x"]),
        hovertemplate="%{y} %{x}: %{customdata}<extra></extra>", name="lift"))
    short = "POS" if tag_name == "universal POS" else tag_name
    fig.update_layout(title=title or (f"Expert x {short} lift" + (f", layer {layer}" if layer is not None else "")
                                      + " (grey with a dot: no data)"),
                      xaxis_title=tag_name, yaxis_title="expert", yaxis_autorange="reversed",
                      height=max(350, 18 * len(rows) + 150))
    return fig


LEGEND_BELOW = dict(orientation="h", yanchor="top", y=-0.22, x=0)  # narrow columns keep the plot's width
CELL_CHARS = 8  # a token strip cell shows this many characters; the hover has the whole token


def nmi_figure(nmi: pd.DataFrame, title: str = "Expert-POS mutual information per layer") -> go.Figure:
    """Observed NMI per layer over the shuffled baseline's 5-95 % band (and the within-token
    baseline's mean when present). nmi: `analysis.experts.nmi_per_layer` output."""
    layers = nmi["layer"].tolist()
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=layers + layers[::-1], y=nmi["perm_p95"].tolist() + nmi["perm_p05"].tolist()[::-1],
                             fill="toself", fillcolor="rgba(150,150,150,0.35)", line=dict(width=0),
                             name="shuffled experts, 5-95 %", hoverinfo="skip"))
    if "lexical_mean" in nmi:
        fig.add_trace(go.Scatter(x=layers, y=nmi["lexical_mean"], mode="lines", line=dict(dash="dot", color="#888"),
                                 name="shuffled within token (lexical only)"))
    fig.add_trace(go.Scatter(
        x=layers, y=nmi["nmi"], mode="lines+markers", name="observed", line=dict(color="#d62728"),
        customdata=np.stack([nmi["p_value"], nmi["tokens"]], axis=1),
        hovertemplate="layer %{x}: NMI %{y:.4f}<br>p = %{customdata[0]:.4f}, %{customdata[1]:,} tokens<extra></extra>"))
    fig.update_layout(title=title, xaxis_title="layer", yaxis_title="NMI(expert; POS)", yaxis_rangemode="tozero",
                      legend=LEGEND_BELOW)
    return fig


def expert_map(experts: pd.DataFrame, title: str = "Experts by POS profile (PCA of excess POS share)") -> go.Figure:
    """2-D map of expert profiles. experts: columns layer, expert, cluster_name, pc1, pc2, tokens
    — `analysis.experts.cluster_experts(...).experts`."""
    fig = go.Figure()
    for i, (name, group) in enumerate(experts.groupby("cluster_name", sort=True)):
        size = 6 + 14 * np.sqrt(group["tokens"] / max(experts["tokens"].max(), 1))
        fig.add_trace(go.Scatter(
            x=group["pc1"], y=group["pc2"], mode="markers", name=str(name),
            marker=dict(size=size, color=EXPERT_COLORS[i % len(EXPERT_COLORS)], line=dict(width=0.5, color="white")),
            customdata=np.stack([group["layer"], group["expert"], group["tokens"]], axis=1),
            hovertemplate="layer %{customdata[0]}, expert %{customdata[1]}<br>%{customdata[2]:,} tokens"
                          f"<br>{name}<extra></extra>"))
    fig.update_layout(title=title, xaxis_title="PC 1", yaxis_title="PC 2", legend_title="cluster")
    return fig


def token_strip(tokens: pd.DataFrame, layer: int, per_line: int = 16, max_tokens: int = 256,
                num_experts: int | None = None, title: str | None = None) -> go.Figure:
    """A document's tokens in reading order, each cell coloured by its expert at `layer`.

    tokens: columns position, token, layer, expert (router_prob, pos optional) —
    `queries.document_tokens(run, doc_id)`.
    """
    rows = tokens[tokens["layer"] == layer].sort_values("position").head(max_tokens)
    if rows.empty:
        raise ValueError(f"no tokens at layer {layer}: choose a layer the run traced")
    e = num_experts or int(tokens["expert"].max()) + 1
    n = len(rows)
    lines = -(-n // per_line)
    grid = np.full((lines, per_line), np.nan)
    text = np.full((lines, per_line), "", dtype=object)
    hover = np.full((lines, per_line), "", dtype=object)
    for i, r in enumerate(rows.itertuples(index=False)):
        y, x = divmod(i, per_line)
        grid[y, x] = r.expert
        shown = str(r.token).replace("\n", "↵")
        text[y, x] = shown if len(shown) <= CELL_CHARS else shown[:CELL_CHARS - 1] + "…"
        extra = f", p={r.router_prob:.2f}" if hasattr(r, "router_prob") else ""
        extra += f", {r.pos}" if hasattr(r, "pos") and isinstance(r.pos, str) else ""
        hover[y, x] = f"{shown!r} -> expert {r.expert}{extra}"
    palette = [EXPERT_COLORS[k % len(EXPERT_COLORS)] for k in range(e)]
    scale = []
    for k, colour in enumerate(palette):  # discrete bands, one per expert
        scale += [(k / e, colour), ((k + 1) / e, colour)]
    fig = go.Figure(go.Heatmap(
        z=grid, text=text, texttemplate="%{text}", textfont=dict(size=11), customdata=hover,
        hovertemplate="%{customdata}<extra></extra>", colorscale=scale, zmin=-0.5, zmax=e - 0.5, xgap=2, ygap=2,
        colorbar=dict(title="expert", tickvals=list(range(e)), ticktext=[str(k) for k in range(e)])))
    fig.update_layout(title=title or f"Tokens coloured by expert, layer {layer}", height=60 + 32 * lines + 60,
                      xaxis=dict(visible=False), yaxis=dict(visible=False, autorange="reversed"))
    return fig


def silhouette_figure(scores: dict[int, float], chosen: int | None = None) -> go.Figure:
    """Silhouette score per k (the clustering's model selection), the chosen k marked."""
    return k_choice_figure(scores, {}, chosen)


def k_choice_figure(silhouette: dict[int, float], stability: dict[int, float], chosen: int | None = None,
                    stable_ari: float | None = None) -> go.Figure:
    """Silhouette and stability (mean adjusted Rand index under resampling) per k, the chosen k
    marked, the stability threshold as a dotted line. — `cluster_experts(...)` fields."""
    ks = sorted(silhouette)
    fig = go.Figure(go.Scatter(x=ks, y=[silhouette[k] for k in ks], mode="lines+markers", name="silhouette"))
    if stability:
        fig.add_trace(go.Scatter(x=ks, y=[stability.get(k, np.nan) for k in ks], mode="lines+markers",
                                 name="stability (adjusted Rand)", line=dict(dash="dash")))
    if stable_ari is not None:
        fig.add_hline(y=stable_ari, line_dash="dot", line_color="#888", annotation_text="stable")
    if chosen is not None:
        fig.add_vline(x=chosen, line_dash="dash", annotation_text=f"k = {chosen}")
    fig.update_layout(title="Choosing k: silhouette and stability", xaxis_title="k (clusters)", yaxis_title="score",
                      xaxis=dict(dtick=1), legend=LEGEND_BELOW)
    return fig


def contextual_figure(nmi: pd.DataFrame, title: str = "Contextual NMI: above the within-token baseline") -> go.Figure:
    """NMI - within-token baseline per layer, with its bootstrap interval when the table has one
    (`nmi_per_layer(..., bootstrap=N)`): how much of NMI(expert; POS) word identity does not explain."""
    if "contextual" not in nmi:
        raise ValueError("the NMI table has no within-token baseline: compute it with token ids (queries.token_labels)")
    error = None
    if "contextual_low" in nmi:
        error = dict(type="data", symmetric=False, array=(nmi["contextual_high"] - nmi["contextual"]).tolist(),
                     arrayminus=(nmi["contextual"] - nmi["contextual_low"]).tolist(), thickness=1)
    fig = go.Figure(go.Scatter(
        x=nmi["layer"], y=nmi["contextual"], mode="markers+lines", name="contextual NMI", error_y=error,
        customdata=np.stack([nmi["nmi"], nmi["lexical_mean"]], axis=1),
        hovertemplate="layer %{x}: contextual %{y:.4f}<br>NMI %{customdata[0]:.4f}, within-token baseline "
                      "%{customdata[1]:.4f}<extra></extra>"))
    fig.add_hline(y=0, line_color="#888")
    fig.update_layout(title=title, xaxis_title="layer", yaxis_title="NMI - within-token baseline")
    return fig


def nmi_compare_figure(tables: dict[str, pd.DataFrame], title: str = "NMI(expert; tag) per layer") -> go.Figure:
    """One line per tag source (e.g. spaCy UPOS, gold UPOS, gold deprel): observed NMI per layer."""
    fig = go.Figure()
    for name, nmi in tables.items():
        fig.add_trace(go.Scatter(x=nmi["layer"], y=nmi["nmi"], mode="lines+markers", name=name,
                                 hovertemplate=f"{name}, " + "layer %{x}: NMI %{y:.4f}<extra></extra>"))
    fig.update_layout(title=title, xaxis_title="layer", yaxis_title="NMI", yaxis_rangemode="tozero",
                      legend=LEGEND_BELOW)
    return fig


__all__ = ["load_heatmap", "lift_heatmap", "nmi_figure", "contextual_figure", "nmi_compare_figure", "expert_map",
           "token_strip", "silhouette_figure", "k_choice_figure", "UPOS"]
