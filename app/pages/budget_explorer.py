"""Budget explorer (landing page): slide the active-parameter budget, see cost against quality."""
from pathlib import Path

import streamlit as st

from analysis import card_format, compare_view, continuations, speed_cards, tradeoff, tradeoff_figure
from app import projection_panel, speed_job, ui

st.title("Budget explorer")
st.caption("What a smaller active-parameter budget costs in quality and saves in compute and money. "
           "Numbers come from the conversions and result files under `cache/`; every card says where its number "
           "comes from.")

cat = ui.read_catalog()
ui.show_problems(cat.problems)
costs = tradeoff.cost_models(cat.conversions, cat.results)
points = tradeoff.quality_points(cat.results, costs)
speed_all = speed_cards.speed_rows(cat.results)

if not costs:
    st.info("No conversion yet, so there is no cost model to explore. Start one on the **Runs** page, or run "
            "`python -m tomoe_core convert` (a shipped recipe under `cache/shipped/` also works).", icon="ℹ️")
    st.page_link("pages/runs.py", label="Open Runs", icon=":material/play_circle:")
    st.stop()

models = sorted(costs)
# the model with the most measurements opens the page (a local experiment with one result does not)
default_model = max(models, key=lambda m: (int((points["model"] == m).sum()) + int((speed_all["model"] == m).sum()),
                                           any(c.model == m for c in cat.conversions)))
ui.keep("model", default_model if default_model in costs else models[0])
if st.session_state["model"] not in costs:
    st.session_state["model"] = models[0]
budgets = sorted({c.budget for c in cat.conversions if c.model == st.session_state["model"] and c.budget})
ui.keep("budget", float(budgets[0]) if budgets else 0.5)

controls, cards = st.columns([1.2, 4], gap="large")
with controls:
    if len(models) > 1:
        st.selectbox("Dense model", models, key="model", format_func=lambda m: Path(m).name)
    cost = costs[st.session_state["model"]]
    st.slider("Active MLP budget p", min_value=0.1, max_value=1.0, step=0.05, key="budget",
              help="Fraction of the MLP parameters each token uses (the conversion's budget). Attention, "
                   "lm_head and norms are always active. p = 1 is the dense model.")
    budget = float(st.session_state["budget"])
    sources = speed_cards.speed_sources(cat.results)
    if sources:
        ui.keep("speed_source", sources[0])
        if st.session_state["speed_source"] not in sources:
            st.session_state["speed_source"] = sources[0]
        if len(sources) > 1:
            st.selectbox("Speed measurement (one file per machine)", sources, key="speed_source")
    speed = speed_cards.speed_rows(cat.results, st.session_state.get("speed_source"))
    speed = speed[speed["model"] == st.session_state["model"]]
    choices = speed_cards.speed_choices(speed)
    for key, options in (("layout", choices["layouts"]), ("threads", choices["threads"]), ("batch", choices["batches"])):
        if options:
            ui.keep(key, options[0])
            if st.session_state[key] not in options:
                st.session_state[key] = options[0]
    if choices["layouts"]:
        st.selectbox("MoE layout", choices["layouts"], key="layout",
                     help="How the converted model stores its experts (the layouts the speed file measured): "
                          "speed and memory below are this layout's. indexed / shared keep one copy of the "
                          "weights; packed copies each expert's weights (faster on some machines, about E x p x "
                          "the MLP memory).")
        st.selectbox("Torch threads", choices["threads"], key="threads")
        st.selectbox("Batch (sequences decoded together)", choices["batches"], key="batch")
    ui.keep("price_per_hour", 0.10)
    st.number_input("Price of this machine per hour (USD)", min_value=0.0, step=0.05, format="%.2f",
                    key="price_per_hour", help="Yours to set: a 2-vCPU cloud machine costs roughly $0.05-0.10 "
                                               "an hour, a GPU $0.5-4 (see the projection below).")
    price = float(st.session_state["price_per_hour"])
    speed_job.render(cat.conversions, st.session_state["model"])

kpi = cost.at_budget(budget)
at_speed = (speed_cards.speed_at_budget(speed, budget, st.session_state["layout"], st.session_state["threads"],
                                        st.session_state["batch"]) if choices["layouts"] else None)
tps = at_speed.tokens_per_s.value if at_speed else None
dense_tps = at_speed.dense_tokens_per_s if at_speed else None
usd = tradeoff.cost_per_million_tokens(tps, price)
dense_usd = tradeoff.cost_per_million_tokens(dense_tps, price)

points = points[points["model"] == st.session_state["model"]]
sets = tradeoff.eval_sets(points)
ui.keep("eval_set", sets[0] if sets else None)
if sets and st.session_state["eval_set"] not in sets:
    st.session_state["eval_set"] = sets[0]
