"""Experts: what the experts of a routing log do: load, part-of-speech lift, NMI against its
permutation band, the clustering map (click an expert for its top tokens), a document's token strip."""
import json
from pathlib import Path

import pandas as pd
import streamlit as st

from app import ui

st.title("Experts")
st.caption("Pick a routing log (made on the **Runs** page or with `python -m tomoe_core trace`). Click an expert on "
           "the clustering map, or pick one below, to see its most frequent tokens.")

from analysis import routing_figures as figures  # noqa: E402
from tomoe_core import queries, trace  # noqa: E402

runs = trace.list_runs()
if not runs:
    st.info("No routing log yet. Start a trace on the **Runs** page, or run "
            "`python -m tomoe_core trace cache/conversions/NAME`.", icon="ℹ️")
    st.page_link("pages/runs.py", label="Open Runs", icon=":material/play_circle:")
    st.stop()

by_id = {r["run_id"]: r for r in runs}
ui.keep("experts_run", runs[0]["run_id"])
if st.session_state["experts_run"] not in by_id:
    st.session_state["experts_run"] = runs[0]["run_id"]
st.selectbox("Routing log", list(by_id), key="experts_run",
             format_func=lambda r: f"{r}  ({by_id[r].get('tokens', '?'):,} tokens, p = {by_id[r].get('budget')})"
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
    """A `tomoe_core.queries` function of the run, cached until the run's files change."""
    return getattr(queries, name)(key[0], **kwargs)


NMI_MAX_TOKENS = 50_000  # per layer: keeps the permutation test to seconds on a 2-core machine


@st.cache_data(show_spinner="NMI against its permutation baseline (cached afterwards)...", max_entries=4)
def cached_nmi(key: tuple, permutations: int) -> tuple[pd.DataFrame, int, int]:
    """NMI per layer on at most NMI_MAX_TOKENS tokens (the same random tokens in every layer).
    -> (table, tokens used, tokens annotated)."""
    import numpy as np

    from analysis.experts import nmi_per_layer

    labels = cached("token_labels", key)
    rank = labels.groupby("layer").cumcount()  # every layer lists the same tokens in the same order
    total = int(rank.max()) + 1 if len(labels) else 0
    if total > NMI_MAX_TOKENS:
        keep = np.random.default_rng(0).choice(total, NMI_MAX_TOKENS, replace=False)
        labels = labels[rank.isin(keep)]
    return nmi_per_layer(labels, permutations=permutations), min(total, NMI_MAX_TOKENS), total


@st.cache_data(show_spinner="Clustering experts by POS profile...", max_entries=4)
def cached_clusters(key: tuple, min_tokens: int):
    from analysis.experts import cluster_experts
    c = cluster_experts(cached("expert_pos", key), min_tokens=min_tokens)
    return c.experts, c.summary(), c.k, c.silhouette


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


def stored_report(folder: Path) -> dict | None:
    """The `python -m analysis.routing_report` result beside the run, if it was made."""
    path = folder / "syntax-report.json"
    try:
        return json.loads(path.read_text()) if path.exists() else None
    except (OSError, json.JSONDecodeError):
        return None


try:
    trace.verify_run(folder) if st.session_state.get("verified") != run_key else None
    st.session_state["verified"] = run_key
    load = cached("expert_load", run_key)
except (trace.RoutingLogError, OSError, ValueError) as err:
    st.error(f"This routing log cannot be read: {err}")
    st.stop()
except Exception as err:  # DuckDB raises its own types on a corrupt Parquet file
    st.error(f"This routing log cannot be read ({err.__class__.__name__}: {err}); re-run the trace.")
    st.stop()

ui.keep("experts_layer", min(num_layers // 2, num_layers - 1))
if num_layers > 1:
    st.slider("Layer (lift heatmap, top tokens, token strip)", 0, num_layers - 1, key="experts_layer")
layer = int(st.session_state["experts_layer"])

# -- load ---------------------------------------------------------------------------------------------
st.subheader("Expert load")
load_fig = figures.load_heatmap(load).update_xaxes(dtick=1)
if num_layers <= 12:
    load_fig.update_yaxes(dtick=1)  # no fractional layer ticks
st.plotly_chart(load_fig, key="load_heatmap")

# -- syntactic roles ------------------------------------------------------------------------------------
st.subheader("Experts by part of speech")
annotated = queries.has_annotation(folder)
if not annotated:
    st.info("This log has no part-of-speech tags yet. Tagging runs spaCy over the traced text once and stores "
            "the tags beside the log.", icon="ℹ️")
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
else:
    counts = cached("expert_pos", run_key)
    left, right = st.columns(2, gap="large")
    with left:
        st.plotly_chart(figures.lift_heatmap(counts, layer=layer), key="lift_heatmap")
    with right:
        report = stored_report(folder)
        if report and report.get("nmi"):
            nmi = pd.DataFrame(report["nmi"])
            st.caption(f"NMI from `syntax-report.json` ({report.get('permutations')} permutations).")
        else:
            ui.keep("permutations", 50)
            st.number_input("Permutations for the baseline", 10, 1000, step=10, key="permutations")
            nmi, used, total = cached_nmi(run_key, int(st.session_state["permutations"]))
            if used < total:
                st.caption(f"NMI on a random {used:,} of the {total:,} tagged tokens (the same tokens in every layer).")
        nmi_fig = figures.nmi_figure(nmi)
        if num_layers <= 12:
            nmi_fig.update_xaxes(tick0=0, dtick=1)  # no fractional layer ticks
        st.plotly_chart(nmi_fig, key="nmi")
        above = int((nmi["nmi"] > nmi["perm_max"]).sum())
        verdict = (f"{above} of {len(nmi)} layers have an NMI above every shuffled-expert baseline; median NMI "
                   f"{nmi['nmi'].median():.4f} against a shuffled median of {nmi['perm_mean'].median():.4f}.")
        if "lexical_p95" in nmi:
            lexical = int((nmi["nmi"] > nmi["lexical_p95"]).sum())
            verdict += (f" Against the within-token shuffle (which keeps what the token identity alone explains), "
                        f"{lexical} of {len(nmi)} layers stay above its 95th percentile.")
        st.caption(verdict)

    st.markdown("**Clustering map**: every expert of every layer by its POS profile; click one for its top tokens")
    ui.keep("min_tokens", 50)
    try:
        experts_df, summary, k, silhouette = cached_clusters(run_key, int(st.session_state["min_tokens"]))
    except ValueError as err:
        st.info(f"Not enough tokens to cluster: {err}", icon="ℹ️")
        experts_df = None
    if experts_df is not None:
        event = st.plotly_chart(figures.expert_map(experts_df), key="expert_map", on_select="rerun",
                                selection_mode="points")
        groups = [g for _, g in experts_df.groupby("cluster_name", sort=True)]  # the figure's trace order
        apply_selection("expert_map", event, lambda p: _map_point(p, groups))
        st.caption(f"k = {k} clusters chosen by silhouette ({', '.join(f'{kk}: {v:.2f}' for kk, v in silhouette.items())}).")
        st.dataframe(summary, hide_index=True)

# -- drill-down: top tokens of one expert ------------------------------------------------------------
st.subheader("Top tokens of an expert")
ui.keep("drill_layer", layer)
ui.keep("drill_expert", 0)
c1, c2 = st.columns(2)
c1.number_input("Layer", 0, num_layers - 1, key="drill_layer")
c2.number_input("Expert", 0, num_experts - 1, key="drill_expert")
top = cached("top_tokens", run_key, layer=int(st.session_state["drill_layer"]),
             expert=int(st.session_state["drill_expert"]), limit=25)
if top.empty:
    st.caption("This expert received no tokens in this log.")
else:
    st.dataframe(top.drop(columns=["expert"]), hide_index=True, column_config={
        "share_of_expert": st.column_config.ProgressColumn("share of the expert's tokens", format="percent",
                                                           min_value=0, max_value=float(top["share_of_expert"].max())),
        "share_of_token": st.column_config.NumberColumn("share of this token's uses in the layer", format="percent")})

# -- token strip -----------------------------------------------------------------------------------------
st.subheader("A document, token by token")
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
