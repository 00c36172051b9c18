"""Experts by syntactic role: NMI and its baselines, lift, clustering, figures and the report command."""
from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
from sklearn.metrics import normalized_mutual_info_score

from analysis import routing_figures as figs
from analysis.experts import (cluster_experts, expert_profile_matrix, lift_table, name_cluster, nmi_from_contingency,
                              nmi_per_layer, pos_profiles)
from routing_fixtures import annotated_run, converted, routing_cache, tokenizer, traced_run  # noqa: F401
from tomoe_core import queries

POS = np.array(["NOUN", "VERB", "DET", "ADP", "PUNCT", "ADJ"])


def _labels(n=6000, layers=3, structured=(True, False, True), seed=0):
    """Synthetic (token, layer) labels: in structured layers the expert follows the POS 80 % of the time."""
    rng = np.random.default_rng(seed)
    pos = rng.integers(0, len(POS), n)
    token_id = pos * 100 + rng.integers(0, 20, n)  # each token id has one POS
    frames = []
    for layer in range(layers):
        expert = rng.integers(0, 4, n)
        if structured[layer]:
            follow = rng.random(n) < 0.8
            expert = np.where(follow, pos % 4, expert)
        frames.append(pd.DataFrame({"layer": layer, "expert": expert, "pos": POS[pos], "token_id": token_id}))
    return pd.concat(frames, ignore_index=True)


def _counts(labels):
    return labels.groupby(["layer", "expert", "pos"]).size().rename("tokens").reset_index()


def test_nmi_from_contingency_equals_sklearn():
    rng = np.random.default_rng(1)
    for _ in range(20):
        a, b = rng.integers(0, 5, 500), rng.integers(0, 7, 500)
        b = np.where(rng.random(500) < 0.3, a, b)
        table = np.zeros((5, 7))
        np.add.at(table, (a, b), 1)
        assert nmi_from_contingency(table) == pytest.approx(normalized_mutual_info_score(a, b), abs=1e-12)


def test_permutation_baseline_tells_structure_from_noise():
    nmi = nmi_per_layer(_labels(), permutations=99)
    structured, noise = nmi[nmi.layer != 1], nmi[nmi.layer == 1].iloc[0]
    assert (structured.p_value == 0.01).all() and (structured.nmi > structured.perm_p95 * 10).all()
    assert noise.p_value > 0.01 and noise.perm_p05 <= noise.nmi * 1.5
    assert noise.nmi < 0.01
    assert (structured.pos_accuracy > structured.majority_accuracy + 0.2).all()
    assert noise.pos_accuracy < noise.majority_accuracy + 0.02
    # the expert depends on POS only through the token (each token has one POS): the
    # within-token shuffle keeps that, so nothing is left beyond it
    assert (structured.lexical_p_value > 0.05).all()
    assert (structured.lexical_mean > structured.nmi * 0.8).all()


def test_within_token_baseline_sees_context_dependent_routing():
    rng = np.random.default_rng(3)
    n = 4000
    pos_code = rng.integers(0, 2, n)  # one ambiguous token ("that": DET or SCONJ)
    labels = pd.DataFrame({"layer": 0, "expert": np.where(rng.random(n) < 0.9, pos_code, 1 - pos_code),
                           "pos": np.array(["DET", "SCONJ"])[pos_code], "token_id": 7})
    row = nmi_per_layer(labels, permutations=49).iloc[0]
    assert row.p_value == 0.02 and row.lexical_p_value == 0.02 and row.lexical_mean < 0.01


def test_lift_and_profiles():
    counts = pd.DataFrame({"layer": 0, "expert": [0, 0, 1, 1], "pos": ["NOUN", "VERB", "NOUN", "VERB"],
                           "tokens": [30, 10, 10, 30]})
    prof = pos_profiles(counts)
    row = prof[(prof.expert == 0) & (prof.pos == "NOUN")].iloc[0]
    assert row.share == 0.75 and row.layer_share == 0.5 and row.lift == 1.5
    wide = lift_table(counts)
    assert list(wide.columns) == ["NOUN", "VERB"] and wide.loc[(0, 1), "VERB"] == 1.5
    matrix = expert_profile_matrix(counts, min_tokens=0)
    assert matrix.loc[(0, 0), "NOUN"] > 0 > matrix.loc[(0, 0), "VERB"]


