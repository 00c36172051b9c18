"""Budget explorer (landing page): slide the active-parameter budget, see cost against quality."""
import json
import math
from pathlib import Path

import streamlit as st

from analysis import tradeoff
from app import ui

st.title("Budget explorer")
st.caption("What a smaller active-parameter budget costs in quality and saves in compute and money. "
           "Numbers come from the conversions and result files under `cache/`; every card says where its number "
           "comes from.")

cat = ui.read_catalog()
ui.show_problems(cat.problems)
costs = tradeoff.cost_models(cat.conversions, cat.results)
points = tradeoff.quality_points(cat.results, costs)
speed = tradeoff.speed_rows(cat.results)

if not costs:
    st.info("No conversion yet, so there is no cost model to explore. Start one on the **Runs** page, or run "
            "`python -m tomoe_core convert` (a shipped recipe under `cache/shipped/` also works).", icon="ℹ️")
    st.page_link("pages/runs.py", label="Open Runs", icon=":material/play_circle:")
    st.stop()

models = sorted(costs)
default_model = next((c.model for c in cat.conversions if c.model in costs), models[0])
ui.keep("model", default_model if default_model in costs else models[0])
if st.session_state["model"] not in costs:
    st.session_state["model"] = models[0]
budgets = sorted({c.budget for c in cat.conversions if c.model == st.session_state["model"] and c.budget})
ui.keep("budget", float(budgets[0]) if budgets else 0.5)
ui.keep("precision", next(iter(tradeoff.BYTES_PER_PARAM)))

controls, cards = st.columns([1, 3], gap="large")
with controls:
    if len(models) > 1:
        st.selectbox("Dense model", models, key="model", format_func=lambda m: Path(m).name)
    cost = costs[st.session_state["model"]]
    st.slider("Active MLP budget p", min_value=0.1, max_value=1.0, step=0.05, key="budget",
              help="Fraction of the MLP parameters each token uses (the conversion's budget). Attention, "
                   "lm_head and norms are always active.")
    budget = float(st.session_state["budget"])
    speed = speed[speed["model"] == st.session_state["model"]]
    measured_machines = sorted(speed["machine"].dropna().unique()) if not speed.empty else []
    options = [f"measured: {m}" for m in measured_machines] + [h.name for h in tradeoff.HARDWARE]
    ui.keep("hardware", options[0])  # a measured machine first, where a speed benchmark exists
    if st.session_state["hardware"] not in options:
        st.session_state["hardware"] = options[0]
    st.selectbox("Hardware", options, key="hardware",
                 help="A measured machine uses the speed benchmark; other hardware gets a bandwidth-bound estimate.")
    hw = next((h for h in tradeoff.HARDWARE if h.name == st.session_state["hardware"]), None)
    ui.keep(f"price::{st.session_state['hardware']}", hw.price_per_hour if hw else 1.0)
    st.number_input("GPU-hour price (USD)", min_value=0.0, step=0.1, format="%.2f",
                    key=f"price::{st.session_state['hardware']}")
    price = float(st.session_state[f"price::{st.session_state['hardware']}"])
    if hw is not None:
        ui.keep(f"bandwidth::{hw.name}", float(hw.bandwidth_gb_s))
        st.number_input("Memory bandwidth (GB/s)", min_value=1.0, step=50.0, key=f"bandwidth::{hw.name}")
        st.selectbox("Weight precision", list(tradeoff.BYTES_PER_PARAM), key="precision")

kpi = cost.at_budget(budget)
bytes_per_param = tradeoff.BYTES_PER_PARAM[st.session_state["precision"]]
if hw is not None:
    bandwidth = float(st.session_state[f"bandwidth::{hw.name}"])
    tps = tradeoff.bandwidth_bound_tokens_per_s(kpi["active_params"], bytes_per_param, bandwidth)
    dense_tps = tradeoff.bandwidth_bound_tokens_per_s(kpi["dense_params"], bytes_per_param, bandwidth)
    speed_label = (f"estimate, not a measurement: batch-1 decode bound by memory bandwidth, {bandwidth:,.0f} GB/s / "
                   f"({kpi['active_params'] / 1e6:.1f} M active weights x {bytes_per_param:g} bytes)")
    memory_mb = tradeoff.weights_memory_mb(cost, bytes_per_param)
    memory_label = (f"estimate: weights only, shared layout (one copy of the union channels, about the dense size), "
                    f"{st.session_state['precision']}")
