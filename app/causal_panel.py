"""The Experts page's causal sections: expert ablation (start it as a background job, then the
expert x tag loss-increase heatmap beside the lift heatmap, a verdict per named cluster, the tokens
an expert is most needed for) and routing across budgets of one conversion."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st

from app import ui

HELP = {
    "ablation": "Each expert of each layer is removed in turn: the tokens the router sends to it go to their "
                "second-choice expert instead (or, as a control, to a random other expert), and every token's "
                "next-token loss is compared with the unablated model's. What the lift heatmap shows is who the "
                "expert receives; this shows who would suffer without it.",
    "replacement": "Second choice: the router's next-best expert takes the tokens (the smallest change routing "
                   "allows). Random: a uniformly random other expert (the control: what losing the routing "
                   "decision costs).",
    "scope": "Its tokens: only the tokens routed to the removed expert. All tokens: every token of that tag, "
             "including those hit only through attention to earlier changed tokens (total effect only: the direct "
             "effect touches nothing else).",
    "verdicts": "For each cluster named by tags: the mean loss increase (or KL) on tokens of the named tags "
                "against the other tokens, when the cluster's experts are removed one at a time (total effect: all "
                "tokens; direct effect: the experts' own tokens; the replacement chosen above), with a 95 % bootstrap interval of the difference (over the member "
                "experts from 5 of them, else over tokens). The name holds causally when the whole interval is "
                "above 0; 'the opposite holds' when it is below.",
    "effect": "Total (exact): the model reruns with the expert removed for all its tokens at once; every token's "
              "change counts, direct and through attention on later tokens. Direct (fast estimate): every token "
              "loses its own expert at once while attention stays as in the unablated model, so each token shows "
              "what its own expert did for it along its own path (E times fewer passes; equal to the total effect "
              "at the last layer, an approximation before it: the caption gives its agreement with the total).",
    "metric": "Loss increase: the change in the next-token loss (harm, can be negative: a second choice can "
              "predict better). KL: how far the next-token distribution moves from the unablated model's "
              "(disruption, never negative, less noisy).",
    "needed": "The tokens routed to this expert whose loss rises most in total when it is removed.",
    "budgets": "The same text traced at several budgets of one budget-conditioned conversion. Routing ARI: "
               "adjusted Rand index between the two budgets' expert choices per layer (1: the same partition "
               "of the tokens, 0: chance). Role cosine: median over experts of the cosine between an expert's "
               "tag preferences (its tag shares minus the layer's mix) at the two budgets.",
}


EFFECT_NAMES = {"total": "total (exact)", "direct": "direct (fast estimate)"}


@st.cache_data(show_spinner="Reading the ablation...", max_entries=16)
def _by_tag(key: tuple, layer: int, replacement: str, scope: str, label: str, metric: str,
            effect: str) -> pd.DataFrame:
    from analysis.causal import ablation_by_tag

    return ablation_by_tag(key[0], layer, replacement=replacement, scope=scope, label=label, metric=metric,
                           effect=effect)


@st.cache_data(show_spinner=False, max_entries=16)
def _verdicts(key: tuple, experts: pd.DataFrame, label: str, replacement: str, metric: str,
              effect: str) -> pd.DataFrame:
    from analysis.causal import cluster_verdicts

    return cluster_verdicts(key[0], experts, replacement=replacement, label=label, metric=metric, effect=effect)


@st.cache_data(show_spinner=False, max_entries=32)
def _needed(key: tuple, layer: int, expert: int, replacement: str, effect: str) -> pd.DataFrame:
    from analysis.causal import needed_tokens

    return needed_tokens(key[0], layer, expert, replacement=replacement, effect=effect)


@st.cache_data(show_spinner=False, max_entries=4)
def _agreement_of_effects(key: tuple, replacement: str) -> dict:
    from analysis.causal import effect_agreement

    return effect_agreement(key[0], replacement)


@st.cache_data(show_spinner=False, max_entries=8)
def _plan(key: tuple, layers: tuple | None, max_tokens: int, effect: str):
    """The ablation plan's cost line, tokens, layers and passes (reading the log once per change)."""
    from tomoe_core.trace.ablation import plan_ablation

    plan = plan_ablation(key[0], layers=list(layers) if layers else None, max_tokens=max_tokens, effect=effect)
    return plan.cost(), plan.tokens, plan.layers, plan.passes