# budget-conditioned conversions here (not their rebudgeted copies, which have no hypernetwork), best curve first
conditioned = {c.name: c for c in cat.conversions if c.is_conditioned and c.model == st.session_state["model"]}
order = list(tradeoff.conditioned_curves(points[points["eval_set"] == st.session_state["eval_set"]])) if sets else []
conditioned = dict(sorted(conditioned.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))
if conditioned:
    ui.keep("conditioned_conversion", next(iter(conditioned)))
    if st.session_state["conditioned_conversion"] not in conditioned:
        st.session_state["conditioned_conversion"] = next(iter(conditioned))
chosen = st.session_state["conditioned_conversion"] if len(conditioned) > 1 else None
# cards quote only conversions the user has (materialised, shipped, or the source of a rebudgeted copy)
have = {c.name for c in cat.conversions} | {Path(c.meta["derived_from"]).name for c in cat.conversions
                                           if c.meta.get("derived_from")}
quality = (tradeoff.quality_at_budget(points, st.session_state["eval_set"], budget, conversion=chosen, available=have)
           if sets else None)

SUFFIX = {"interpolated": " (interpolated)", "estimate": " (estimate)", "dense": " (dense)", "missing": ""}


def fmt_tps(x):
    return "—" if x is None else f"{x:,.1f}" if x < 100 else f"{x:,.0f}"


