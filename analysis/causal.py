"""What experts do, by intervention: the expert-ablation rows (`tomoe_core.trace.ablation`) joined
with a routing log's tags, and how routing and roles move across budgets of one conversion.

* `ablation_by_tag`: per layer, expert x tag mean loss increase when the expert is removed, with
  bootstrap intervals (cells with too few tokens are NaN: the figure greys them).
* `cluster_verdicts`: one sentence per named cluster of experts saying whether its name holds
  causally (removing its experts hurts the named tags more than the others).
* `needed_tokens`: the tokens an expert is most needed for.
* `layer_table`: the per-layer summary docs/RESULTS.md quotes.
* `budget_siblings`, `budget_agreement`: logs of the same text at several budgets of one
  conversion; per layer adjusted Rand index and NMI between their routings, and how far each
  expert's tag profile persists.
"""
from __future__ import annotations

import re
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd

from tomoe_core.trace.ablation import ablation_dir, read_ablation_meta

from .experts import named_tags
from tomoe_core.trace.queries import label_column, routing_source
from tomoe_core.trace.routing_log import list_runs

MIN_TOKENS = 10  # a cell's mean rests on at least this many tokens, else it is grey
BOOTSTRAP = 400  # token resamples per interval
METRICS = {"delta_loss": ("next-token loss", "nats"), "kl": ("KL to the unablated model", "nats")}
SCOPES = {"routed": "tokens routed to the expert (hit directly, and through earlier routed tokens)",
          "all": "all tokens (direct, and through attention on later tokens)"}


def _quote(path) -> str:
    return "'" + str(path).replace("'", "''") + "'"


def ablation_source(run, effect: str = "total") -> str:
    return f"read_parquet({_quote(ablation_dir(run, effect) / 'part-*.parquet')})"


def _rows(run, where: str, params: list, label: str = "pos", extra: str = "", effect: str = "total") -> pd.DataFrame:
    """Ablation rows joined with the token's tag (and `extra` log columns) from layer 0 of the log."""
    column = label_column(run, label)
    return duckdb.connect().execute(f"""
        SELECT a.*, t.tag {extra}
        FROM {ablation_source(run, effect)} a
        JOIN (SELECT doc_id, position, {column} AS tag, token FROM {routing_source(run)} WHERE layer = 0) t
          USING (doc_id, position)
        WHERE {where}""", params).df()


