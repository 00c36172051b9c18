"""Experts: what the experts of a routing log do: load, part-of-speech lift, NMI against its
permutation baselines and its contextual part with intervals, gold (CoNLL-U) vs spaCy tags, the
clustering map with its choice of k (click an expert for its top tokens), a document's token strip."""
from pathlib import Path

import pandas as pd
import streamlit as st

from app import ui

st.title("Experts")
st.caption("Pick a routing log (made on the **Runs** page or with `python -m tomoe_core trace`). Click an expert on "
           "the clustering map, or pick one below, to see its most frequent tokens.")

from analysis import routing_figures as figures  # noqa: E402
from tomoe_core.trace import queries, routing_log

runs = routing_log.list_runs()
if not runs:
    st.info("No routing log yet. Start a trace on the **Runs** page, or run "
            "`python -m tomoe_core trace cache/conversions/NAME`.", icon="ℹ️")
    st.page_link("pages/runs.py", label="Open Runs", icon=":material/play_circle:")
    st.stop()

by_id = {r["run_id"]: r for r in runs}
from tomoe_core.trace.ablation import has_ablation  # noqa: E402

# the page opens on the newest log that has everything (an ablation), else the newest
default_run = next((r["run_id"] for r in runs if has_ablation(r["path"])), runs[0]["run_id"])
ui.keep("experts_run", default_run)
if st.session_state["experts_run"] not in by_id:
    st.session_state["experts_run"] = default_run
st.selectbox("Routing log", list(by_id), key="experts_run",
             format_func=lambda r: f"{r}  ({by_id[r].get('tokens', '?'):,} tokens, p = {by_id[r].get('budget')}"
             f"{', shipped with the clone' if by_id[r].get('shipped') else ''})"
             if isinstance(by_id[r].get("tokens"), int) else r)
meta = by_id[st.session_state["experts_run"]]
folder = Path(meta["path"])
num_layers = int(meta.get("num_layers") or 1)
num_experts = int(meta.get("num_experts") or 1)
text = meta.get("text") or {}
st.caption(f"Model `{meta.get('model')}` · conversion `{Path(str(meta.get('conversion', ''))).name}` "
           f"(digest {meta.get('conversion_digest')}) · budget {meta.get('budget')} · {num_experts} experts x "
           f"{num_layers} layers · text: {text.get('source')} {text.get('split') or ''} · {meta.get('created_at')}")


def _stamps(folder: Path) -> tuple:
    """Names and modification times of the run's files: a new annotation or a re-run changes it."""
    try:
        return tuple(sorted((p.name, p.stat().st_mtime_ns) for p in folder.iterdir()))
    except OSError:
        return ()


run_key = (str(folder), _stamps(folder))


@st.cache_data(show_spinner="Querying the routing log...", max_entries=16)
def cached(name: str, key: tuple, **kwargs) -> pd.DataFrame:
    """A `tomoe_core.trace.queries` function of the run, cached until the run's files change."""
    return getattr(queries, name)(key[0], **kwargs)


NMI_MAX_TOKENS = 50_000  # per layer: keeps the permutation test to seconds on a 2-core machine
PAGE_BOOTSTRAP = 50  # block-bootstrap resamples for the intervals on the page (the report command does 100)
PAGE_RESAMPLES = 10  # resamples per k for the clustering stability on the page