with cards:
    speed_cols, size_cols = st.columns(3), st.columns(3)  # speed with its memory and cost, then what p removes
    row1 = [*size_cols[:2], *speed_cols]
    prefill_col = size_cols[2]  # under the decode card: both from the same speed file
    row1[0].metric("Active params", card_format.format_params(kpi["active_params"]),
                   f"{kpi['active_ratio']:.1%} of dense", delta_color="off", delta_arrow="off", border=True,
                   help=f"parameters multiplied per token: attention + p x MLP + lm_head + norms/routers; dense: "
                        f"{card_format.format_params(kpi['dense_params'])} (embedding lookups excluded)")
    row1[1].metric("FLOPs / token", card_format.format_flops(kpi["flops_per_token"]),
                   **card_format.metric_delta(kpi["flops_per_token"], kpi["dense_flops"], lower_is_better=True),
                   border=True,
                   help=f"2 x active multiply-adds + attention scores at a {kpi['context']}-token context")
    if at_speed is None:
        missing = ("no speed benchmark of this model: run `python -m benchmarks.speed` (one file per machine); "
                   "the projection below estimates other hardware")
        for col, label in zip(row1[2:], ("Tokens/s", "Memory", "$/M tokens")):
            col.metric(label, "—", border=True, help=missing)
        st.caption(f"Speed, memory and cost: {missing}.")
    else:
        t, m = at_speed.tokens_per_s, at_speed.memory_mb
        ratio = at_speed.speed_ratio()
        spread = (f"; paired ratio to dense over repeats: median {at_speed.speedup:.2f}x, IQR "
                  f"{at_speed.speedup_iqr[0]:.2f}-{at_speed.speedup_iqr[1]:.2f}x"
                  if at_speed.speedup is not None and at_speed.speedup_iqr else "")
        if at_speed.within_noise_of:
            spread += (f"; within noise of p = {', '.join(f'{b:g}' for b in at_speed.within_noise_of)} "
                       "(their IQRs overlap: no order between them is measured)")
        row1[2].metric(f"Tokens/s{SUFFIX.get(t.status, '')}", fmt_tps(t.value),
                       **card_format.metric_delta(ratio, 1.0 if ratio is not None else None, lower_is_better=False),
                       border=True,
                       help=f"greedy decode, new tokens per second over all {st.session_state['batch']} sequence(s); "
                            f"{t.how}; {at_speed.setting}{spread}")
        prefill = speed_cards.prefill_at_budget(speed, budget, st.session_state["layout"], st.session_state["threads"])
        source = speed["source"].iloc[0] if not speed.empty else None
        prompt_tokens = int(((cat.results.get(source) or {}).get("settings") or {}).get("prefill_tokens") or 512)
        setting_b1 = at_speed.setting.replace(f", batch {st.session_state['batch']}", ", batch 1")
        if prefill is None:
            prefill_col.metric("Prefill tokens/s", "—", border=True,
                               help="this speed file has no prompt (prefill) measurement")
        else:
            p_ratio, pt = prefill.speed_ratio(), prefill.tokens_per_s
            p_spread = (f"; paired ratio to dense over repeats: median {prefill.speedup:.2f}x, IQR "
                        f"{prefill.speedup_iqr[0]:.2f}-{prefill.speedup_iqr[1]:.2f}x"
                        if prefill.speedup is not None and prefill.speedup_iqr else "")
            prefill_col.metric(f"Prefill tokens/s{SUFFIX.get(pt.status, '')}", fmt_tps(pt.value),
                               **card_format.metric_delta(p_ratio, 1.0 if p_ratio is not None else None,
                                                          lower_is_better=False), border=True,
                               help=f"a {prompt_tokens}-token prompt in one pass, batch 1 (time to first token = "
                                    f"{prompt_tokens} / this); {pt.how}; dense {fmt_tps(prefill.dense_tokens_per_s)}; "
                                    f"{setting_b1}{p_spread}")
        memory_unit = card_format.memory_unit(m.value, at_speed.dense_memory_mb)  # card and help in one unit
        row1[3].metric(f"Memory{SUFFIX.get(m.status, '')}", card_format.format_mb(m.value, memory_unit),
                       **card_format.metric_delta(m.value, at_speed.dense_memory_mb, lower_is_better=True),
                       border=True,
                       help=f"{at_speed.memory_kind or 'peak memory'} of the {st.session_state['layout']} layout "
                            f"at batch {st.session_state['batch']}; {m.how}; dense "
                            f"{card_format.format_mb(at_speed.dense_memory_mb, memory_unit)}; {at_speed.setting}")
        if price <= 0:
            row1[4].metric("$/M tokens", "—", border=True, help="the price per hour is 0: enter a price to see costs")
        else:
            row1[4].metric(f"$/M tokens{SUFFIX.get(t.status, '')}", card_format.format_usd(usd),
                           **card_format.metric_delta(usd, dense_usd, lower_is_better=True), border=True,
                           help=f"price per hour / (tokens/s x 3600) x 1e6 at ${price:.2f}/h and the tokens/s "
                                f"beside it ({t.how})")
        noise = (f" Its speed is within noise of p = {', '.join(f'{b:g}' for b in at_speed.within_noise_of)}: "
                 "their paired-ratio IQRs overlap, so no order between them is measured."
                 if at_speed.within_noise_of else "")
        st.caption(f"Speed and memory at p = {budget:g}: tokens/s {t.how}; memory {m.how}. "
                   f"Measured on {at_speed.setting}.{noise}")
        if price <= 0:
            st.info("The price per hour is 0, so every budget costs $0 per million tokens: enter what this "
                    "machine costs you to compare costs.", icon=":material/payments:")
    q_row = [*st.columns(2), *st.columns(2)]  # two by two: a card's label keeps its "(p = 0.3, nearest)"
    if quality and quality.perplexity is not None:
        q_suffix = {"interpolated": " (interpolated)", "dense": " (dense)",
                    "nearest": f" (p = {quality.budget:g}, nearest)"}.get(quality.status, "")
        q_help = f"{quality.label}; evaluation set: {st.session_state['eval_set']}"
        q_help += f"; dense perplexity {quality.dense_perplexity:.2f}" if quality.dense_perplexity else ""
        q_row[0].metric(f"Perplexity{q_suffix}", f"{quality.perplexity:.2f}",
                        **card_format.metric_delta(quality.perplexity, quality.dense_perplexity, lower_is_better=True),
                        border=True, help=f"held-out perplexity; {q_help}")
        q_row[1].metric(f"Top-1 agreement{q_suffix}",
                        "—" if quality.top1_agreement is None else f"{quality.top1_agreement:.1%}", border=True,
                        help=f"share of positions where the model's most likely next token is the dense model's; {q_help}")
        if quality.last_word_accuracy is not None:
            lwa, dense_lwa = quality.last_word_accuracy, quality.dense_last_word_accuracy
            q_row[2].metric(f"Last-word accuracy{q_suffix}", f"{lwa:.1%}",
                            None if quality.status == "dense" or dense_lwa is None else
                            f"{(lwa - dense_lwa) * 100:+.1f} pts vs dense", delta_color="normal", border=True,
                            help="share of held-out passages whose last word the model predicts exactly (LAMBADA-"
                                 f"style){'; dense ' + format(dense_lwa, '.1%') if dense_lwa is not None else ''}; "
                                 f"{q_help}")
        else:
            q_row[2].metric("Last-word accuracy", "—", border=True,
                            help="not in this evaluation set's result file (measured by `python -m benchmarks.quality` "
                                 "where it records last_word_accuracy)")
        q_row[3].metric(f"KL to dense{q_suffix}",
                        "—" if quality.kl_to_dense is None else f"{quality.kl_to_dense:.3f} nats",
                        border=True, help=f"KL(dense || model) of the next-token distribution, nats per token; {q_help}")
        source = quality.label
        if quality.best_baseline:
            b = quality.best_baseline
            verdict = "better" if quality.perplexity < b["perplexity"] else "worse"
            source += (f". Best static pruning at p = {b['budget']:g}: {tradeoff_figure.method_name(b['method'])}, "
                       f"perplexity {b['perplexity']:.2f}; ToMoE is {verdict}")
        st.caption(f"Quality: {source}.")
    else:
        for col, label in zip(q_row, ("Perplexity", "Top-1 agreement", "Last-word accuracy", "KL to dense")):
            col.metric(label, "—", border=True, help="no ToMoE quality result at this budget yet")
        note = "no evaluation yet" if quality is None else quality.label
        if quality and quality.best_baseline:
            b = quality.best_baseline
            note += f". Best static pruning at p = {b['budget']:g}: {b['method']}, perplexity {b['perplexity']:.2f}"
        st.caption(f"Quality: {note}. Measure ToMoE with `python -m tomoe_core evaluate cache/conversions/NAME` "
                   "or `python -m benchmarks.quality`.")