def bootstrap_mean(values: np.ndarray, resamples: int = BOOTSTRAP, seed: int = 0,
                   level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): percentile interval of the mean over token resamples."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(len(values), size=(resamples, len(values)))].mean(axis=1)
    tail = (1 - level) / 2
    return float(values.mean()), float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def ablation_by_tag(run, layer: int, replacement: str = "second", scope: str = "routed", label: str = "pos",
                    min_tokens: int = MIN_TOKENS, resamples: int = BOOTSTRAP, seed: int = 0,
                    metric: str = "delta_loss", effect: str = "total") -> pd.DataFrame:
    """Per (expert, tag) of one layer: tokens, mean `metric` (loss increase or KL, nats) with its bootstrap interval.
    mean/low/high are NaN where fewer than `min_tokens` tokens back the cell. Columns: expert, tag,
    tokens, mean, low, high. The direct effect has rows for routed tokens only (scope "all" = "routed")."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    where = "a.layer = ? AND a.replacement = ? AND a.delta_loss IS NOT NULL AND t.tag IS NOT NULL"
    rows = _rows(run, where + (" AND a.routed" if scope == "routed" else ""), [layer, replacement], label,
                 effect=effect)
    out = []
    for (expert, tag), g in rows.groupby(["expert", "tag"], sort=True):
        n = len(g)
        mean, low, high = (bootstrap_mean(g[metric].to_numpy(), resamples, seed) if n >= min_tokens
                           else (np.nan, np.nan, np.nan))
        out.append({"expert": int(expert), "tag": tag, "tokens": n, "mean": mean, "low": low, "high": high})
    return pd.DataFrame(out, columns=["expert", "tag", "tokens", "mean", "low", "high"])


def layer_table(run, effect: str = "total") -> pd.DataFrame:
    """Per layer: mean loss increase and KL on the routed tokens with the second-choice and the random
    replacement, on the other tokens (second choice), and the expert whose removal costs most."""
    con = duckdb.connect()
    per = con.execute(f"""
        SELECT layer, replacement, routed, avg(delta_loss) AS delta, avg(kl) AS kl, count(*) AS n
        FROM {ablation_source(run, effect)} GROUP BY ALL""").df()
    tokens = read_ablation_meta(run, effect)["tokens"]  # per token of the text (the direct rows hold routed ones only)
    worst = con.execute(f"""
        SELECT layer, expert, sum(delta_loss) / ? AS per_token
        FROM {ablation_source(run, effect)} WHERE replacement = 'second' GROUP BY layer, expert""", [tokens]).df()
    out = []
    for layer, g in per.groupby("layer"):
        def pick(replacement, routed, col):
            sel = g[(g.replacement == replacement) & (g.routed == routed)]
            return float(sel[col].iloc[0]) if len(sel) else np.nan
        w = worst[worst.layer == layer].sort_values("per_token", ascending=False)
        out.append({"layer": int(layer),
                    "routed_second": pick("second", True, "delta"), "routed_random": pick("random", True, "delta"),
                    "kl_second": pick("second", True, "kl"), "kl_random": pick("random", True, "kl"),
                    "others_second": pick("second", False, "delta"),
                    "costliest_expert": int(w.expert.iloc[0]) if len(w) else -1,
                    "costliest_per_token": float(w.per_token.iloc[0]) if len(w) else np.nan})
    return pd.DataFrame(out)


def needed_tokens(run, layer: int, expert: int, replacement: str = "second", limit: int = 15,
                  min_count: int = 1, effect: str = "total") -> pd.DataFrame:
    """The tokens (strings) whose loss rises most in total when `expert` of `layer` is removed, over
    the tokens routed to it. Columns: token, count, mean_increase, total_increase."""
    rows = _rows(run, "a.layer = ? AND a.expert = ? AND a.replacement = ? AND a.routed AND a.delta_loss IS NOT NULL",
                 [layer, expert, replacement], extra=", t.token", effect=effect)
    if rows.empty:
        return pd.DataFrame(columns=["token", "count", "mean_increase", "total_increase"])
    g = rows.groupby("token", observed=True)["delta_loss"].agg(["count", "mean", "sum"]).reset_index()
    g = g[g["count"] >= min_count].sort_values("sum", ascending=False).head(limit)
    return g.rename(columns={"mean": "mean_increase", "sum": "total_increase"}).reset_index(drop=True)


MIN_EXPERTS_TO_RESAMPLE = 5  # from this many member experts the interval resamples experts, not tokens


def cluster_verdicts(run, experts: pd.DataFrame, replacement: str = "second", label: str = "pos",
                     metric: str = "delta_loss", resamples: int = BOOTSTRAP, seed: int = 0,
                     effect: str = "total") -> pd.DataFrame:
    """For each cluster named by tags (experts: layer, expert, cluster_name, as from
    `analysis.experts.cluster_experts`), over its experts that were ablated: the mean `metric`
    (loss increase, or KL) on tokens of the named tags and on the others (total effect: all tokens,
    what removing the expert does to the text; direct effect: the experts' own tokens only), their
    difference with a 95 % bootstrap interval, and a sentence.
    Each member expert gives one paired difference (same tokens); with at least
    MIN_EXPERTS_TO_RESAMPLE members the interval resamples experts (the same tokens reappear in
    every member's ablation, so resampling tokens would understate the spread), else tokens.
    Columns: cluster_name, experts, named, others, diff, low, high, holds, over, sentence."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    meta = read_ablation_meta(run, effect)
    members = experts[experts.layer.isin(set(meta["layers"])) & experts.expert.isin(meta["experts"])]
    rng = np.random.default_rng(seed)
    out = []
    for name, group in members.groupby("cluster_name", sort=True):
        tags = named_tags(str(name))
        if not tags:
            continue
        pairs = ", ".join(f"({int(l)}, {int(e)})" for l, e in zip(group.layer, group.expert))
        rows = _rows(run, f"a.replacement = ? AND a.delta_loss IS NOT NULL AND t.tag IS NOT NULL "
                          f"AND (a.layer, a.expert) IN ({pairs})", [replacement], label, effect=effect)
        if rows.empty:
            continue
        rows = rows.assign(named=rows.tag.isin(tags))
        per = rows.groupby(["layer", "expert", "named"])[metric].mean().unstack("named")
        if True not in per or False not in per:
            continue
        per = per.dropna()
        named_mean, other_mean = float(per[True].mean()), float(per[False].mean())
        if len(per) >= MIN_EXPERTS_TO_RESAMPLE:
            d = (per[True] - per[False]).to_numpy()
            diffs, over = d[rng.integers(len(d), size=(resamples, len(d)))].mean(1), "experts"
        else:  # few experts: pooled tokens, and the point estimate from the same pool as its interval
            a = rows.loc[rows.named, metric].to_numpy(np.float64)
            b = rows.loc[~rows.named, metric].to_numpy(np.float64)
            named_mean, other_mean = float(a.mean()), float(b.mean())
            diffs = (a[rng.integers(len(a), size=(resamples, len(a)))].mean(1)
                     - b[rng.integers(len(b), size=(resamples, len(b)))].mean(1))
            over = "tokens"
        low, high = (float(q) for q in np.quantile(diffs, [0.025, 0.975]))
        holds = low > 0
        layers = sorted(set(group.layer.astype(int)))
        where = f"layer {layers[0]}" if len(layers) == 1 else f"{len(group)} experts in layers {layers[0]}-{layers[-1]}"
        verdict = ("the name holds causally." if holds else "the opposite holds: the other tokens suffer more."
                   if high < 0 else "the name is not borne out causally (the interval includes 0).")
        what, unit = METRICS[metric]
        others = "the others" if effect == "total" else "their other tokens"  # direct rows: routed tokens only
        sentence = (f"Removing the {name} expert{'s' if len(group) > 1 else ''} ({where}) changes the {what} of "
                    f"{'/'.join(tags)} tokens by {named_mean:+.3f} {unit} and of {others} by {other_mean:+.3f} "
                    f"(difference {named_mean - other_mean:+.3f}, 95 % interval over {over} {low:+.3f} to "
                    f"{high:+.3f}): {verdict}")
        out.append({"cluster_name": name, "experts": len(group), "named": named_mean, "others": other_mean,
                    "diff": named_mean - other_mean, "low": low, "high": high, "holds": holds, "over": over,
                    "sentence": sentence})
    return pd.DataFrame(out, columns=["cluster_name", "experts", "named", "others", "diff", "low", "high", "holds",
                                      "over", "sentence"])


def effect_agreement(run, replacement: str = "second") -> dict:
    """How well the fast direct effect tracks the exact total effect on the same tokens (routed tokens
    of both ablations): Pearson r of the loss change and of KL over tokens, of the (layer, expert)
    means, per layer, and the share of (layer, expert) pairs whose mean has the same sign."""
    rows = duckdb.connect().execute(f"""
        SELECT t.layer, t.expert, t.delta_loss AS total, d.delta_loss AS direct, t.kl AS total_kl, d.kl AS direct_kl
        FROM {ablation_source(run, "total")} t JOIN {ablation_source(run, "direct")} d
          USING (doc_id, position, layer, expert, replacement)
        WHERE t.routed AND t.replacement = ? AND t.delta_loss IS NOT NULL AND d.delta_loss IS NOT NULL""",
                                    [replacement]).df()
    if len(rows) < 3:
        raise ValueError(f"run {run}: the direct and total ablations share {len(rows)} tokens: too few to compare")
    means = rows.groupby(["layer", "expert"])[["total", "direct"]].mean()
    per_layer = {int(l): float(g.total.corr(g.direct)) for l, g in rows.groupby("layer") if len(g) > 2}
    return {"tokens": int(len(rows)), "replacement": replacement,
            "r_tokens": float(rows.total.corr(rows.direct)), "r_kl_tokens": float(rows.total_kl.corr(rows.direct_kl)),
            "r_expert_means": float(means.total.corr(means.direct)),
            "same_sign_expert_means": float((np.sign(means.total) == np.sign(means.direct)).mean()),
            "r_by_layer": per_layer}


# -- roles across budgets ---------------------------------------------------------------------------
_AT_BUDGET = re.compile(r"-at-p[0-9.]+$")


def conversion_family(meta: dict) -> str:
    """The conversion a log's model was materialised from: `rebudget` names its outputs NAME-at-pX."""
    return _AT_BUDGET.sub("", Path(str(meta.get("conversion") or "")).name)


def budget_siblings(run, runs: list[dict] | None = None) -> dict[float, str]:
    """budget -> run path of the logs of the same conversion family over the same text and token count
    as `run` (itself included), one per budget (the newest)."""
    runs = list_runs() if runs is None else runs
    me = next((r for r in runs if Path(r["path"]).resolve() == Path(str(run)).resolve() or r["run_id"] == str(run)), None)
    if me is None:
        return {}
    key = lambda r: (conversion_family(r), r.get("model"), json_key(r.get("text")), r.get("tokens"))  # noqa: E731
    out = {}
    for r in sorted(runs, key=lambda r: str(r.get("created_at"))):
        if key(r) == key(me) and r.get("budget") is not None:
            out[float(r["budget"])] = r["path"]
    return dict(sorted(out.items()))


def json_key(value) -> str:
    import json

    return json.dumps(value, sort_keys=True, default=str)


def budget_agreement(runs: dict[float, str], reference: float | None = None, label: str = "pos") -> pd.DataFrame:
    """Per layer and budget b, against the reference budget's log (default: the middle one):
    adjusted Rand index and NMI between the two routings of the same tokens, the share of tokens
    routed to the same expert index, and the median over experts of the cosine similarity of an
    expert's tag preference (its tag shares minus the layer's mix) at the two budgets (same expert
    index; 1: the same preferences, 0: unrelated).
    Columns: layer, budget, reference, ari, nmi, same_expert, profile_cosine."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    budgets = sorted(runs)
    if len(budgets) < 2:
        raise ValueError("need logs at two budgets or more")
    reference = budgets[len(budgets) // 2] if reference is None else reference
    con = duckdb.connect()
    tag = label_column(runs[reference], label)  # tags are read from the reference only: the same tokens

    def read(path, with_tag: bool = False):
        column = f"{tag} AS tag" if with_tag else "NULL AS tag"
        return con.execute(f"SELECT doc_id, position, layer, expert, {column} FROM {routing_source(path)} "
                           "ORDER BY doc_id, position, layer").df()

    ref = read(runs[reference], with_tag=True)
    out = []
    for b in budgets:
        if b == reference:
            continue
        other = read(runs[b])
        both = ref.merge(other, on=["doc_id", "position", "layer"], suffixes=("_ref", ""))
        for layer, g in both.groupby("layer"):
            profiles = []
            tagged = g[g.tag_ref.notna()]
            a = pd.crosstab(tagged.expert_ref, tagged.tag_ref)
            c = pd.crosstab(tagged.expert, tagged.tag_ref).reindex(columns=a.columns, fill_value=0)
            mix = a.sum(0).to_numpy(float) / max(a.to_numpy().sum(), 1)  # the layer's tag mix (same tokens at both)
            for e in a.index.intersection(c.index):
                u, v = a.loc[e].to_numpy(float), c.loc[e].to_numpy(float)
                if u.sum() >= MIN_TOKENS and v.sum() >= MIN_TOKENS:
                    u, v = u / u.sum() - mix, v / v.sum() - mix  # what the expert prefers beyond the mix
                    norm = np.linalg.norm(u) * np.linalg.norm(v)
                    if norm > 0:
                        profiles.append(float(u @ v / norm))
            out.append({"layer": int(layer), "budget": b, "reference": reference,
                        "ari": adjusted_rand_score(g.expert_ref, g.expert),
                        "nmi": normalized_mutual_info_score(g.expert_ref, g.expert),
                        "same_expert": float((g.expert_ref == g.expert).mean()),
                        "profile_cosine": float(np.median(profiles)) if profiles else np.nan})
    return pd.DataFrame(out)
