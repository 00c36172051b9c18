"""Expert roles by intervention for one ablated routing run: `python -m analysis.causal_report RUN`.

Needs `python -m tomoe_core ablate RUN` first (and the run's POS tags: `python -m analysis.routing_report
RUN`). Prints, as Markdown tables, per layer the loss increase when an expert is removed (its tokens
to their second choice, and to a random other expert as the control) and the costliest expert; the
experts clustered by POS profile as on the Experts page, with each named cluster's causal verdict
under both replacements; and, when the same text was traced at other budgets of the conversion, the
routing agreement and role persistence per budget. The JSON goes to <run folder>/causal-report.json.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd


def build_report(run, min_tokens: int = 50, seed: int = 0, k: int | None = None) -> dict:
    from tomoe_core.trace import queries
    from tomoe_core.trace.ablation import has_ablation, read_ablation_meta
    from tomoe_core.trace.routing_log import read_run_meta, run_dir

    from . import causal
    from .routing_report import _clusters

    t0 = time.perf_counter()
    meta = read_ablation_meta(run)
    layers = causal.layer_table(run)
    clusters = _clusters(run, queries.token_labels(run), min_tokens, seed, k, "layer")
    members = clusters.experts[["layer", "expert", "cluster_name"]]
    def verdicts_of(effect: str, replacements) -> dict:  # "replacement, metric" -> records
        return {f"{r}, {metric}": causal.cluster_verdicts(run, members, replacement=r, metric=metric, seed=seed,
                                                          effect=effect).to_dict("records")
                for r in replacements for metric in causal.METRICS}

    verdicts = verdicts_of("total", meta["replacements"])
    summary = clusters.summary()
    siblings = causal.budget_siblings(run_dir(run))
    agreement = causal.budget_agreement(siblings) if len(siblings) > 1 else None
    direct = None
    if has_ablation(run, "direct"):  # the fast estimate beside the exact one, and how well it tracks it
        d_meta = read_ablation_meta(run, "direct")
        direct = {"ablation": d_meta, "layers": causal.layer_table(run, "direct").to_dict("records"),
                  "verdicts": verdicts_of("direct", d_meta["replacements"]),
                  "agreement": {r: causal.effect_agreement(run, r) for r in d_meta["replacements"]
                                if r in meta["replacements"]}}
    return {
        "run": read_run_meta(run)["run_id"], "run_folder": str(run_dir(run)), "ablation": meta,
        "layers": layers.to_dict("records"),
        "clusters": {"k": clusters.k, "rule": clusters.k_rule, "summary": summary.to_dict("records")},
        "verdicts": verdicts,
        "budgets": None if agreement is None else {
            "logs": {str(b): Path(p).name for b, p in siblings.items()},
            "per_layer": agreement.to_dict("records")},
        "direct": direct,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def _markdown(df: pd.DataFrame, floats: str = "{:.3f}") -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in df.to_dict("records"):  # per-column types: ints stay ints
        lines.append("| " + " | ".join(floats.format(v) if isinstance(v, float) else str(v) for v in row.values()) + " |")
    return "\n".join(lines)


def format_report(report: dict) -> str:
    meta = report["ablation"]
    out = [f"run {report['run']}: {meta['tokens']} tokens x {len(meta['layers'])} layers x {len(meta['experts'])} "
           f"experts, replacements {', '.join(meta['replacements'])}; ablation {meta['seconds'] / 60:.1f} min; the "
           f"model reproduced {meta['log_agreement']:.2%} of the log's expert choices",
           "", "Loss increase (nats) on the removed expert's own tokens, KL on them, and on the other tokens:", "",
           _markdown(pd.DataFrame(report["layers"])), "",
           f"Clusters (k = {report['clusters']['k']}: {report['clusters']['rule']}):", "",
           _markdown(pd.DataFrame(report["clusters"]["summary"]).drop(columns=["cluster"], errors="ignore")), ""]
    for replacement, rows in report["verdicts"].items():
        out += [f"Verdicts, {replacement} (replacement, measure; all tokens; named tags against the others):", ""]
        table = pd.DataFrame(rows)
        out += [_markdown(table.drop(columns=["sentence"])) if len(table) else "(no named cluster)", ""]
        out += [f"- {s}" for s in table.get("sentence", [])] + [""]
    direct = report.get("direct")
    if direct:
        d = direct["ablation"]
        out += [f"Direct effect (fast estimate: each token loses its own expert, attention frozen): {d['tokens']} tokens "
                f"x {len(d['layers'])} layers, {d['seconds'] / 60:.1f} min; per layer on the routed tokens:", "",
                _markdown(pd.DataFrame(direct["layers"]).drop(columns=["others_second"], errors="ignore")), ""]
        for r, a in direct["agreement"].items():
            out += [f"Direct against total ({r}, {a['tokens']:,} shared tokens): Pearson r {a['r_tokens']:.3f} over "
                    f"tokens (KL {a['r_kl_tokens']:.3f}), {a['r_expert_means']:.3f} over (layer, expert) means, same sign "
                    f"for {a['same_sign_expert_means']:.0%} of them; by layer " + ", ".join(
                        f"{l}: {v:.2f}" for l, v in sorted(a["r_by_layer"].items(), key=lambda kv: int(kv[0]))), ""]
        for key, rows in direct["verdicts"].items():
            out += [f"Direct-effect verdicts, {key}:", ""] + [f"- {r['sentence']}" for r in rows] + [""]
    if report["budgets"]:
        per = pd.DataFrame(report["budgets"]["per_layer"])
        out += [f"Across budgets (logs {report['budgets']['logs']}), medians over layers (min-max):", ""]
        rows = []
        for b, g in per.groupby("budget"):
            rows.append({"budget": b, "reference": g.reference.iloc[0],
                         **{c: f"{g[c].median():.3f} ({g[c].min():.3f}-{g[c].max():.3f})"
                            for c in ("ari", "nmi", "same_expert", "profile_cosine")}})
        out += [_markdown(pd.DataFrame(rows)), ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.causal_report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="routing run id or folder, ablated with `python -m tomoe_core ablate RUN`")
    parser.add_argument("--min-tokens", type=int, default=50,
                        help="experts with fewer POS-tagged tokens are left out of the clustering (default: %(default)s)")
    parser.add_argument("--k", type=int, default=None, help="number of clusters (default: as the Experts page)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap and KMeans (default: %(default)s)")
    parser.add_argument("--output", type=Path, default=None, help="JSON path (default: RUN_FOLDER/causal-report.json)")
    args = parser.parse_args(argv)
    from tomoe_core.moe.atomic import atomic_write_json

    try:
        report = build_report(args.run, args.min_tokens, args.seed, args.k)
    except (ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = args.output or Path(report["run_folder"]) / "causal-report.json"
    atomic_write_json(out, report)
    print(format_report(report))
    print(f"report written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