def test_clusters_recover_planted_roles():
    rng = np.random.default_rng(0)
    rows = []
    roles = {"NOUN": ["NOUN", "PROPN"], "PUNCT": ["PUNCT", "NUM"], "VERB": ["VERB", "AUX"]}
    for layer in range(6):
        for expert, (role, favoured) in enumerate(list(roles.items()) * 2):
            for pos in ["NOUN", "PROPN", "PUNCT", "NUM", "VERB", "AUX", "DET", "ADP"]:
                base = 40 if pos in favoured else 10
                rows.append((layer, expert, pos, int(base + rng.integers(0, 5))))
    counts = pd.DataFrame(rows, columns=["layer", "expert", "pos", "tokens"])
    result = cluster_experts(counts, min_tokens=10, k_range=range(2, 7))
    assert result.k == 3 and set(result.silhouette) == set(range(2, 7))
    assert result.silhouette[3] == max(result.silhouette.values())
    assert {frozenset(n.split("+")) for n in result.names.values()} == {frozenset(v) for v in roles.values()}
    by_expert = result.experts.groupby("expert").cluster.nunique()
    assert (by_expert == 1).all()  # the same role in every layer lands in the same cluster
    assert len(result.summary()) == 3 and len(result.explained_variance) == 2


def test_cluster_names():
    assert name_cluster(pd.Series({"NOUN": np.log2(2.0), "PROPN": np.log2(1.5), "VERB": -1.0})) == "NOUN+PROPN"
    assert name_cluster(pd.Series({"NOUN": np.log2(1.1), "VERB": 0.0})).startswith("mixed")
    lifts = pd.Series({"INTJ": np.log2(3.0), "NOUN": np.log2(1.4), "VERB": 0.0})
    assert name_cluster(lifts, pd.Series({"INTJ": 0.001, "NOUN": 0.6, "VERB": 0.399})) == "NOUN"


def test_too_few_experts_to_cluster_says_why():
    counts = pd.DataFrame({"layer": 0, "expert": [0, 1], "pos": "NOUN", "tokens": [100, 100]})
    with pytest.raises(ValueError, match="too few"):
        cluster_experts(counts)


def test_figures_from_a_real_run(annotated_run):
    load = queries.expert_load(annotated_run)
    counts = queries.expert_pos(annotated_run)
    labels = queries.token_labels(annotated_run)
    fig = figs.load_heatmap(load)
    assert isinstance(fig, go.Figure) and fig.data[0].type == "heatmap"
    assert np.asarray(fig.data[0].z).shape == (load.layer.nunique(), load.expert.nunique())

    fig = figs.lift_heatmap(counts, layer=0)
    assert fig.data[0].type == "heatmap" and set(fig.data[0].x) <= set(counts.pos)
    assert len(figs.lift_heatmap(counts).data[0].y) == counts.groupby(["layer", "expert"]).ngroups

    nmi = nmi_per_layer(labels, permutations=19)
    fig = figs.nmi_figure(nmi)
    assert [t.name for t in fig.data] == ["shuffled experts, 5-95 %", "shuffled within token (lexical only)", "observed"]

    result = cluster_experts(counts, min_tokens=1, k_range=range(2, 4))
    fig = figs.expert_map(result.experts)
    assert sum(len(t.x) for t in fig.data) == len(result.experts)
    assert isinstance(figs.silhouette_figure(result.silhouette, result.k), go.Figure)

    doc = queries.document_tokens(annotated_run, 0)
    fig = figs.token_strip(doc, layer=1, per_line=8)
    text = np.asarray(fig.data[0].text)
    assert text.shape[1] == 8 and "".join(text.ravel()).startswith("The cat")
    with pytest.raises(ValueError, match="layer"):
        figs.token_strip(doc, layer=99)


def test_routing_report_command(annotated_run, capsys):
    import json

    from analysis.routing_report import main

    assert main([str(annotated_run), "--permutations", "9", "--min-tokens", "1"]) == 0
    out = capsys.readouterr().out
    assert "nmi" in out and "clusters: k =" in out and "silhouette" in out
    report = json.loads((annotated_run / "syntax-report.json").read_text())
    assert len(report["nmi"]) == 2 and report["clusters"]["k"] >= 2
    assert main(["no-such-run"]) == 2