HELP = {  # one sentence per metric: shown behind every "?" of the page
    "load": "Share of a layer's tokens that its router sends to each expert; an even load is 1/E per expert.",
    "lift": "Lift = P(tag | expert) / P(tag | layer): 2x means the expert gets this tag twice as often as its "
            "layer as a whole; grey cells with a dot have no data (expert without tokens, or tag absent).",
    "tags": "Which annotation to relate the experts to: spaCy's UPOS (tagged after the trace), or the gold "
            "UPOS / XPOS / dependency relation of a CoNLL-U treebank the run was traced on.",
    "upos": "UPOS: the 17 Universal Dependencies part-of-speech tags (NOUN, VERB, AUX auxiliary, ADP "
            "adposition, DET determiner, PRON, PROPN proper noun, CCONJ/SCONJ conjunctions, PART, NUM, ...).",
    "deprel": "Dependency relation (UD deprel): the word's syntactic role towards its head, e.g. nsubj "
              "(subject), obj, det, case, amod; a richer syntactic role than the part of speech.",
    "nmi": "NMI = mutual information between the expert choice and the tag, normalised to 0 (independent) .. "
           "1 (each determines the other); median over layers.",
    "shuffled": "Shuffled baseline: NMI after shuffling the experts across the layer's tokens, i.e. what chance "
                "gives with the same expert loads and tag mix.",
    "within": "Within-token baseline: NMI after shuffling experts only among occurrences of the same token, "
              "i.e. what word identity alone explains.",
    "contextual": "Contextual NMI = NMI minus the within-token baseline: the part of the expert-tag relation "
                  "that the word form does not explain (e.g. 'that' as DET vs SCONJ going to different experts).",
    "interval": "95 % block-bootstrap interval: runs of 64 consecutive tokens are resampled with replacement "
                "and both NMI and baseline recomputed.",
    "lexical_share": "Share of the NMI that the within-token baseline already reaches: how much of the relation "
                     "is word identity.",
    "p_value": "Permutation p-value = (1 + shuffles with NMI >= observed) / (1 + shuffles); it cannot go below "
               "1 / (shuffles + 1).",
    "permutations": "Shuffles per layer for each baseline; p-values cannot be smaller than 1 / (shuffles + 1), so "
                    "99 are needed for p <= 0.01.",
    "agreement": "Share of the tokens tagged by both whose spaCy UPOS equals the gold UPOS.",
    "baseline": "What an expert's profile is measured against: the layer's tag mix (what the expert prefers), "
                "or what its token types predict (what it prefers beyond the words it gets: contextual residuals).",
    "pca": "The map's axes are the first two principal components (PCA) of the experts' excess-share profiles; "
           "nearby experts have similar tag preferences.",
    "silhouette": "Silhouette: how much closer an expert is to its own cluster than to the next one, from -1 to "
                  "1; higher is a cleaner partition.",
    "stability": "Stability: adjusted Rand index between the clustering and clusterings of resampled counts "
                 "(each expert's tokens redrawn); 1 = the same clusters, 0 = chance.",
    "k": "Number of clusters. 'auto' takes the best silhouette among the stable k (adjusted Rand >= 0.8).",
    "min_tokens": "Experts with fewer tagged tokens than this are left out of the clustering: their profiles are noise.",
    "names": "A cluster is named after the (at most two) highest lifts in its 'top lifts' column that reach "
             "1.5x, among tags with at least 5 % of its tokens; 'mixed' when none does; 'leans X' when X is "
             "preferred but under 10 % of the cluster's tokens (not what it mostly gets: see top shares).",
    "top_tokens": "The expert's most frequent tokens in the chosen layer, with their share of its tokens and the "
                  "share of each token's uses in the layer that went to this expert.",
    "strip": "A document's tokens in reading order, each coloured by the expert that the chosen layer's router "
             "picked for it.",
}


@st.cache_data(show_spinner="NMI against its permutation baselines, with bootstrap intervals (cached afterwards)...",
               max_entries=8)
def cached_nmi(key: tuple, permutations: int, label: str = "pos") -> tuple[pd.DataFrame, int, int]:
    """NMI per layer on at most NMI_MAX_TOKENS tokens (the same random tokens in every layer).
    -> (table, tokens used, tokens annotated)."""
    import numpy as np

    from analysis.experts import nmi_per_layer

    labels = cached("token_labels", key, label=label)
    rank = labels.groupby("layer").cumcount()  # every layer lists the same tokens in the same order
    total = int(rank.max()) + 1 if len(labels) else 0
    if total > NMI_MAX_TOKENS:
        keep = np.sort(np.random.default_rng(0).choice(total, NMI_MAX_TOKENS, replace=False))
        labels = labels[rank.isin(keep)]
    return nmi_per_layer(labels, permutations=permutations, bootstrap=PAGE_BOOTSTRAP), min(total, NMI_MAX_TOKENS), total