else:
    machine = st.session_state["hardware"].removeprefix("measured: ")
    rows = speed[speed["machine"] == machine]
    measured = tradeoff.measured_speed(rows, budget)
    dense_measured = tradeoff.measured_speed(rows, 1.0)
    tps = measured.tokens_per_s if measured else None
    dense_tps = dense_measured.tokens_per_s if dense_measured else None
    speed_label = measured.label if measured else f"not measured at p = {budget:g} on {machine}"
    memory_mb = measured.peak_memory_mb if measured else None
    memory_label = measured.label if measured else speed_label
usd = tradeoff.cost_per_million_tokens(tps, price) if tps else math.nan
dense_usd = tradeoff.cost_per_million_tokens(dense_tps, price) if dense_tps else math.nan

sets = tradeoff.eval_sets(points)
ui.keep("eval_set", sets[0] if sets else None)
if sets and st.session_state["eval_set"] not in sets:
    st.session_state["eval_set"] = sets[0]
# budget-conditioned conversions here (not their rebudgeted copies, which have no hypernetwork), best curve first
conditioned = {c.name: c for c in cat.conversions if c.budget_range and not c.meta.get("derived_from")
               and c.model == st.session_state["model"] and c.materialised}
order = list(tradeoff.conditioned_curves(points[points["eval_set"] == st.session_state["eval_set"]])) if sets else []
conditioned = dict(sorted(conditioned.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))
if conditioned:
    ui.keep("conditioned_conversion", next(iter(conditioned)))
    if st.session_state["conditioned_conversion"] not in conditioned:
        st.session_state["conditioned_conversion"] = next(iter(conditioned))
chosen = st.session_state["conditioned_conversion"] if len(conditioned) > 1 else None
quality = tradeoff.quality_at_budget(points, st.session_state["eval_set"], budget, conversion=chosen) if sets else None

with cards:
    estimate = "" if hw is None else " (est.)"
    row1 = st.columns(4)
    row1[0].metric("Active params", tradeoff.format_params(kpi["active_params"]),
                   f"{kpi['active_ratio']:.1%} of dense", delta_color="off", delta_arrow="off", border=True,
                   help=f"parameters multiplied per token: attention + p x MLP + lm_head + norms/routers; dense: "
                        f"{tradeoff.format_params(kpi['dense_params'])} (embedding lookups excluded)")
    row1[1].metric("FLOPs / token", tradeoff.format_flops(kpi["flops_per_token"]),
                   f"{kpi['flops_per_token'] / kpi['dense_flops'] - 1:+.1%} vs dense", delta_color="inverse",
                   border=True, help=f"2 x active multiply-adds + attention scores at a {kpi['context']}-token context")
    row1[2].metric(f"Tokens/s{estimate}", "—" if not tps else f"{tps:,.0f}",
                   None if not (tps and dense_tps) else f"{tps / dense_tps:.2f}x dense", border=True, help=speed_label)
    row1[3].metric(f"$/M tokens{estimate}", tradeoff.format_usd(usd),
                   None if math.isnan(usd) or math.isnan(dense_usd) else f"{usd / dense_usd - 1:+.0%} vs dense",
                   delta_color="inverse", border=True,
                   help=f"GPU-hour price / tokens per hour; {speed_label}")
    row2 = st.columns(4)
    row2[0].metric(f"Memory{estimate}", "—" if not memory_mb else f"{memory_mb:,.0f} MB", border=True,
                   help=memory_label)
    if quality and quality.perplexity is not None:
        q_help = f"{quality.label}; evaluation set: {st.session_state['eval_set']}"
        ppl_delta = (f"{quality.perplexity / quality.dense_perplexity - 1:+.0%} vs dense"
                     if quality.dense_perplexity else None)
        q_help += f"; dense perplexity {quality.dense_perplexity:.2f}" if quality.dense_perplexity else ""
        suffix = " (nearest)" if "nearest" in quality.label else ""
        row2[1].metric(f"Perplexity{suffix}", f"{quality.perplexity:.2f}", ppl_delta, delta_color="inverse",
                       border=True, help=f"held-out perplexity; {q_help}")
        row2[2].metric(f"KL to dense{suffix}", f"{quality.kl_to_dense:.3f}", border=True,
                       help=f"KL(dense || ToMoE) of the next-token distribution, nats per token; {q_help}")
        row2[3].metric(f"Top-1 agreement{suffix}", f"{quality.top1_agreement:.1%}", border=True,
                       help=f"share of positions where ToMoE's most likely next token is the dense model's; {q_help}")
        source = quality.label
        if quality.best_baseline:
            b = quality.best_baseline
            verdict = "better" if quality.perplexity < b["perplexity"] else "worse"
            source += (f". Best static pruning at p = {b['budget']:g}: {b['method']}, perplexity "
                       f"{b['perplexity']:.2f}; ToMoE is {verdict}")
        st.caption(f"Quality: {source}.")
    else:
        for col, label in zip(row2[1:], ("Perplexity", "KL to dense", "Top-1 agreement")):
            col.metric(label, "—", border=True, help="no ToMoE quality result at this budget yet")
        note = "no evaluation yet" if quality is None else quality.label
        if quality and quality.best_baseline:
            b = quality.best_baseline
            note += f". Best static pruning at p = {b['budget']:g}: {b['method']}, perplexity {b['perplexity']:.2f}"
        st.caption(f"Quality: {note}. Measure ToMoE with `python -m tomoe_core evaluate cache/conversions/NAME` "
                   "or `python -m benchmarks.quality`.")
    st.caption(f"Speed and cost: {speed_label}.")