texts = continuations.continuations_at(cat.results, budget, st.session_state["model"], have)
if texts and budget < 1.0 - 1e-9:
    where = (f"p = {texts.budget:g}" if texts.exact else
             f"p = {texts.budget:g}, the nearest precomputed budget to {budget:g}")
    with st.expander(f"What the text looks like at {where}", expanded=False):
        st.caption(f"Greedy continuations ({texts.new_tokens} tokens) of fixed prompts by the dense model and "
                   f"`{texts.conversion}` at {where}, computed in advance by `python -m benchmarks.continuations` "
                   f"({texts.source}). Red marks where the converted model's text leaves the dense model's.")
        for row in texts.rows:
            st.html(compare_view.continuation_html(row))

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
                _model, meta, seconds = ui.conditioned_model(conv, budget)
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
from app import own_text_panel  # noqa: E402

own_text_panel.render(st.session_state["model"])
ui.keep("show_catastrophic", False)
shown_points = points[points["eval_set"] == st.session_state["eval_set"]] if sets else points
catastrophic = tradeoff_figure.catastrophic_methods(shown_points, quality.dense_perplexity if quality else None)
st.toggle("Show catastrophic baselines", key="show_catastrophic",
          help=f"methods worse than {tradeoff_figure.CATASTROPHIC_RATIO:g}x the dense perplexity at every budget measured "
               f"(here: {', '.join(map(tradeoff_figure.method_name, catastrophic)) or 'none'}); shown, they clip the axis "
               f"at {tradeoff_figure.CLIP_RATIO:g}x dense")
st.plotly_chart(tradeoff_figure.pareto_figure(points, st.session_state["eval_set"], budget, cost,
                                       show_catastrophic=st.session_state["show_catastrophic"], conversion=chosen),
                key="pareto")
shown_kinds = set(points.loc[points["eval_set"] == st.session_state["eval_set"], "kind"]) if sets else set()
if shown_kinds & {"dynamic, training-free", "ceiling"}:
    st.caption("Dynamic, training-free (TEAL-, CATS-style): magnitude thresholds pick different MLP weights for "
               "every token, with no training; their active parameters are the weights the held-out tokens used, "
               "and saving time with them needs per-token gathers. The dashed ceiling is the per-token oracle: it "
               "chooses each token's channels knowing all of its activations, so no runnable method reaches it.")
    structural = speed_cards.structural_speed_summary(cat.results)
    if structural:
        st.caption(structural)

from app import equal_speed_panel  # noqa: E402

equal_speed_panel.render(cat.results, points, st.session_state["eval_set"] if sets else None, budget,
                         st.session_state.get("threads"), st.session_state.get("layout"),
                         st.session_state.get("speed_source"), chosen, st.session_state["model"])

with st.expander("Measured points and how the numbers are computed"):
    st.markdown(tradeoff.__doc__.split("\n", 2)[2])
    if not points.empty:
        st.dataframe(points[points["eval_set"] == st.session_state["eval_set"]].drop(columns=["eval_set"]),
                     hide_index=True)

if sets:
    curve = tradeoff.tomoe_curve(points, st.session_state["eval_set"], chosen)
    curve_label = f"ToMoE on {Path(st.session_state['model']).name}, {st.session_state['eval_set'].split(' · ', 1)[-1]}"
else:
    curve, curve_label = None, "no measurement yet"
projection_panel.render(budget, curve, curve_label, st.session_state.get("layout"))

recipes = tuple(sorted(c.name for c in cat.conversions if not c.materialised))
if recipes:  # a fresh clone: get the shipped conversion ready for Compare while the user reads this page
    ui.prepare_shipped_in_background(recipes)