@st.cache_data(show_spinner=False, max_entries=8)
def cached_layer_nmi(key: tuple, label: str) -> pd.DataFrame:
    """Observed NMI per layer of one tag source, without baselines (for the gold vs spaCy comparison)."""
    from analysis.experts import layer_nmi

    return layer_nmi(cached("token_labels", key, label=label))


@st.cache_data(show_spinner="Clustering experts by tag profile...", max_entries=8)
def cached_clusters(key: tuple, min_tokens: int, label: str, baseline: str, k: int | None):
    from analysis.experts import cluster_experts, token_conditioned_counts

    counts = (token_conditioned_counts(cached("token_labels", key, label=label)) if baseline == "token"
              else cached("expert_pos", key, label=label))
    c = cluster_experts(counts, min_tokens=min_tokens, k=k, baseline=baseline, resamples=PAGE_RESAMPLES)
    return c.experts, c.summary(), c.k, c.silhouette, c.stability, c.k_rule


def _map_point(point: dict, groups: list[pd.DataFrame]) -> tuple[int, int] | None:
    """(layer, expert) of a clicked point of the clustering map (one trace per cluster)."""
    curve, index = point.get("curve_number"), point.get("point_index")
    if curve is None or index is None or curve >= len(groups) or index >= len(groups[curve]):
        return None
    row = groups[curve].iloc[index]
    return int(row["layer"]), int(row["expert"])


def apply_selection(key: str, event, pick) -> None:
    """Drive the drill-down from a chart selection, once per new selection (a later manual choice
    in the number inputs must not be overwritten by the same, still active, selection)."""
    points = list(((event or {}).get("selection") or {}).get("points") or [])
    picked = next((x for x in map(pick, points) if x is not None), None)
    if picked is not None and st.session_state.get(f"applied::{key}") != picked:
        st.session_state["drill_layer"], st.session_state["drill_expert"] = picked
    st.session_state[f"applied::{key}"] = picked


try:
    routing_log.verify_run(folder) if st.session_state.get("verified") != run_key else None
    st.session_state["verified"] = run_key
    load = cached("expert_load", run_key)
except (routing_log.RoutingLogError, OSError, ValueError) as err:
    st.error(f"This routing log cannot be read: {err}")
    st.stop()
except Exception as err:  # DuckDB raises its own types on a corrupt Parquet file
    st.error(f"This routing log cannot be read ({err.__class__.__name__}: {err}); re-run the trace.")
    st.stop()

