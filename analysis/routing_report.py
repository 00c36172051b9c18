"""Experts by syntactic role for one routing run: `python -m analysis.routing_report RUN`.

Tags the run's text with spaCy (once; `word` and `pos` columns are added to the log) and, for a
run traced on a CoNLL-U file, adds its gold tags (gold_upos, gold_xpos, gold_deprel, gold_head),
then prints and saves: NMI(expert; POS) per layer against both permutation baselines, the
contextual NMI (above the within-token baseline) with a block-bootstrap interval, the k of the
expert clustering with its silhouette and stability (adjusted Rand index under resampling) for
every k, and the clusters named by their over-represented roles. With gold tags: spaCy-gold
agreement and NMI for spaCy UPOS, gold UPOS and gold deprel side by side. The permutation count
follows from --alpha unless given: P permutations cannot give a p-value below 1 / (P + 1).
The JSON result goes to <run folder>/syntax-report.json (or --output).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import sys
import time
from pathlib import Path

import pandas as pd


def _clusters(run, labels, min_tokens: int, seed: int, k: int | None, baseline: str):
    from tomoe_core.trace import queries

    from .experts import cluster_experts, token_conditioned_counts

    counts = token_conditioned_counts(labels) if baseline == "token" else queries.expert_pos(run)
    return cluster_experts(counts, min_tokens=min_tokens, seed=seed, k=k, baseline=baseline)


def build_report(run, permutations: int | None = None, min_tokens: int = 50, seed: int = 0,
                 tagger: str | None = None, alpha: float = 0.01, bootstrap: int = 100, k: int | None = None,
                 baseline: str = "layer", against: str | None = None) -> dict:
    from tomoe_core.trace import queries
    from tomoe_core.trace.routing_log import read_run_meta, run_dir

    from .experts import clustering_agreement, nmi_per_layer, permutations_for
    from .syntax import DEFAULT_TAGGER, annotate_gold, annotate_run, gold_source, tag_agreement

    permutations = permutations if permutations is not None else permutations_for(alpha)
    t0 = time.perf_counter()
    annotate_run(run, tagger=tagger or DEFAULT_TAGGER)
    if gold_source(run) is not None:
        annotate_gold(run)
    t_tag = time.perf_counter() - t0
    labels = queries.token_labels(run)
    t1 = time.perf_counter()
    nmi = nmi_per_layer(labels, permutations=permutations, seed=seed, bootstrap=bootstrap)
    clusters = _clusters(run, labels, min_tokens, seed, k, baseline)
    between = None
    if against is not None:  # the same clustering on another run's text, at the same k
        annotate_run(against, tagger=tagger or DEFAULT_TAGGER)
        other = _clusters(against, queries.token_labels(against), min_tokens, seed, clusters.k, baseline)
        ari, compared = clustering_agreement(clusters, other)
        between = {"run": read_run_meta(against)["run_id"], "text": read_run_meta(against).get("text"),
                   "k": clusters.k, "adjusted_rand": ari, "experts_compared": compared,
                   "k_chosen_there": _clusters(against, queries.token_labels(against), min_tokens, seed, None,
                                               baseline).k}
    gold = None
    if queries.has_gold(run):
        agree = tag_agreement(queries.tag_pairs(run))
        by_label = {}
        for name, column in (("spacy_upos", "pos"), ("gold_upos", "gold_upos"), ("gold_deprel", "gold_deprel")):
            labels_of = queries.token_labels(run, label=column)
            if labels_of.empty:  # e.g. a POS-only treebank: '_' in DEPREL
                by_label[name] = None
                continue
            table = nmi_per_layer(labels_of, permutations=permutations, seed=seed, bootstrap=bootstrap)
            by_label[name] = table[["layer", "tokens", "nmi", "p_value", "contextual"]
                                   + [c for c in ("contextual_low", "contextual_high") if c in table]].to_dict("records")
        gold = {"source": str(gold_source(run)), "tokens_both_tagged": agree["tokens"],
                "agreement": agree["agreement"], "confusions": agree["confusions"].head(10).to_dict("records"),
                "nmi": by_label}
    meta = read_run_meta(run)
    return {
        "run": meta["run_id"], "run_folder": str(run_dir(run)), "model": meta.get("model"),
        "conversion_digest": meta.get("conversion_digest"), "budget": meta.get("budget"),
        "text": meta.get("text"), "tokens_traced": meta.get("tokens"),
        "tokens_with_pos": int(labels[labels.layer == labels.layer.min()].shape[0]),
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "permutations": permutations, "p_floor": 1 / (permutations + 1), "alpha": alpha, "seed": seed,
        "bootstrap": {"resamples": bootstrap, "block_tokens": nmi.attrs["block"], "level": nmi.attrs["level"]},
        "nmi": nmi.to_dict(orient="records"),
        "clusters": {"k": clusters.k, "k_rule": clusters.k_rule, "baseline": clusters.baseline,
                     "silhouette": clusters.silhouette, "stability_ari": clusters.stability,
                     "min_tokens": min_tokens, "min_lift": clusters.min_lift, "min_share": clusters.min_share,
                     "names": {int(c): v for c, v in clusters.names.items()},
                     "summary": clusters.summary().to_dict(orient="records"),
                     "experts": clusters.experts.to_dict(orient="records")},
        "gold": gold, "between_texts": between,
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0], "cpu_count": os.cpu_count()},
        "seconds": {"tagging": round(t_tag, 1), "statistics": round(time.perf_counter() - t1, 1)},
    }


def significance_line(p_values: pd.Series, permutations: int, alpha: float, what: str) -> str:
    """'layers with NMI above X at p <= alpha: n/N', or, when the permutations cannot reach alpha,
    the count at the smallest p they can give, with that floor and the permutations alpha needs."""
    from .experts import p_floor, permutations_for

    floor = p_floor(permutations)
    if floor <= alpha + 1e-12:
        return f"layers with NMI above {what} at p <= {alpha:g}: {int((p_values <= alpha).sum())}/{len(p_values)}"
    return (f"layers with NMI above {what}: {int((p_values <= floor + 1e-12).sum())}/{len(p_values)} at p = "
            f"{floor:.4f}, the smallest p {permutations} permutations can give (1/{permutations + 1}); "
            f"p <= {alpha:g} needs at least {permutations_for(alpha)} permutations")


def format_gold(gold: dict | None) -> list[str]:
    """The report's lines on a treebank's gold tags; a tag column the treebank leaves '_' says so."""
    if not gold:
        return []
    lines = [f"gold tags from {gold['source']}: spaCy UPOS agrees with gold UPOS on {gold['agreement']:.1%} "
             f"of {gold['tokens_both_tagged']} tokens tagged by both"]
    table = pd.DataFrame({"layer": [r["layer"] for r in gold["nmi"]["spacy_upos"]]})
    for name, rows in gold["nmi"].items():
        if rows is None:
            lines.append(f"{name}: none in the treebank (its column is '_'), no statistics")
            continue
        table[f"nmi_{name}"] = [r["nmi"] for r in rows]
    lines.append(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    return lines


def format_report(report: dict) -> str:
    nmi = pd.DataFrame(report["nmi"])
    perms, alpha = report["permutations"], report.get("alpha", 0.01)
    lines = [f"run {report['run']} | model {report['model']} (conversion {report['conversion_digest']}, "
             f"p = {report['budget']}) | text {(report.get('text') or {}).get('source')} | "
             f"{report['tokens_with_pos']} tokens with a POS tag | {perms} permutations per baseline "
             f"(smallest possible p {report.get('p_floor', 1 / (perms + 1)):.4f})"]
    cols = ["layer", "nmi", "perm_mean", "perm_p95", "p_value", "z", "pos_accuracy", "majority_accuracy"]
    cols += [c for c in ("lexical_mean", "lexical_p_value", "contextual", "contextual_low", "contextual_high")
             if c in nmi]
    lines.append(nmi[cols].to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    lines.append(significance_line(nmi.p_value, perms, alpha, "the shuffled baseline")
                 + f"; NMI median {nmi.nmi.median():.4f}, max {nmi.nmi.max():.4f} "
                 f"(layer {int(nmi.loc[nmi.nmi.idxmax(), 'layer'])})")
    if "lexical_p_value" in nmi:
        lines.append(significance_line(nmi.lexical_p_value, perms, alpha, "the within-token (lexical) baseline")
                     + f"; share of NMI explained by token identity alone (median): {nmi.lexical_share.median():.0%}")
        line = f"contextual NMI (NMI - within-token baseline), median over layers {nmi.contextual.median():.4f}"
        if "contextual_low" in nmi:
            b = report["bootstrap"]
            above = int((nmi.contextual_low > 0).sum())
            line += (f"; {b['level']:.0%} block-bootstrap intervals ({b['resamples']} resamples of "
                     f"{b['block_tokens']}-token blocks) above 0 in {above}/{len(nmi)} layers")
        lines.append(line)
    c = report["clusters"]
    scores = ", ".join(f"k={k}: {v:.3f} / {c['stability_ari'].get(k, float('nan')):.2f}"
                       for k, v in sorted(c["silhouette"].items(), key=lambda kv: int(kv[0])))
    lines.append(f"clusters against the {c['baseline']} baseline: {c['k_rule']}")
    lines.append(f"silhouette / stability (mean adjusted Rand under resampling) per k: {scores}")
    lines.append(f"names: the top lifts (tags with >= {c['min_share']:.0%} of the cluster's tokens) that reach "
                 f"{c['min_lift']:g}x, at most two; 'mixed' when none does")
    lines.append(pd.DataFrame(c["summary"]).to_string(index=False))
    between = report.get("between_texts")
    if between:
        lines.append(f"against run {between['run']} (text {(between.get('text') or {}).get('source')}): adjusted Rand "
                     f"{between['adjusted_rand']:.2f} between the two clusterings at k = {between['k']} over "
                     f"{between['experts_compared']} experts; k chosen there on its own: {between['k_chosen_there']}")
    machine, seconds = report.get("machine") or {}, report.get("seconds") or {}
    lines.append(f"machine {machine.get('platform')} ({machine.get('cpu_count')} CPUs); tagging "
                 f"{seconds.get('tagging')} s, statistics {seconds.get('statistics')} s; seed {report.get('seed')}")
    lines += format_gold(report.get("gold"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.routing_report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="routing run id or folder (from `python -m tomoe_core trace`)")
    parser.add_argument("--alpha", type=float, default=0.01,
                        help="significance threshold of the permutation tests (default: %(default)s)")
    parser.add_argument("--permutations", type=int, default=None,
                        help="shuffles per layer for each baseline (default: the fewest that can reach --alpha, "
                             "1/alpha - 1; fewer cannot give p <= alpha)")
    parser.add_argument("--bootstrap", type=int, default=100,
                        help="block-bootstrap resamples for the NMI and contextual NMI intervals (default: %(default)s)")
    parser.add_argument("--min-tokens", type=int, default=50,
                        help="experts with fewer POS-tagged tokens are left out of the clustering (default: %(default)s)")
    parser.add_argument("--k", type=int, default=None,
                        help="number of clusters (default: the best silhouette among the k that are stable)")
    parser.add_argument("--baseline", choices=("layer", "token"), default="layer",
                        help="cluster expert profiles against the layer's POS mix, or against what the expert's "
                             "token types predict (contextual residuals) (default: %(default)s)")
    parser.add_argument("--against", default=None, metavar="RUN",
                        help="another run of the same conversion on another text: report the adjusted Rand index "
                             "between the two clusterings at the same k (stability between texts)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the permutations, bootstrap and KMeans (default: %(default)s)")
    parser.add_argument("--output", type=Path, default=None, help="JSON path (default: RUN_FOLDER/syntax-report.json)")
    args = parser.parse_args(argv)
    from tomoe_core.moe.atomic import atomic_write_json

    if not 0 < args.alpha < 1 or (args.permutations is not None and args.permutations < 1):
        print("error: --alpha must lie in (0, 1) and --permutations be at least 1", file=sys.stderr)
        return 2
    try:
        report = build_report(args.run, args.permutations, args.min_tokens, args.seed, alpha=args.alpha,
                              bootstrap=args.bootstrap, k=args.k, baseline=args.baseline, against=args.against)
    except (ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = args.output or Path(report["run_folder"]) / "syntax-report.json"
    atomic_write_json(out, report)
    print(format_report(report))
    print(f"report written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