def _running_job(folder: Path):
    from tomoe_core.infra import jobs
    from tomoe_core.trace.ablation import EFFECTS, ablation_dir

    targets = {ablation_dir(folder, e).resolve() for e in EFFECTS}
    return next((j for j in jobs.list_jobs() if j.kind == "ablate" and jobs.status(j) == "running"
                 and j.output and Path(j.output).resolve() in targets), None)


def _start_form(folder: Path, run_key: tuple, default_effect: str = "total") -> None:
    from tomoe_core.infra import jobs
    from tomoe_core.trace.ablation import EFFECTS, AblationError, ablation_dir, default_max_tokens, parse_indices

    if st.session_state.get("ablate_effect_offered") != default_effect:  # a finished ablation changes the offer
        st.session_state["ablate_effect"] = st.session_state["ablate_effect_offered"] = default_effect
    ui.keep("ablate_effect", default_effect)
    st.radio("Effect", EFFECTS, key="ablate_effect", horizontal=True, format_func=EFFECT_NAMES.__getitem__, help=HELP["effect"])
    effect = st.session_state["ablate_effect"]
    c1, c2 = st.columns(2)
    ui.keep(f"ablate_tokens_{effect}", default_max_tokens(effect))
    c1.number_input("Tokens", 16, 100_000, step=256, key=f"ablate_tokens_{effect}",
                    help="The log's first N tokens are rerun; the cost grows with tokens x layers (x experts for "
                         "the total effect).")
    ui.keep("ablate_layers", "all")
    c2.text_input("Layers", key="ablate_layers", help="'all', or indices such as 0,5,12 or 0-3.")
    text = st.session_state["ablate_layers"].strip()
    try:
        layers = None if text in ("", "all") else parse_indices(text)
        cost, tokens, plan_layers, passes = _plan(run_key, tuple(layers) if layers else None,
                                                  int(st.session_state[f"ablate_tokens_{effect}"]), effect)
    except (AblationError, ValueError) as err:  # argparse's type errors are ValueErrors too
        st.error(f"Cannot ablate: {err}")
        return
    st.caption(f"Cost: {cost}. For scale, on SmolLM2-135M and a 2-core CPU (docs/RESULTS.md): the total effect of "
               "1,024 tokens x 30 layers x 8 experts x 2 took about 15 min; the direct effect of 3,000 tokens x 30 "
               "layers x 2, 4 min.")
    if st.button("Run expert ablation", type="primary", help=HELP["ablation"]):
        argv = jobs.python_argv("-m", "tomoe_core", "ablate", str(folder), "--max-tokens", str(tokens),
                                "--effect", effect,
                                *(["--layers", ",".join(map(str, plan_layers))] if layers is not None else []))
        try:
            jobs.start_job("ablate", argv, label=f"ablate {folder.name.removeprefix('run_id=')} ({effect} effect)",
                           output=ablation_dir(folder, effect), total=passes)
        except jobs.JobError as err:
            st.error(str(err))
            return
        st.rerun()