if conditioned:
    conv = conditioned[st.session_state["conditioned_conversion"]]
    if len(conditioned) > 1:
        st.selectbox("Budget-conditioned conversion", list(conditioned), key="conditioned_conversion",
                     help="best measured curve first; the quality cards above read the chosen one's curve")
    lo, hi = conv.budget_range
    inside = lo - 1e-9 <= budget <= hi + 1e-9
    st.info(f"**{conv.name}** is budget-conditioned: one conversion serves every budget in [{lo:g}, {hi:g}]. "
            + ("Materialise it at this budget to check the active ratio it reaches (seconds)." if inside else
               f"p = {budget:g} is outside its range: materialising moves the mask threshold instead "
               "(threshold-moved, not trained for this budget)."), icon=":material/tune:")
    if st.button(f"Materialise {conv.name} at p = {budget:g}", key="materialise_at"):
        with st.spinner(f"materialising at p = {budget:g}..."):
            try:
                _model, meta, seconds = ui.model_at_budget(  # recalibrated gaps make another model
                    str(conv.path), round(budget, 4),
                    f"{conv.meta.get('weights_sha256')}:{json.dumps(conv.meta.get('anchor_gaps'), sort_keys=True)}")
            except ui.user_error_types() as err:
                st.error(str(err))
            else:
                acc = meta["accounting"]
                at = meta["mask_calibration"].get("generated_at")
                widened = (f" (experts generated for p = {at:g} and widened to {budget:g}, as the conversion's "
                           "anchor calibration chose)" if inside and at is not None and at < budget - 1e-6 else "")
                st.success(f"{meta['budget_source']}{widened}: MLP active ratio {acc['mlp_active_ratio']:.4f} "
                           f"(requested {budget:g}), {acc['active_total'] / 1e6:.1f} M active params per token, "
                           f"materialised in {seconds:.1f} s")

st.subheader("Quality against active parameters")
if len(sets) > 1:
    st.selectbox("Evaluation set (perplexities are comparable only within one)", sets, key="eval_set")
st.plotly_chart(tradeoff.pareto_figure(points, st.session_state["eval_set"], budget, cost), key="pareto")
shown_kinds = set(points.loc[points["eval_set"] == st.session_state["eval_set"], "kind"]) if sets else set()
if shown_kinds & {"dynamic, training-free", "ceiling"}:
    st.caption("Dynamic, training-free (TEAL-, CATS-style): magnitude thresholds pick different MLP weights for "
               "every token, with no training; their active parameters are the weights the held-out tokens used, "
               "and saving time with them needs per-token gathers. The dashed ceiling is the per-token oracle: it "
               "chooses each token's channels knowing all of its activations, so no runnable method reaches it.")

with st.expander("Measured points and how the numbers are computed"):
    st.markdown(tradeoff.__doc__.split("\n", 2)[2])
    if not points.empty:
        st.dataframe(points[points["eval_set"] == st.session_state["eval_set"]].drop(columns=["eval_set"]),
                     hide_index=True)

recipes = tuple(sorted(c.name for c in cat.conversions if not c.materialised))
if recipes:  # a fresh clone: get the shipped conversion ready for Compare while the user reads this page
    ui.prepare_shipped_in_background(recipes)
