"""Experts by syntactic role: POS profiles, lift, NMI against permutation baselines, clusters.

Inputs are the DuckDB frames of `tomoe_core.trace.queries`: `expert_pos(run)` (counts per layer,
expert, pos) and `token_labels(run)` (one row per annotated token and layer).

Two permutation baselines per layer, both keeping each layer's expert loads and POS mix:
  * shuffle: expert labels shuffled across all tokens of the layer. NMI above it means expert
    and POS are dependent at all.
  * within-token: expert labels shuffled only among occurrences of the same token id. It keeps
    whatever the router reads off the token's identity and breaks what it reads from context,
    so NMI above it means the routing carries POS information beyond the word form itself
    (e.g. "that" as DET vs SCONJ going to different experts).
p-value = (1 + #{permuted NMI >= observed}) / (1 + permutations), so the smallest p a test of
P permutations can give is 1 / (P + 1) (`p_floor`).

Contextual NMI = observed NMI minus the within-token baseline's mean: the part of NMI(expert;
POS) that word identity alone does not explain. Its interval is a block bootstrap: the tokens
(in text order) are cut into blocks of `block` consecutive tokens, blocks are drawn with
replacement, and observed NMI and within-token baseline are recomputed on each resample
(blocks, because neighbouring tokens are not independent). The same resamples serve every layer.

Everything here works on integer codes (pandas factorize, numpy bincount): NMI of string labels
through scikit-learn is about 10x slower.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

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


def p_floor(permutations: int) -> float:
    """The smallest p-value a permutation test with this many permutations can report."""
    return 1.0 / (permutations + 1)


def permutations_for(alpha: float) -> int:
    """The fewest permutations whose p-value floor 1 / (P + 1) reaches `alpha`."""
    return max(1, int(np.ceil(1.0 / alpha - 1.0 - 1e-9)))


def _lexical_baseline(experts: np.ndarray, pos: np.ndarray, tokens: np.ndarray, num_experts: int, num_pos: int,
                      permutations: int, rng: np.random.Generator) -> np.ndarray:
    """NMI of `permutations` within-token shuffles of the experts."""
    order = np.argsort(tokens, kind="stable")
    starts = np.r_[0, np.flatnonzero(np.diff(tokens[order])) + 1, len(order)]
    return np.array([_nmi_codes(_within_group_shuffle(experts, order, starts, rng), pos, num_experts, num_pos)
                     for _ in range(permutations)])


def _block_resamples(n: int, block: int, resamples: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Row indices of `resamples` block-bootstrap resamples of n rows in text order."""
    blocks = max(1, -(-n // block))
    out = []
    for _ in range(resamples):
        starts = rng.integers(0, blocks, blocks) * block
        rows = (starts[:, None] + np.arange(block)[None, :]).ravel()
        out.append(rows[rows < n][:n])
    return out


def layer_nmi(labels: pd.DataFrame) -> pd.DataFrame:
    """Observed NMI(expert; label) per layer, no baselines (milliseconds): layer, tokens, nmi."""
    codes, names = pd.factorize(labels["pos"], sort=True)
    experts = labels["expert"].to_numpy().astype(np.int64)
    rows = [{"layer": int(layer), "tokens": len(idx),
             "nmi": _nmi_codes(experts[idx], codes[idx].astype(np.int64), int(experts[idx].max()) + 1, len(names))}
            for layer, idx in labels.groupby("layer").indices.items()]
    return pd.DataFrame(rows, columns=["layer", "tokens", "nmi"]).sort_values("layer").reset_index(drop=True)


def nmi_per_layer(labels: pd.DataFrame, permutations: int = 200, within_token: bool = True,
                  seed: int = 0, bootstrap: int = 0, block: int = 64, bootstrap_permutations: int = 3,
                  level: float = 0.95) -> pd.DataFrame:
    """NMI(expert; POS) per layer with permutation baselines and, optionally, bootstrap intervals.

    labels: columns layer, expert, pos (and token_id for the within-token baseline), every
    layer listing the same tokens in text order (`queries.token_labels`). Returns per layer:
    tokens, nmi, perm_mean, perm_p05, perm_p95, perm_max, p_value, z (observed minus permuted
    mean, in permuted standard deviations), pos_accuracy (POS guessed as the majority tag of the
    token's expert) against majority_accuracy (always the layer's most common tag): an effect
    size in plain terms; with within_token: lexical_mean, lexical_p95, lexical_p_value,
    contextual (nmi - lexical_mean) and lexical_share (lexical_mean / nmi); with bootstrap > 0
    resamples: nmi_low, nmi_high, contextual_low, contextual_high (a `level` percentile interval;
    each resample's within-token baseline from `bootstrap_permutations` shuffles).
    """
    rng = np.random.default_rng(seed)
    pos_codes, pos_names = pd.factorize(labels["pos"], sort=True)
    all_experts = labels["expert"].to_numpy().astype(np.int64)
    has_tokens = within_token and "token_id" in labels
    all_tokens = labels["token_id"].to_numpy() if has_tokens else None
    groups = labels.groupby("layer").indices
    sizes = {len(idx) for idx in groups.values()}
    resamples = (_block_resamples(max(sizes), block, bootstrap, np.random.default_rng(seed + 1))
                 if bootstrap and len(sizes) == 1 else [])
    tail = (1 - level) / 2
    rows = []
    for layer, idx in groups.items():
        experts = all_experts[idx]
        pos = pos_codes[idx].astype(np.int64)
        num_experts, num_pos = int(experts.max()) + 1, len(pos_names)
        table = np.bincount(experts * num_pos + pos, minlength=num_experts * num_pos).reshape(num_experts, num_pos)
        observed = nmi_from_contingency(table)
        perm = np.array([_nmi_codes(rng.permutation(experts), pos, num_experts, num_pos)
                         for _ in range(permutations)])
        row = {"layer": int(layer), "tokens": len(idx), "nmi": observed,
               "perm_mean": float(perm.mean()), "perm_p05": float(np.quantile(perm, 0.05)),
               "perm_p95": float(np.quantile(perm, 0.95)), "perm_max": float(perm.max()),
               "p_value": (1 + int((perm >= observed).sum())) / (1 + permutations),
               "z": float((observed - perm.mean()) / perm.std()) if perm.std() > 0 else float("inf"),
               "pos_accuracy": float(table.max(1).sum() / len(idx)),
               "majority_accuracy": float(table.sum(0).max() / len(idx))}
        if has_tokens:
            tokens = all_tokens[idx]
            lex = _lexical_baseline(experts, pos, tokens, num_experts, num_pos, permutations, rng)
            row.update(lexical_mean=float(lex.mean()), lexical_p95=float(np.quantile(lex, 0.95)),
                       lexical_p_value=(1 + int((lex >= observed).sum())) / (1 + permutations),
                       contextual=observed - float(lex.mean()),
                       lexical_share=float(lex.mean() / observed) if observed > 0 else float("nan"))
        if resamples:
            boot_nmi, boot_ctx = [], []
            for rows_b in resamples:
                e, p = experts[rows_b], pos[rows_b]
                nmi_b = _nmi_codes(e, p, num_experts, num_pos)
                boot_nmi.append(nmi_b)
                if has_tokens:
                    boot_ctx.append(nmi_b - float(_lexical_baseline(e, p, tokens[rows_b], num_experts, num_pos,
                                                                     bootstrap_permutations, rng).mean()))
            row.update(nmi_low=float(np.quantile(boot_nmi, tail)), nmi_high=float(np.quantile(boot_nmi, 1 - tail)))
            if has_tokens:
                row.update(contextual_low=float(np.quantile(boot_ctx, tail)),
                           contextual_high=float(np.quantile(boot_ctx, 1 - tail)))
        rows.append(row)
    out = pd.DataFrame(rows).sort_values("layer").reset_index(drop=True)
    out.attrs.update(permutations=permutations, p_floor=p_floor(permutations), bootstrap=len(resamples),
                     block=block, level=level, seed=seed)
    return out


def token_conditioned_counts(labels: pd.DataFrame) -> pd.DataFrame:
    """Expert x POS counts with what word identity alone predicts for them.

    Per (layer, expert, pos): tokens (observed) and expected = sum over token types t of
    n(t, expert) * n(t, pos) / n(t): the count if each occurrence of a token type went to the
    experts that type goes to, regardless of its tag in context (the mean of the within-token
    shuffle). tokens / expected is the contextual lift: above 1 where the expert takes the
    tokens of a type that carry this tag more than the type's other occurrences.
    labels: columns layer, token_id, expert, pos (`queries.token_labels`).
    """
    keys = ["layer", "token_id"]
    te = labels.groupby(keys + ["expert"], observed=True).size().rename("n_te").reset_index()
    tp = labels.groupby(keys + ["pos"], observed=True).size().rename("n_tp").reset_index()
    nt = labels.groupby(keys, observed=True).size().rename("n_t").reset_index()
    joined = te.merge(tp, on=keys).merge(nt, on=keys)
    joined["expected"] = joined.n_te * joined.n_tp / joined.n_t
    expected = joined.groupby(["layer", "expert", "pos"], as_index=False)["expected"].sum()
    observed = labels.groupby(["layer", "expert", "pos"], as_index=False, observed=True).size().rename(
        columns={"size": "tokens"})
    out = observed.merge(expected, on=["layer", "expert", "pos"], how="outer").fillna({"tokens": 0, "expected": 0.0})
    out["tokens"] = out["tokens"].astype(np.int64)
    return out.sort_values(["layer", "expert", "pos"]).reset_index(drop=True)


# -- clustering ------------------------------------------------------------------------------------------
BASELINES = {  # what an expert's profile is measured against
    "layer": "the layer's POS mix: P(pos | expert) - P(pos | layer)",
    "token": "word identity: (tokens - expected given the token types) / expert tokens, see token_conditioned_counts",
}
STABLE_ARI = 0.8  # a k whose clusters come back with this adjusted Rand index under resampling counts as stable


def _expert_counts(counts: pd.DataFrame, values: str = "tokens") -> pd.DataFrame:
    """(layer, expert) x POS table of `values` (tokens, or expected), columns in UPOS order."""
    c = counts.pivot_table(index=["layer", "expert"], columns="pos", values=values, aggfunc="sum", fill_value=0)
    return c[[p for p in UPOS if p in c.columns] + [p for p in c.columns if p not in UPOS]]


def _layer_mix(c: pd.DataFrame) -> pd.DataFrame:
    """P(pos | layer) on every (layer, expert) row of an _expert_counts table."""
    mix = c.groupby(level="layer").transform("sum")
    return mix.div(mix.sum(axis=1), axis=0)


def _expected_counts(counts: pd.DataFrame, baseline: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """-> (observed, expected) (layer, expert) x POS tables under `baseline` (BASELINES)."""
    if baseline not in BASELINES:
        raise ValueError(f"baseline {baseline!r}: use one of {', '.join(BASELINES)}")
    observed = _expert_counts(counts)
    if baseline == "layer":
        return observed, _layer_mix(observed).mul(observed.sum(axis=1), axis=0)
    if "expected" not in counts:
        raise ValueError("the token baseline needs expected counts: pass token_conditioned_counts(labels)")
    return observed, _expert_counts(counts, "expected").reindex_like(observed).fillna(0.0)


def expert_profile_matrix(counts: pd.DataFrame, min_tokens: int = 50, baseline: str = "layer") -> pd.DataFrame:
    """Excess share of every (layer, expert) with at least min_tokens tokens, one column per POS:
    (observed - expected tokens) / expert tokens, expected under `baseline`: the layer's POS mix
    (P(pos | expert) - P(pos | layer)), or word identity (what the expert's token types carry).

    Against a baseline, so that a profile says what an expert prefers rather than what every
    layer sees most (nouns), or, with "token", what it prefers beyond the words it gets; a
    difference of shares rather than log lift, so that rare tags (INTJ, SYM, X), whose lift
    swings wildly on a handful of tokens, do not dominate the distances.
    """
    observed, expected = _expected_counts(counts, baseline)
    total = observed.sum(axis=1)
    return (observed - expected).div(total.clip(lower=1), axis=0)[total >= min_tokens]


@dataclass
class ExpertClusters:
    experts: pd.DataFrame  # layer, expert, cluster, cluster_name, pc1, pc2, tokens
    silhouette: dict[int, float]  # k -> silhouette score of KMeans with k clusters
    k: int  # the k used: chosen by k_rule, or the caller's
    names: dict[int, str]  # cluster -> name from its over-represented roles (name_cluster)
    centroids: pd.DataFrame  # cluster x POS log2 lift of the pooled tokens of its experts against the baseline
    explained_variance: list[float] = field(default_factory=list)  # of the 2 PCA axes
    shares: pd.DataFrame | None = None  # cluster x POS share of the cluster's tokens
    stability: dict[int, float] = field(default_factory=dict)  # k -> mean adjusted Rand index under resampling
    k_rule: str = ""  # how k was chosen, in words
    baseline: str = "layer"
    min_lift: float = 1.5  # naming thresholds, shown beside the names
    min_share: float = 0.05

    def summary(self) -> pd.DataFrame:
        """One row per cluster: name, members, layers spanned, tokens, top_lifts (the three highest
        lifts among the tags with at least min_share of the cluster's tokens: the rows its name
        is read from) and top_shares (the three largest tags)."""
        g = self.experts.groupby(["cluster", "cluster_name"])
        out = g.agg(members=("expert", "size"), layers=("layer", lambda s: f"{s.min()}-{s.max()}"),
                    tokens=("tokens", "sum")).reset_index()
        out["top_lifts"] = out.cluster.map(lambda k: ", ".join(
            f"{p} {2 ** v:.2f}x" for p, v in eligible_lifts(self.centroids.loc[k], self.shares.loc[k]
                                                            if self.shares is not None else None,
                                                            self.min_share).head(3).items()))
        if self.shares is not None:
            out["top_shares"] = out.cluster.map(lambda k: ", ".join(
                f"{p} {v:.0%}" for p, v in self.shares.loc[k].sort_values(ascending=False).head(3).items()))
        return out


def eligible_lifts(centroid: pd.Series, shares: pd.Series | None = None, min_share: float = 0.05) -> pd.Series:
    """log2 lifts of the POS that make up at least `min_share` of the cluster's tokens, highest first
    (a rare tag with a large lift, such as SYM, does not name a cluster it hardly occurs in)."""
    if shares is not None:
        centroid = centroid[shares.reindex(centroid.index).fillna(0.0) >= min_share]
    return centroid.sort_values(ascending=False, kind="stable")


LEAN_SHARE = 0.10  # a named tag below this share of the cluster's tokens makes the name "leans TAG"


def name_cluster(centroid: pd.Series, shares: pd.Series | None = None, min_lift: float = 1.5,
                 min_share: float = 0.05, top: int = 2, lean_share: float = LEAN_SHARE) -> str:
    """'NOUN+PROPN': the (at most `top`) highest of `eligible_lifts` that reach `min_lift`; 'mixed'
    when none does. So a name always reads off the first entries of the summary's top_lifts. When
    none of the named tags makes `lean_share` of the cluster's tokens the name is 'leans AUX': the
    cluster prefers AUX more than its layers do, but AUX is not what it mostly gets."""
    chosen = [pos for pos, v in eligible_lifts(centroid, shares, min_share).head(top).items() if 2 ** v >= min_lift]
    if not chosen:
        return "mixed"
    name = "+".join(chosen)
    if shares is not None and max(float(shares.get(p, 0.0)) for p in chosen) < lean_share:
        return f"leans {name}"
    return name


def named_tags(name: str) -> list[str]:
    """The tags a cluster name claims ('leans AUX #2' -> ['AUX']; 'mixed' -> [])."""
    base = name.split(" #")[0].removeprefix("leans ")
    return [] if base == "mixed" else base.split("+")


def _resampled(counts_table: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each row's counts drawn again (multinomial, same total): the sampling noise of its profile."""
    totals = counts_table.sum(axis=1).astype(np.int64)
    probs = counts_table / np.clip(counts_table.sum(axis=1, keepdims=True), 1e-12, None)
    return np.stack([rng.multinomial(n, p) if n > 0 else np.zeros_like(p) for n, p in zip(totals, probs)])


def cluster_experts(counts: pd.DataFrame, min_tokens: int = 50, k_range=range(2, 11), seed: int = 0,
                    k: int | None = None, baseline: str = "layer", resamples: int = 20,
                    min_lift: float = 1.5, min_share: float = 0.05) -> ExpertClusters:
    """KMeans (fixed seed) on expert profiles (`expert_profile_matrix`) across all layers.

    For every k in k_range: the silhouette, and the stability = mean adjusted Rand index between
    the clustering of the data and the clustering of `resamples` resampled tables (each expert's
    tokens redrawn from its own POS mix). Unless `k` is given: the best silhouette among the stable
    k (ARI >= STABLE_ARI), or the most stable k when none is.
    """
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA
    from sklearn.metrics import adjusted_rand_score, silhouette_score

    profiles = expert_profile_matrix(counts, min_tokens, baseline)
    observed, expected = _expected_counts(counts, baseline)
    x = profiles.to_numpy()
    n = len(x)
    most = min(n - 1, len(np.unique(x.round(12), axis=0)))  # KMeans cannot make more clusters than distinct rows
    ks = sorted({kk for kk in k_range if 2 <= kk <= most} | ({k} if k and 2 <= k <= most else set()))
    if not ks:
        if n > 2 and most < 2:  # e.g. a tag column with a single value: every profile is zero
            raise ValueError(f"the {n} experts with at least {min_tokens} tokens all have the same tag profile "
                             f"({profiles.shape[1]} distinct tag(s) in the log): nothing to cluster")
        raise ValueError(f"{n} experts have at least {min_tokens} tokens: too few to cluster; "
                         "trace more text or lower min_tokens")
    if k is not None and k not in ks:
        raise ValueError(f"k = {k}: choose between 2 and {most} ({n} experts to cluster)")
    rng = np.random.default_rng(seed)
    obs_kept, exp_kept = observed.loc[profiles.index].to_numpy(float), expected.loc[profiles.index].to_numpy(float)
    redrawn = [_resampled(obs_kept, rng) for _ in range(resamples)]
    scores, stability, fits = {}, {}, {}
    for kk in ks:
        km = KMeans(n_clusters=kk, n_init=10, random_state=seed).fit(x)
        if len(set(km.labels_)) < 2:
            continue
        scores[kk], fits[kk] = float(silhouette_score(x, km.labels_)), km
        aris = []
        for b, table in enumerate(redrawn):
            xb = (table - exp_kept) / np.clip(table.sum(axis=1, keepdims=True), 1, None)
            aris.append(adjusted_rand_score(km.labels_, KMeans(n_clusters=kk, n_init=4,
                                                               random_state=seed + 1 + b).fit(xb).labels_))
        stability[kk] = float(np.mean(aris)) if aris else float("nan")
    if k is not None:
        rule = f"k = {k}, chosen by the user"
    else:
        stable = [kk for kk in scores if stability.get(kk, 0) >= STABLE_ARI]
        if stable:
            k = max(stable, key=scores.get)
            rule = f"k = {k}: best silhouette among the stable k (adjusted Rand >= {STABLE_ARI} under resampling)"
        else:
            k = max(scores, key=lambda kk: stability.get(kk, 0))
            rule = f"k = {k}: no k is stable (adjusted Rand >= {STABLE_ARI}); the most stable one"
    labels = fits[k].labels_
    pooled = observed.loc[profiles.index].groupby(labels).sum()
    shares = pooled.div(pooled.sum(axis=1), axis=0)  # cluster x POS share of the cluster's tokens
    pooled_expected = expected.loc[profiles.index].groupby(labels).sum()
    expected_shares = pooled_expected.div(pooled_expected.sum(axis=1).clip(lower=1e-12), axis=0)
    centroids = np.log2((shares + 1e-9) / (expected_shares + 1e-9))
    names = {c: name_cluster(centroids.loc[c], shares.loc[c], min_lift, min_share) for c in centroids.index}
    seen: dict[str, int] = {}
    for c in sorted(names, key=lambda c: -int((labels == c).sum())):  # duplicate names get a suffix
        seen[names[c]] = seen.get(names[c], 0) + 1
        if seen[names[c]] > 1:
            names[c] = f"{names[c]} #{seen[names[c]]}"
    pca = PCA(n_components=min(2, x.shape[1], n), random_state=seed).fit(x)
    coords = pca.transform(x)
    totals = observed.sum(axis=1)
    experts = pd.DataFrame({
        "layer": profiles.index.get_level_values("layer").astype(int),
        "expert": profiles.index.get_level_values("expert").astype(int),
        "cluster": labels.astype(int), "cluster_name": [names[c] for c in labels],
        "pc1": coords[:, 0], "pc2": coords[:, 1] if coords.shape[1] > 1 else 0.0,
        "tokens": [int(totals.loc[i]) for i in profiles.index]})
    return ExpertClusters(experts, scores, k, names, centroids, [float(v) for v in pca.explained_variance_ratio_],
                          shares, stability, rule, baseline, min_lift, min_share)


def clustering_agreement(a: ExpertClusters, b: ExpertClusters) -> tuple[float, int]:
    """Adjusted Rand index between two clusterings of the same conversion's experts (e.g. on two
    texts), over the (layer, expert) pairs both clustered. -> (ARI, experts compared)."""
    from sklearn.metrics import adjusted_rand_score

    joined = a.experts.merge(b.experts, on=["layer", "expert"], suffixes=("_a", "_b"))
    if len(joined) < 2:
        return float("nan"), len(joined)
    return float(adjusted_rand_score(joined.cluster_a, joined.cluster_b)), len(joined)


def name_follows_rows(name: str, top_lifts: str, min_lift: float) -> bool:
    """Whether a summary row's name reads off its top_lifts ('SYM 3.62x, PUNCT 3.56x, ...'): its
    tags are the first entries there, each at least min_lift, and 'mixed' exactly when the first
    entry is below min_lift."""
    base, tol = name.split(" #")[0].removeprefix("leans "), 0.005  # lifts are shown with 2 decimals
    entries = [(p, float(v.rstrip("x"))) for p, v in (e.rsplit(" ", 1) for e in top_lifts.split(", ") if e)]
    if base == "mixed":
        return not entries or entries[0][1] < min_lift + tol
    tags = base.split("+")
    head = entries[:len(tags)]
    return [p for p, _ in head] == tags and all(v >= min_lift - tol for _, v in head) and (
        len(tags) == 2 or len(entries) <= len(tags) or entries[len(tags)][1] < min_lift + tol)