def render_ablation(folder: Path, run_key: tuple, layer: int, num_experts: int, label: str, tag_name: str,
                    lift_figure, experts: pd.DataFrame | None) -> None:
    from analysis.causal_figures import ablation_heatmap
    from tomoe_core.trace.ablation import EFFECTS, has_ablation, read_ablation_meta

    st.subheader("Which tokens need each expert (ablation)", help=HELP["ablation"])
    job = _running_job(folder)
    done = [e for e in EFFECTS if has_ablation(folder, e)]
    if job is not None:  # its progress; a finished ablation of the other effect stays readable under it
        ui.job_progress(job.id, "Expert ablation", "forward passes")
        if not done:
            return
    if not done:
        st.info("No ablation of this log yet: it reruns the text once per (layer, expert) with that expert removed "
                "(or, for the fast direct estimate, once per layer).", icon="ℹ️")
        _start_form(folder, run_key)
        return
    ui.keep("ablate_view_effect", done[0])
    if st.session_state["ablate_view_effect"] not in done:
        st.session_state["ablate_view_effect"] = done[0]
    if len(done) > 1:
        st.radio("Effect shown", done, key="ablate_view_effect", horizontal=True, format_func=EFFECT_NAMES.__getitem__,
                 help=HELP["effect"])
    effect = st.session_state["ablate_view_effect"]
    meta = read_ablation_meta(folder, effect)
    st.caption(f"{EFFECT_NAMES[effect].capitalize()} effect: {meta['tokens']:,} tokens x {len(meta['layers'])} layers x "
               f"{len(meta['experts'])} experts, replacements: {', '.join(meta['replacements'])}; "
               f"{meta['seconds'] / 60:.1f} min on {(meta.get('machine') or {}).get('cpu_count', '?')} CPUs; the model "
               f"reproduced {meta['log_agreement']:.2%} of the log's expert choices. `{meta.get('command', '')}`")
    if effect == "direct" and "total" in done:
        try:
            a = _agreement_of_effects(run_key, "second")
            by_layer = sorted(a["r_by_layer"].items(), key=lambda kv: kv[1])
            span = (f"; per layer from {by_layer[0][1]:.2f} (layer {by_layer[0][0]}) to {by_layer[-1][1]:.2f} "
                    f"(layer {by_layer[-1][0]})" if by_layer else "")
            st.caption(f"Against the exact total effect on the {a['tokens']:,} routed tokens both cover (second choice): "
                       f"Pearson r {a['r_tokens']:.2f} per token, {a['r_expert_means']:.2f} over (layer, expert) means, "
                       f"same sign for {a['same_sign_expert_means']:.0%} of them{span}. Where it is low, attention "
                       "carries much of what removing an expert does.")
        except ValueError:
            pass
    c1, c2, c3 = st.columns(3)
    ui.keep("ablate_metric", "delta_loss")
    c3.radio("Measure", ["delta_loss", "kl"], key="ablate_metric", horizontal=True, help=HELP["metric"],
             format_func=lambda m: {"delta_loss": "loss increase", "kl": "KL"}[m])
    metric = st.session_state["ablate_metric"]
    ui.keep("ablate_replacement", meta["replacements"][0])
    if st.session_state["ablate_replacement"] not in meta["replacements"]:
        st.session_state["ablate_replacement"] = meta["replacements"][0]
    c1.radio("Replacement", meta["replacements"], key="ablate_replacement", horizontal=True, help=HELP["replacement"],
             format_func=lambda r: {"second": "second choice", "random": "random expert (control)"}[r])
    ui.keep("ablate_scope", "routed")
    scopes = ["routed", "all"] if effect == "total" else ["routed"]  # the direct effect only touches routed tokens
    if st.session_state["ablate_scope"] not in scopes:
        st.session_state["ablate_scope"] = "routed"
    c2.radio("Tokens", scopes, key="ablate_scope", horizontal=True, help=HELP["scope"],
             format_func=lambda s: {"routed": "its tokens", "all": "all tokens"}[s])
    replacement = st.session_state["ablate_replacement"]
    if layer not in meta["layers"]:
        st.info(f"Layer {layer} was not ablated (ablated: {', '.join(map(str, meta['layers']))}); pick one with the "
                "layer slider above.", icon="ℹ️")
    else:
        table = _by_tag(run_key, layer, replacement, st.session_state["ablate_scope"], label, metric, effect)
        left, right = st.columns(2, gap="large")
        left.plotly_chart(lift_figure, key="lift_beside_ablation")
        right.plotly_chart(ablation_heatmap(table, layer, num_experts, st.session_state["ablate_scope"], tag_name,
                                            metric=metric), key="ablation_heatmap")
        st.caption(("Mean change in next-token loss" if metric == "delta_loss" else "Mean KL to the unablated model")
                   + " (nats) of the tokens of each tag when the expert is removed; hover for the 95 % bootstrap "
                     "interval (token resamples) and the token count.")
    if experts is not None:
        verdicts = _verdicts(run_key, experts[["layer", "expert", "cluster_name"]], label, replacement, metric, effect)
        st.markdown("**Do the cluster names hold causally?**", help=HELP["verdicts"])
        if verdicts.empty:
            st.caption("No cluster named by a tag has ablated experts.")
        for sentence in verdicts["sentence"]:
            st.markdown(f"- {sentence}")
    st.markdown("**Tokens an expert is most needed for**", help=HELP["needed"])
    ui.keep("needed_expert", 0)
    st.number_input("Expert (of the layer above)", 0, num_experts - 1, key="needed_expert")
    if layer in meta["layers"]:
        needed = _needed(run_key, layer, int(st.session_state["needed_expert"]), replacement, effect)
        if needed.empty:
            st.caption("No token of the log was routed to this expert.")
        else:
            st.dataframe(needed, hide_index=True, column_config={
                "mean_increase": st.column_config.NumberColumn("mean loss increase (nats)", format="%.3f"),
                "total_increase": st.column_config.NumberColumn("total (nats)", format="%.2f")})
    missing = [e for e in EFFECTS if e not in done]
    if job is None:  # one ablation job per log at a time
        with st.expander("Run another ablation" + (f": the {EFFECT_NAMES[missing[0]]} effect" if missing else "")):
            _start_form(folder, run_key, default_effect=missing[0] if missing else effect)


