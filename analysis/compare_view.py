"""Dense vs ToMoE generation, side by side: token HTML coloured by expert and the per-token KL figure.

Plain functions over the dict of `tomoe_core.eval.metrics.compare_generation` plus the converted
model's expert per generated token (one layer), so the page stays thin and tests need no browser.
"""
from __future__ import annotations

import html

import plotly.graph_objects as go

from .routing_figures import EXPERT_COLORS  # one palette for experts across the studio


def expert_color(expert: int, alpha: float = 0.35) -> str:
    hex_ = EXPERT_COLORS[int(expert) % len(EXPERT_COLORS)].lstrip("#")
    r, g, b = (int(hex_[i:i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r},{g},{b},{alpha})"


def _visible(token: str) -> str:
    """Token text for HTML: escaped, newlines shown as a return symbol so spans stay on one line."""
    return html.escape(token).replace("\n", "↵")


def budget_options(budget_range: tuple[float, float], default: float | None, step: float = 0.05) -> list[float]:
    """Budgets offered for a budget-conditioned conversion: every `step` inside its range, plus its own."""
    lo, hi = budget_range
    n = int(round((hi - lo) / step))
    options = {round(lo + i * step, 4) for i in range(n + 1) if lo + i * step <= hi + 1e-9}
    if default is not None and lo - 1e-9 <= float(default) <= hi + 1e-9:
        options.add(round(float(default), 4))
    return sorted(options)


def run_label(conversion: str, budget: float | None) -> str:
    """How a generation names the model that made it."""
    return conversion if budget is None else f"{conversion} at p = {budget:g}"


def diverging_positions(dense_ids: list[int], moe_ids: list[int]) -> set[int]:
    """Positions where the two continuations hold different tokens (or only one has a token)."""
    n = max(len(dense_ids), len(moe_ids))
    return {i for i in range(n) if i >= len(dense_ids) or i >= len(moe_ids) or dense_ids[i] != moe_ids[i]}


def tokens_html(tokens: list[str], differs: set[int], first_divergence: int | None,
                experts: list[int] | None = None, probs: list[float] | None = None,
                kl: list[float] | None = None, layer: int | None = None, prompt: str = "") -> str:
    """One continuation as HTML spans. Experts colour the background; tokens that differ from the other
    model's token at the same position are underlined in red; the first divergence gets a marker.
    Hovering a token shows its expert, router probability and KL to dense."""
    spans = []
    for i, tok in enumerate(tokens):
        style = ["padding:1px 1px", "border-radius:3px", "white-space:pre-wrap"]
        title = [f"token {i}: {tok!r}"]
        if experts is not None and i < len(experts):
            style.append(f"background:{expert_color(experts[i])}")
            title.append(f"expert {experts[i]} (layer {layer})")
            if probs is not None and i < len(probs):
                title.append(f"router probability {probs[i]:.2f}")
        if kl is not None and i < len(kl):
            title.append(f"KL to dense {kl[i]:.3f} nats")
        if i in differs:
            style.append("text-decoration:underline 2px #dc2626")
            title.append("differs from the other model here")
        marker = ('<span style="color:#dc2626;font-weight:700" title="first divergence">▌</span>'
                  if i == first_divergence else "")
        spans.append(f'{marker}<span class="tok" style="{";".join(style)}" '
                     f'title="{html.escape(" · ".join(title))}">{_visible(tok)}</span>')
    body = "".join(spans) or "<i>(no tokens)</i>"
    if prompt:
        body = f'<span style="color:#6b7280" title="prompt">{_visible(prompt)}</span>' + body
    return f'<div style="font-family:ui-monospace,monospace;font-size:0.92rem;line-height:1.9">{body}</div>'


def legend_html(experts: list[int]) -> str:
    items = [f'<span style="background:{expert_color(e)};padding:1px 6px;border-radius:3px;margin-right:4px">'
             f'expert {e}</span>' for e in sorted(set(int(x) for x in experts))]
    return f'<div style="font-size:0.8rem">{"".join(items)}</div>'


def kl_figure(tokens: list[str], kl: list[float], experts: list[int] | None = None,
              first_divergence: int | None = None) -> go.Figure:
    """KL(dense || ToMoE) of the distribution that produced each generated token, coloured by expert."""
    colors = [EXPERT_COLORS[int(e) % len(EXPERT_COLORS)] for e in experts] if experts else "#4338ca"
    labels = [f"{i}: {t!r}" for i, t in enumerate(tokens)]
    fig = go.Figure(go.Bar(x=list(range(len(kl))), y=kl, marker_color=colors,
                           hovertext=[f"{lab}<br>KL {v:.3f} nats" + (f"<br>expert {experts[i]}" if experts else "")
                                      for i, (lab, v) in enumerate(zip(labels, kl))], hoverinfo="text"))
    if first_divergence is not None:
        fig.add_vline(x=first_divergence - 0.5, line=dict(color="#dc2626", dash="dash"),
                      annotation_text="first divergence", annotation_position="top right",
                      annotation=dict(yanchor="bottom", font=dict(size=11)))  # above the bars, not on them
    fig.update_layout(height=230, margin=dict(l=10, r=10, t=40, b=10), template="plotly_white",
                      xaxis_title="generated token", yaxis_title="KL to dense (nats)", showlegend=False)
    return fig


def generated_routing(moe, tokenizer, prompt: str, new_ids: list[int], device="cpu"):
    """Expert and router probability of every generated token in every layer: one forward of
    prompt + continuation under `capture_routing` (routing is a deterministic argmax, so this is the
    routing the tokens got while being generated). -> (experts (L, n) int, probs (L, n) float)."""
    import torch

    from tomoe_core.eval.metrics import encode_prompt
    from tomoe_core.trace.capture import capture_routing

    prompt_ids = encode_prompt(tokenizer, prompt, moe)[0].tolist()
    ids = torch.tensor([prompt_ids + list(new_ids)], device=device)
    with torch.inference_mode(), capture_routing(moe) as records:
        moe(input_ids=ids)
    experts, probs = records.stacked()  # (L, T)
    p = len(prompt_ids)
    return experts[:, p:], probs[:, p:]


def continuation_html(row: dict) -> str:
    """One prompt's dense and converted continuations side by side; the converted text is marked from
    the first character where it leaves the dense text."""
    dense, moe = row.get("dense", ""), row.get("moe", "")
    common = next((i for i, (a, b) in enumerate(zip(dense, moe)) if a != b), min(len(dense), len(moe)))
    prompt = f'<span style="color:#6b7280">{html.escape(row.get("prompt", ""))}</span>'
    kl = row.get("mean_kl")
    kl_text = "" if kl is None else f' <span style="color:#6b7280;font-size:0.85em">(mean KL {kl:.2f})</span>'
    moe_html = html.escape(moe[:common])
    if common < len(moe):
        moe_html += f'<span style="color:#b91c1c;text-decoration:underline">{html.escape(moe[common:])}</span>'
    cell = 'style="padding:4px 8px;vertical-align:top;width:50%"'
    return (f'<table style="width:100%;border-collapse:collapse;font-size:0.92em"><tr>'
            f'<td {cell}><b>Dense</b><br>{prompt}{html.escape(dense)}</td>'
            f'<td {cell}><b>ToMoE</b>{kl_text}<br>{prompt}{moe_html}</td></tr></table>')
