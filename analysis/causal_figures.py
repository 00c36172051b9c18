"""Plotly figures of expert ablation and of routing across budgets (DataFrames in, figures out):
  ablation_heatmap(causal.ablation_by_tag(run, layer), layer, num_experts)   expert x tag loss increase
  budget_agreement_figure(causal.budget_agreement(siblings))                  per layer ARI / profile cosine
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from .causal import MIN_TOKENS
from .routing_figures import LEGEND_BELOW, NO_DATA_COLOR
from .syntax import UPOS


def ablation_heatmap(table: pd.DataFrame, layer: int, num_experts: int | None = None, scope: str = "routed",
                     tag_name: str = "POS", min_tokens: int = MIN_TOKENS, metric: str = "delta_loss") -> go.Figure:
    """Expert x tag mean loss increase (a diverging scale centred on 0) or KL to the unablated model
    (a scale from 0), in nats, when the expert is removed; cells backed by fewer than `min_tokens`
    tokens grey with a dot. table: `ablation_by_tag` with the same metric."""
    tags = [t for t in UPOS if t in set(table.tag)] + sorted(set(table.tag) - set(UPOS))
    experts = list(range(num_experts)) if num_experts else sorted(set(table.expert))
    grid = table.pivot_table(index="expert", columns="tag", values="mean", aggfunc="first").reindex(
        index=experts, columns=tags)
    counts = table.pivot_table(index="expert", columns="tag", values="tokens", aggfunc="first").reindex(
        index=experts, columns=tags).fillna(0)
    low = table.pivot_table(index="expert", columns="tag", values="low", aggfunc="first").reindex(index=experts, columns=tags)
    high = table.pivot_table(index="expert", columns="tag", values="high", aggfunc="first").reindex(index=experts, columns=tags)
    z = grid.to_numpy(dtype=float)
    has = ~np.isnan(z)
    hover = np.where(has, np.char.add(np.char.add(np.char.mod("%+.3f nats ", np.nan_to_num(z)), np.char.add(
        np.char.mod("[%+.3f, ", np.nan_to_num(low.to_numpy(float))), np.char.mod("%+.3f], ", np.nan_to_num(
            high.to_numpy(float))))), np.char.mod("%d tokens", counts.to_numpy().astype(int))),
        np.char.mod(f"too few tokens (%d < {min_tokens})", counts.to_numpy().astype(int)))
    rows = [f"E{e}" for e in experts]
    bound = float(np.nanmax(np.abs(z))) if has.any() else 1.0
    fig = go.Figure()
    if (~has).any():
        fig.add_trace(go.Heatmap(z=np.where(has, np.nan, 0.0), x=tags, y=rows, showscale=False,
                                 colorscale=[(0, NO_DATA_COLOR), (1, NO_DATA_COLOR)], text=np.where(has, "", "·"),
                                 texttemplate="%{text}", customdata=hover, name="too few tokens",
                                 hovertemplate="%{y} %{x}: %{customdata}<extra></extra>"))
    scale = (dict(zmid=0, zmin=-bound, zmax=bound, colorscale="RdBu_r") if metric == "delta_loss"
             else dict(zmin=0, zmax=bound, colorscale="Reds"))
    what = "Loss increase" if metric == "delta_loss" else "KL to the unablated model"
    fig.add_trace(go.Heatmap(z=z, x=tags, y=rows, **scale, customdata=hover, colorbar=dict(title="nats"), name=what,
                             hovertemplate="%{y} %{x}: %{customdata}<extra></extra>"))
    who = "its tokens" if scope == "routed" else "all tokens"
    fig.update_layout(title=f"{what} on {who} when an expert is removed, layer {layer} (grey: too few tokens)",
                      xaxis_title=tag_name, yaxis_title="expert removed", yaxis_autorange="reversed",
                      height=max(350, 18 * len(rows) + 150))
    return fig


def budget_agreement_figure(table: pd.DataFrame) -> go.Figure:
    """Per layer, one line per budget against the reference: adjusted Rand index of the two routings
    (solid) and the median cosine of the experts' tag preferences (dotted)."""
    fig = go.Figure()
    reference = table["reference"].iloc[0] if len(table) else None
    for b, g in table.groupby("budget"):
        fig.add_trace(go.Scatter(x=g.layer, y=g.ari, mode="lines+markers", name=f"routing ARI, p = {b:g}",
                                 customdata=np.stack([g.nmi, g.same_expert], axis=1),
                                 hovertemplate=f"p = {b:g} vs {reference:g}, " + "layer %{x}: ARI %{y:.3f}, NMI "
                                 "%{customdata[0]:.3f}, same expert %{customdata[1]:.1%}<extra></extra>"))
        fig.add_trace(go.Scatter(x=g.layer, y=g.profile_cosine, mode="lines", line_dash="dot",
                                 name=f"role cosine, p = {b:g}",
                                 hovertemplate=f"p = {b:g} vs {reference:g}, " + "layer %{x}: median cosine of the "
                                 "experts' tag preferences %{y:.3f}<extra></extra>"))
    fig.update_layout(title=f"Routing and roles across budgets, against p = {reference:g}" if reference is not None
                      else "Routing and roles across budgets", xaxis_title="layer", yaxis_title="agreement",
                      yaxis_range=[0, 1.05], legend=LEGEND_BELOW)
    return fig