def render_budgets(folder: Path, label: str) -> None:
    from analysis.causal import budget_siblings
    from analysis.causal_figures import budget_agreement_figure

    st.subheader("Roles across budgets", help=HELP["budgets"])
    siblings = budget_siblings(folder)
    if len(siblings) < 2:
        st.caption("Trace the same text at other budgets of this conversion to compare routings, e.g. "
                   "`python -m tomoe_core rebudget CONVERSION --budget 0.3` then `python -m tomoe_core trace "
                   "CONVERSION-at-p0.3 --max-tokens N` with this log's text and token count.")
        return
    try:
        table = _agreement(tuple(sorted(siblings.items())), label)
    except Exception as err:  # a sibling without tags, or unreadable
        st.info(f"Cannot compare the budgets: {err}", icon="ℹ️")
        return
    st.plotly_chart(budget_agreement_figure(table), key="budget_agreement")
    summary = table.groupby("budget")[["ari", "nmi", "same_expert", "profile_cosine"]].median().reset_index()
    st.dataframe(summary, hide_index=True, column_config={
        "budget": st.column_config.NumberColumn("p", format="%.2f"),
        "ari": st.column_config.NumberColumn("routing ARI (median)", format="%.3f"),
        "nmi": st.column_config.NumberColumn("routing NMI (median)", format="%.3f"),
        "same_expert": st.column_config.NumberColumn("same expert", format="percent"),
        "profile_cosine": st.column_config.NumberColumn("role cosine (median)", format="%.3f")})
    st.caption(f"Against p = {table['reference'].iloc[0]:g}; logs: " + ", ".join(
        f"p = {b:g} `{Path(p).name.removeprefix('run_id=')}`" for b, p in siblings.items()))


@st.cache_data(show_spinner="Comparing the routings...", max_entries=4)
def _agreement(siblings: tuple, label: str) -> pd.DataFrame:
    from analysis.causal import budget_agreement

    return budget_agreement(dict(siblings), label=label)