ui.keep("experts_layer", min(num_layers // 2, num_layers - 1))
if num_layers > 1:
    st.slider("Layer (lift heatmap, top tokens, token strip)", 0, num_layers - 1, key="experts_layer",
              help="Decoder layer shown in the lift heatmap, the top tokens and the token strip.")
layer = int(st.session_state["experts_layer"])

# -- load ---------------------------------------------------------------------------------------------
st.subheader("Expert load", help=HELP["load"])
load_fig = figures.load_heatmap(load).update_xaxes(dtick=1)
if num_layers <= 12:
    load_fig.update_yaxes(dtick=1)  # no fractional layer ticks
st.plotly_chart(load_fig, key="load_heatmap")

# -- syntactic roles ------------------------------------------------------------------------------------
from analysis.syntax import LABEL_COLUMNS, gold_source  # noqa: E402

st.subheader("Experts by part of speech", help=HELP["upos"])
gold_file = gold_source(folder)
if gold_file is not None and not queries.has_gold(folder):
    from analysis.syntax import annotate_gold

    try:
        with st.spinner(f"Reading the gold tags of `{gold_file.name}` into the log..."):
            annotate_gold(folder)
        st.rerun()
    except (OSError, ValueError) as err:
        st.warning(f"This run was traced on `{gold_file}`, but its gold tags cannot be added: {err}")
has_spacy, has_gold = queries.has_annotation(folder), queries.has_gold(folder)
if not has_spacy:
    st.info("This log has no spaCy part-of-speech tags yet. Tagging runs spaCy over the traced text once and stores "
            "the tags beside the log" + (" (then they can be compared with the gold tags)." if has_gold else "."),
            icon="ℹ️")
    if st.button("Tag the text (spaCy)", type="primary"):
        from analysis.syntax import annotate_run

        bar = st.progress(0.0, text="loading the tagger...")
        try:
            annotate_run(folder, progress=lambda done, total: bar.progress(done / total,
                                                                           text=f"tagged {done} / {total} documents"))
        except (OSError, ValueError, ImportError) as err:
            st.error(f"Tagging failed: {err}")
        else:
            st.rerun()
sources = [name for name, column in LABEL_COLUMNS.items() if (has_spacy if column == "pos" else has_gold)]
if sources:
    ui.keep("experts_tags", sources[0])
    if st.session_state["experts_tags"] not in sources:
        st.session_state["experts_tags"] = sources[0]
    if len(sources) > 1:
        st.radio("Tags", sources, key="experts_tags", horizontal=True, help=HELP["tags"])
    source_name = st.session_state["experts_tags"]
    label = LABEL_COLUMNS[source_name]
    ui.keep("permutations", 99)
    st.number_input("Permutations for the baselines", 9, 999, step=10, key="permutations", help=HELP["permutations"])
    permutations = int(st.session_state["permutations"])

    if has_spacy and has_gold:  # gold vs spaCy
        from analysis.syntax import tag_agreement

        st.markdown(f"**Gold tags** from `{gold_file.name if gold_file else 'the treebank'}` against spaCy")
        agree = tag_agreement(cached("tag_pairs", run_key))
        g1, g2, g3, g4 = st.columns(4)
        g1.metric("spaCy = gold UPOS", f"{agree['agreement']:.1%}", help=HELP["agreement"])
        g2.metric("Tokens tagged by both", f"{agree['tokens']:,}",
                  help="Tokens with a word in both annotations (whitespace and special tokens have none).")
        tables = {name: cached_layer_nmi(run_key, LABEL_COLUMNS[name])
                  for name in ("spaCy UPOS", "gold UPOS", "gold deprel")}
        g3.metric("NMI spaCy / gold UPOS", f"{tables['spaCy UPOS']['nmi'].median():.3f} / "
                                           f"{tables['gold UPOS']['nmi'].median():.3f}", help=HELP["nmi"])
        deprel_nmi = tables["gold deprel"]["nmi"].median() if len(tables["gold deprel"]) else float("nan")
        g4.metric("NMI gold deprel", "none in the treebank" if pd.isna(deprel_nmi) else f"{deprel_nmi:.3f}",
                  help=HELP["nmi"] + " " + HELP["deprel"])
        left, right = st.columns(2, gap="large")
        left.plotly_chart(figures.nmi_compare_figure(tables, "NMI(expert; tag) per layer: spaCy vs gold"),
                          key="nmi_compare")
        right.dataframe(agree["confusions"], hide_index=True, column_config={
            "tokens": st.column_config.NumberColumn("tokens", help="Tokens with this pair of tags.")})
        right.caption("The most frequent disagreements: spaCy's UPOS against the treebank's.")

    tag_counts = cached("expert_pos", run_key, label=label)
    distinct = sorted(tag_counts["pos"].dropna().unique())
    if len(distinct) < 2:
        st.info(f"{source_name} has a single value in this log ({distinct[0] if distinct else 'none'!r} for every "
                "tagged token): no expert can be told apart by it, so there is no NMI, lift or clustering to show. "
                "Pick another tag source above.", icon="ℹ️")
if sources and len(distinct) >= 2:
    nmi, used, total = cached_nmi(run_key, permutations, label)
    m1, m2, m3, m4 = st.columns(4)
    m1.metric("NMI, median", f"{nmi['nmi'].median():.3f}",
              help=f"NMI(expert; {source_name}), median over layers. " + HELP["nmi"])
    if "contextual" in nmi:
        above = int((nmi["contextual_low"] > 0).sum()) if "contextual_low" in nmi else None
        m2.metric("Contextual NMI, median", f"{nmi['contextual'].median():.4f}",
                  help=HELP["contextual"] + " " + HELP["interval"])
        m3.metric("Explained by word identity", f"{nmi['lexical_share'].median():.0%}", help=HELP["lexical_share"])
        if above is not None:
            m4.metric("Layers with context above 0", f"{above} / {len(nmi)}",
                      help="Layers whose contextual-NMI interval lies above 0. " + HELP["interval"])
    if used < total:
        st.caption(f"NMI on a random {used:,} of the {total:,} tagged tokens (the same tokens in every layer).")
    left, right = st.columns(2, gap="large")
    with left:
        lift_fig = figures.lift_heatmap(tag_counts, layer=layer, num_experts=num_experts,
                                        tag_name="universal POS" if label in ("pos", "gold_upos") else source_name)
        st.plotly_chart(lift_fig, key="lift_heatmap")
        st.caption("Lift: " + HELP["lift"])
    with right:
        nmi_fig = figures.nmi_figure(nmi, title=f"NMI(expert; {source_name}) per layer")
        if num_layers <= 12:
            nmi_fig.update_xaxes(tick0=0, dtick=1)  # no fractional layer ticks
        st.plotly_chart(nmi_fig, key="nmi")
        above = int((nmi["nmi"] > nmi["perm_max"]).sum())
        floor = 1 / (permutations + 1)
        verdict = (f"{above} of {len(nmi)} layers have an NMI above every shuffled-expert baseline (p = {floor:.3f}, "
                   f"the smallest p {permutations} shuffles can give); median NMI {nmi['nmi'].median():.4f} against "
                   f"a shuffled median of {nmi['perm_mean'].median():.4f}.")
        if "lexical_p95" in nmi:
            lexical = int((nmi["nmi"] > nmi["lexical_p95"]).sum())
            verdict += (f" Against the within-token shuffle (which keeps what the token identity alone explains), "
                        f"{lexical} of {len(nmi)} layers stay above its 95th percentile"
                        + (" (the card 'Layers with context above 0' counts the stricter test: the whole "
                           "bootstrap interval of contextual NMI above 0)." if "contextual_low" in nmi else "."))
        st.caption(verdict)
    if "contextual" in nmi:
        ctx_fig = figures.contextual_figure(nmi)
        if num_layers <= 12:
            ctx_fig.update_xaxes(tick0=0, dtick=1)
        st.plotly_chart(ctx_fig, key="contextual")
    with st.expander("NMI per layer (table)"):
        shown = [c for c in ("layer", "tokens", "nmi", "nmi_low", "nmi_high", "perm_p95", "p_value", "lexical_mean",
                             "lexical_p_value", "contextual", "contextual_low", "contextual_high", "lexical_share")
                 if c in nmi]
        st.dataframe(nmi[shown], hide_index=True, column_config={
            "nmi": st.column_config.NumberColumn("NMI", format="%.4f", help=HELP["nmi"]),
            "nmi_low": st.column_config.NumberColumn("NMI low", format="%.4f", help=HELP["interval"]),
            "nmi_high": st.column_config.NumberColumn("NMI high", format="%.4f", help=HELP["interval"]),
            "perm_p95": st.column_config.NumberColumn("shuffled p95", format="%.4f", help=HELP["shuffled"]),
            "p_value": st.column_config.NumberColumn("p", format="%.4f", help=HELP["p_value"]),
            "lexical_mean": st.column_config.NumberColumn("within-token baseline", format="%.4f", help=HELP["within"]),
            "lexical_p_value": st.column_config.NumberColumn("p (within-token)", format="%.4f", help=HELP["p_value"]),
            "contextual": st.column_config.NumberColumn("contextual NMI", format="%.4f", help=HELP["contextual"]),
            "contextual_low": st.column_config.NumberColumn("contextual low", format="%.4f", help=HELP["interval"]),
            "contextual_high": st.column_config.NumberColumn("contextual high", format="%.4f", help=HELP["interval"]),
            "lexical_share": st.column_config.NumberColumn("word identity share", format="percent",
                                                           help=HELP["lexical_share"])})

    st.markdown("**Clustering map**: every expert of every layer by its tag profile; click one for its top tokens")
    c1, c2, c3 = st.columns(3)
    ui.keep("min_tokens", 50)
    c1.number_input("Min tokens per expert", 1, 100_000, step=10, key="min_tokens", help=HELP["min_tokens"])
    ui.keep("cluster_baseline", "layer")
    c2.radio("Profile against", ["layer", "token"], key="cluster_baseline", horizontal=True, help=HELP["baseline"],
             format_func=lambda b: {"layer": "the layer's mix", "token": "word identity"}[b])
    ui.keep("cluster_k", "auto")
    c3.selectbox("k (clusters)", ["auto"] + list(range(2, 11)), key="cluster_k", help=HELP["k"])
    chosen_k = None if st.session_state["cluster_k"] == "auto" else int(st.session_state["cluster_k"])
    try:
        experts_df, summary, k, silhouette, stability, k_rule = cached_clusters(
            run_key, int(st.session_state["min_tokens"]), label, st.session_state["cluster_baseline"], chosen_k)
    except ValueError as err:
        st.info(f"Cannot cluster the experts: {err}", icon="ℹ️")
        experts_df = None
    if experts_df is not None:
        left, right = st.columns([3, 2], gap="large")
        with left:
            event = st.plotly_chart(figures.expert_map(experts_df), key="expert_map", on_select="rerun",
                                    selection_mode="points")
            st.caption("Map: " + HELP["pca"])
        groups = [g for _, g in experts_df.groupby("cluster_name", sort=True)]  # the figure's trace order
        apply_selection("expert_map", event, lambda p: _map_point(p, groups))
        with right:
            st.plotly_chart(figures.k_choice_figure(silhouette, stability, k, stable_ari=0.8), key="k_choice")
            st.caption(f"{k_rule}. " + HELP["silhouette"] + " " + HELP["stability"])
        st.dataframe(summary, hide_index=True, column_config={
            "cluster_name": st.column_config.TextColumn("name", help=HELP["names"]),
            "members": st.column_config.NumberColumn("experts", help="Experts (layer, expert pairs) in the cluster."),
            "top_lifts": st.column_config.TextColumn("top lifts", help=HELP["names"] + " " + HELP["lift"]),
            "top_shares": st.column_config.TextColumn("top shares", help="The tags that make up most of the "
                                                                         "cluster's tokens.")})

    from app import causal_panel  # noqa: E402

    causal_panel.render_ablation(folder, run_key, layer, num_experts, label, source_name, lift_fig, experts_df)
    causal_panel.render_budgets(folder, label)

# -- drill-down: top tokens of one expert ------------------------------------------------------------
st.subheader("Top tokens of an expert", help=HELP["top_tokens"])
ui.keep("drill_layer", layer)
ui.keep("drill_expert", 0)
c1, c2 = st.columns(2)
c1.number_input("Layer", 0, num_layers - 1, key="drill_layer", help="The layer whose router is inspected.")
c2.number_input("Expert", 0, num_experts - 1, key="drill_expert", help="The expert whose tokens are listed.")
top = cached("top_tokens", run_key, layer=int(st.session_state["drill_layer"]),
             expert=int(st.session_state["drill_expert"]), limit=25)
if top.empty:
    st.caption("This expert received no tokens in this log.")
else:
    shown = top.drop(columns=["expert"]).assign(share_of_expert=top["share_of_expert"] * 100,
                                                share_of_token=top["share_of_token"] * 100)  # one decimal everywhere
    st.dataframe(shown, hide_index=True, column_config={
        "share_of_expert": st.column_config.ProgressColumn("share of the expert's tokens", format="%.1f%%",
                                                           min_value=0, max_value=float(shown["share_of_expert"].max())),
        "share_of_token": st.column_config.NumberColumn("share of this token's uses in the layer", format="%.1f%%")})

# -- token strip -----------------------------------------------------------------------------------------
st.subheader("A document, token by token", help=HELP["strip"])
docs = cached("documents", run_key)
if docs.empty:
    st.caption("The log has no documents.")
else:
    ui.keep("strip_doc", int(docs["doc_id"].iloc[0]))
    titles = dict(zip(docs["doc_id"].astype(int), docs["title"].astype(str)))
    st.selectbox("Document", list(titles), key="strip_doc", format_func=lambda d: f"{d}: {titles[d]}")
    tokens = cached("document_tokens", run_key, doc_id=int(st.session_state["strip_doc"]), layer=layer)
    try:
        st.plotly_chart(figures.token_strip(tokens, layer, num_experts=num_experts), key="token_strip")
    except ValueError as err:
        st.info(str(err), icon="ℹ️")
