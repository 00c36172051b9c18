"""Experts by syntactic role: POS profiles, lift, NMI against permutation baselines, clusters.

Inputs are the DuckDB frames of `tomoe_core.queries`: `expert_pos(run)` (counts per layer,
expert, pos) and `token_labels(run)` (one row per annotated token and layer).

Two permutation baselines per layer, both keeping each layer's expert loads and POS mix:
  * shuffle: expert labels shuffled across all tokens of the layer. NMI above it means expert
    and POS are dependent at all.
  * within-token: expert labels shuffled only among occurrences of the same token id. It keeps
    whatever the router reads off the token's identity and breaks what it reads from context,
    so NMI above it means the routing carries POS information beyond the word form itself
    (e.g. "that" as DET vs SCONJ going to different experts).
p-value = (1 + #{permuted NMI >= observed}) / (1 + permutations).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from sklearn.metrics import normalized_mutual_info_score

from .syntax import UPOS



# -- profiles and lift ---------------------------------------------------------------------------------
def pos_profiles(counts: pd.DataFrame) -> pd.DataFrame:
    """Per (layer, expert, pos): tokens, share = P(pos | layer, expert), layer_share = P(pos | layer),
    lift = share / layer_share, expert_tokens. `counts` has columns layer, expert, pos, tokens."""
    c = counts.groupby(["layer", "expert", "pos"], as_index=False)["tokens"].sum()
    c["expert_tokens"] = c.groupby(["layer", "expert"])["tokens"].transform("sum")
    c["share"] = c["tokens"] / c["expert_tokens"]
    layer_pos = c.groupby(["layer", "pos"])["tokens"].transform("sum")
    layer_total = c.groupby("layer")["tokens"].transform("sum")
    c["layer_share"] = layer_pos / layer_total
    c["lift"] = c["share"] / c["layer_share"]
    return c.sort_values(["layer", "expert", "pos"]).reset_index(drop=True)


def lift_table(counts: pd.DataFrame, layer: int | None = None, min_tokens: int = 0) -> pd.DataFrame:
    """Wide lift table: one row per (layer, expert), one column per POS (UPOS order)."""
    prof = pos_profiles(counts)
    if layer is not None:
        prof = prof[prof.layer == layer]
    prof = prof[prof.expert_tokens >= min_tokens]
    wide = prof.pivot_table(index=["layer", "expert"], columns="pos", values="lift", fill_value=0.0)
    return wide[[p for p in UPOS if p in wide.columns] + [p for p in wide.columns if p not in UPOS]]


# -- mutual information ---------------------------------------------------------------------------------
def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def nmi_from_contingency(table: np.ndarray) -> float:
    """NMI with arithmetic-mean normalisation (sklearn's default) from an (E, P) count table."""
    table = np.asarray(table, dtype=np.float64)
    n = table.sum()
    h_rows, h_cols = _entropy(table.sum(1)), _entropy(table.sum(0))
    if h_rows == 0 or h_cols == 0:
        return 1.0 if h_rows == h_cols else 0.0  # sklearn's convention for a constant labelling
    nz = table > 0
    outer = np.outer(table.sum(1), table.sum(0))
    mi = float((table[nz] / n * np.log(table[nz] * n / outer[nz])).sum())
    return max(mi, 0.0) / ((h_rows + h_cols) / 2)


def _nmi_codes(experts: np.ndarray, pos: np.ndarray, num_experts: int, num_pos: int) -> float:
    table = np.bincount(experts * num_pos + pos, minlength=num_experts * num_pos).reshape(num_experts, num_pos)
    return nmi_from_contingency(table)


def _within_group_shuffle(values: np.ndarray, group_order: np.ndarray, group_starts: np.ndarray,
                          rng: np.random.Generator) -> np.ndarray:
    """Shuffle `values` among rows of the same group. group_order sorts rows by group."""
    keys = rng.random(len(values)) + np.repeat(np.arange(len(group_starts) - 1), np.diff(group_starts))
    shuffled_sorted = values[group_order][np.argsort(keys, kind="stable")]  # rows of a group stay in its block
    out = np.empty_like(values)
    out[group_order] = shuffled_sorted
    return out


def nmi_per_layer(labels: pd.DataFrame, permutations: int = 200, within_token: bool = True,
                  seed: int = 0) -> pd.DataFrame:
    """NMI(expert; POS) per layer with permutation baselines.

    labels: columns layer, expert, pos (and token_id for the within-token baseline).
    Returns per layer: tokens, nmi, perm_mean, perm_p05, perm_p95, perm_max, p_value, z
    (observed minus permuted mean, in permuted standard deviations), pos_accuracy (POS
    guessed as the majority tag of the token's expert) against majority_accuracy (always the
    layer's most common tag): an effect size in plain terms; and with within_token
    lexical_mean, lexical_p95, lexical_p_value.
    """
    rng = np.random.default_rng(seed)
    pos_codes, pos_names = pd.factorize(labels["pos"], sort=True)
    rows = []
    for layer, idx in labels.groupby("layer").indices.items():
        experts = labels["expert"].to_numpy()[idx].astype(np.int64)
        pos = pos_codes[idx].astype(np.int64)
        num_experts, num_pos = int(experts.max()) + 1, len(pos_names)
        observed = float(normalized_mutual_info_score(pos, experts))
        table = np.bincount(experts * num_pos + pos, minlength=num_experts * num_pos).reshape(num_experts, num_pos)
        perm = np.array([_nmi_codes(rng.permutation(experts), pos, num_experts, num_pos)
                         for _ in range(permutations)])
        row = {"layer": int(layer), "tokens": len(idx), "nmi": observed,
               "perm_mean": float(perm.mean()), "perm_p05": float(np.quantile(perm, 0.05)),
               "perm_p95": float(np.quantile(perm, 0.95)), "perm_max": float(perm.max()),
               "p_value": (1 + int((perm >= observed).sum())) / (1 + permutations),
               "z": float((observed - perm.mean()) / perm.std()) if perm.std() > 0 else float("inf"),
               "pos_accuracy": float(table.max(1).sum() / len(idx)),
               "majority_accuracy": float(table.sum(0).max() / len(idx))}
        if within_token and "token_id" in labels:
            tokens = labels["token_id"].to_numpy()[idx]
            order = np.argsort(tokens, kind="stable")
            starts = np.r_[0, np.flatnonzero(np.diff(tokens[order])) + 1, len(order)]
            lex = np.array([_nmi_codes(_within_group_shuffle(experts, order, starts, rng), pos, num_experts, num_pos)
                            for _ in range(permutations)])
            row.update(lexical_mean=float(lex.mean()), lexical_p95=float(np.quantile(lex, 0.95)),
                       lexical_p_value=(1 + int((lex >= observed).sum())) / (1 + permutations))
        rows.append(row)
    return pd.DataFrame(rows).sort_values("layer").reset_index(drop=True)


# -- clustering ------------------------------------------------------------------------------------------
def _expert_counts(counts: pd.DataFrame) -> pd.DataFrame:
    """(layer, expert) x POS token counts, columns in UPOS order."""
    c = counts.pivot_table(index=["layer", "expert"], columns="pos", values="tokens", aggfunc="sum", fill_value=0)
    return c[[p for p in UPOS if p in c.columns] + [p for p in c.columns if p not in UPOS]]


def _layer_mix(c: pd.DataFrame) -> pd.DataFrame:
    """P(pos | layer) on every (layer, expert) row of an _expert_counts table."""
    mix = c.groupby(level="layer").transform("sum")
    return mix.div(mix.sum(axis=1), axis=0)


def expert_profile_matrix(counts: pd.DataFrame, min_tokens: int = 50) -> pd.DataFrame:
    """Excess share of every (layer, expert) with at least min_tokens tokens, one column per POS:
    P(pos | expert) - P(pos | layer).

    Against the expert's own layer, so that a profile says what an expert prefers rather than
    what every layer sees most (nouns); a difference of shares rather than log lift, so that
    rare tags (INTJ, SYM, X), whose lift swings wildly on a handful of tokens, do not dominate
    the distances.
    """
    c = _expert_counts(counts)
    share = c.div(c.sum(axis=1).clip(lower=1), axis=0)
    keep = c.sum(axis=1) >= min_tokens
    return (share - _layer_mix(c))[keep]


@dataclass
class ExpertClusters:
    experts: pd.DataFrame  # layer, expert, cluster, cluster_name, pc1, pc2, tokens
    silhouette: dict[int, float]  # k -> silhouette score of KMeans with k clusters
    k: int  # the k with the best silhouette
    names: dict[int, str]  # cluster -> name from its dominant roles
    centroids: pd.DataFrame  # cluster x POS log2 lift of the pooled tokens of its experts
    explained_variance: list[float] = field(default_factory=list)  # of the 2 PCA axes
    shares: pd.DataFrame | None = None  # cluster x POS share of the cluster's tokens

    def summary(self) -> pd.DataFrame:
        """One row per cluster: name, members, layers spanned, top lifts."""
        g = self.experts.groupby(["cluster", "cluster_name"])
        out = g.agg(members=("expert", "size"), layers=("layer", lambda s: f"{s.min()}-{s.max()}"),
                    tokens=("tokens", "sum")).reset_index()
        out["top_lifts"] = out.cluster.map(lambda k: ", ".join(
            f"{p} {2 ** v:.2f}x" for p, v in self.centroids.loc[k].sort_values(ascending=False).head(3).items()))
        if self.shares is not None:
            out["top_shares"] = out.cluster.map(lambda k: ", ".join(
                f"{p} {v:.0%}" for p, v in self.shares.loc[k].sort_values(ascending=False).head(3).items()))
        return out


def name_cluster(centroid: pd.Series, shares: pd.Series | None = None, min_lift: float = 1.25,
                 min_share: float = 0.05, top: int = 2) -> str:
    """Name from the POS the cluster over-represents most (log2 lift >= log2 min_lift), e.g.
    'PUNCT+NUM', among the POS that make up at least `min_share` of its tokens (so that a rare
    tag with a large lift, such as INTJ, does not name a cluster it hardly occurs in)."""
    if shares is not None:
        centroid = centroid[shares.reindex(centroid.index).fillna(0.0) >= min_share]
    best = centroid.sort_values(ascending=False)
    chosen = [pos for pos, v in best.head(top).items() if 2 ** v >= min_lift]
    if chosen:
        return "+".join(chosen)
    return "mixed (no POS above %.2fx)" % min_lift


def cluster_experts(counts: pd.DataFrame, min_tokens: int = 50, k_range=range(2, 11), seed: int = 0) -> ExpertClusters:
    """KMeans on expert POS-lift profiles across all layers, k chosen by the best silhouette."""
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA
    from sklearn.metrics import silhouette_score

    profiles = expert_profile_matrix(counts, min_tokens)
    x = profiles.to_numpy()
    n = len(x)
    ks = [k for k in k_range if 2 <= k <= n - 1]
    if not ks:
        raise ValueError(f"{n} experts have at least {min_tokens} tokens: too few to cluster; "
                         "trace more text or lower min_tokens")
    scores, fits = {}, {}
    for k in ks:
        km = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(x)
        if len(set(km.labels_)) < 2:
            continue
        scores[k] = float(silhouette_score(x, km.labels_))
        fits[k] = km
    k = max(scores, key=scores.get)
    labels = fits[k].labels_
    all_counts = _expert_counts(counts)
    member_counts = all_counts.loc[profiles.index]
    pooled = member_counts.groupby(labels).sum()
    shares = pooled.div(pooled.sum(axis=1), axis=0)  # cluster x POS share of the cluster's tokens
    # what the same experts' layers would give them: layer mix weighted by each expert's tokens
    expected = _layer_mix(all_counts).loc[profiles.index].mul(member_counts.sum(axis=1), axis=0).groupby(labels).sum()
    expected = expected.div(expected.sum(axis=1), axis=0)
    centroids = np.log2((shares + 1e-9) / (expected + 1e-9))
    names = {c: name_cluster(centroids.loc[c], shares.loc[c]) for c in centroids.index}
    seen: dict[str, int] = {}
    for c in sorted(names, key=lambda c: -int((labels == c).sum())):  # duplicate names get a suffix
        seen[names[c]] = seen.get(names[c], 0) + 1
        if seen[names[c]] > 1:
            names[c] = f"{names[c]} #{seen[names[c]]}"
    pca = PCA(n_components=min(2, x.shape[1], n), random_state=seed).fit(x)
    coords = pca.transform(x)
    totals = counts.groupby(["layer", "expert"])["tokens"].sum()
    experts = pd.DataFrame({
        "layer": profiles.index.get_level_values("layer").astype(int),
        "expert": profiles.index.get_level_values("expert").astype(int),
        "cluster": labels.astype(int), "cluster_name": [names[c] for c in labels],
        "pc1": coords[:, 0], "pc2": coords[:, 1] if coords.shape[1] > 1 else 0.0,
        "tokens": [int(totals.loc[i]) for i in profiles.index]})
    return ExpertClusters(experts, scores, k, names, centroids, [float(v) for v in pca.explained_variance_ratio_],
                          shares)
