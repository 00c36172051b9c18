"""Quality benchmark: dense, every ToMoE conversion and every baseline at budgets 0.3..0.9, same held-out text.

    python -m benchmarks.quality                        # SmolLM2-135M, 8 windows x 512 tokens, 0.3..0.9
    python -m benchmarks.quality --windows 16 --budgets 0.5 --methods flap,torch-pruning

Every variant at a budget is evaluated on the same non-overlapping held-out windows (the wiki
split no conversion or baseline calibrates on) against the dense model's logits of that window:
perplexity, KL(dense || variant) per token and top-1 agreement with dense. Baselines (see
`tomoe_core.eval.baselines`): magnitude, wanda-sp, flap (static masks, calibrated on the wiki
calibration split), torch-pruning (external reference), and per token: teal and cats (TEAL- and
CATS-style thresholds calibrated on the first --dynamic-calibration-tokens of the calibration
split; the active ratio reported is the one measured on the held-out windows) and the oracle
(per-token top-k channels, a ceiling no method reaches). None is fine-tuned. Conversions:
every folder under cache/conversions made from the same model, at its own budget (which is
added to the budget list), with learned routing and, as an ablation, a random expert per token.
A budget-conditioned conversion (`convert --budget-range LO HI`) is materialised at every budget
of the list inside its range ("tomoe-conditioned", with the materialisation time), and
--fallback-from NAME re-thresholds that single-budget conversion to every other budget of the
list ("tomoe-threshold-moved": the no-retraining fallback).
The JSON is rewritten after every budget, so a partial run leaves valid partial results;
--reuse keeps the rows of an earlier run on the same windows and evaluates only what is new
(a new conversion, a new budget or method); with --no-conversions it also keeps the earlier
run's conversion rows as they are.

Beside perplexity every row (and dense) has its last-word accuracy (`tomoe_core.eval.lastword`: a
LAMBADA-style task from the same held-out split, scored as lm-eval scores a loglikelihood task) on
the same --last-word-items items (default 200; 0 skips it). Reused rows without it (or measured on
other items) get it computed, only it, when their variant can be rebuilt here (every baseline; a
conversion row when its folder is in cache/conversions with the same digest); others are left
without it.

Output: cache/results/quality_benchmark.json and quality_benchmark.html (plotly, self-contained).
JSON schema (schema_version 1):
  kind            "quality-benchmark"
  schema_version  1
  model, text     dense model name; evaluation text ("wiki (held-out split)")
  window, windows tokens per window, number of windows; tokens: predicted tokens per variant
  machine         tomoe_core.infra.machine.machine_info(); seconds: wall time; command: how it was run
  settings        {budgets, methods, calibration_text, calibration_tokens, complete: bool,
                   last_word: {items, text, version, seed, min_letters, min_sentence_words,
                   max_context_words} (the item rule, tomoe_core.eval.lastword.rule()) or null}
  dense           {perplexity, kl_to_dense (0), top1_agreement (1), last_word_*}
  rows            one per (budget, variant):
                  {budget: nominal p, method: "tomoe" | "tomoe-conditioned" | "tomoe-threshold-moved" |
                   "tomoe-random-routing" | "magnitude" | "wanda-sp" | "flap" | "torch-pruning" |
                   "teal" | "cats" | "oracle",
                   kind: "tomoe" | "fallback" | "ablation" | "baseline" | "external-baseline" |
                   "dynamic, training-free" (teal, cats) | "ceiling" (oracle),
                   budget_source: "trained" | "conditioned" | "threshold-moved" (ToMoE rows),
                   materialise_seconds (conditioned / threshold-moved rows),
                   anchor_gap, generated_at (conditioned rows: masks generated at max(lo, p - gap), widened to p),
                   label: display name, conversion: folder name or null, conversion_digest: str or null,
                   active_mlp_ratio: measured (ToMoE: widest expert per layer; static baselines: kept
                   fraction; per-token baselines: mean MLP weights used per token on the held-out windows),
                   calibration_active_ratio, calibration_tokens (teal, cats: measured on their calibration text),
                   perplexity, kl_to_dense, top1_agreement, seconds,
                   last_word_accuracy: fraction of the items whose every target token is the greedy choice
                   (lm-eval's acc), last_word_items: items scored, last_word_loglikelihood: mean target
                   log-likelihood (nats), last_word_seconds (rows lacking them could not be rebuilt)}
  comparison      one per (budget, conversion): {budget, conversion, tomoe_perplexity, best_baseline,
                   best_baseline_perplexity, perplexity_ratio (best baseline / ToMoE, > 1: ToMoE wins),
                   tomoe_kl, best_baseline_kl, tomoe_wins, per_method: {method: baseline ppl / ToMoE ppl}}
  conditioned_vs_dedicated  one per (budget, conditioned conversion, dedicated conversion at that budget):
                  {budget, conditioned, dedicated, conditioned_perplexity, dedicated_perplexity,
                   conditioned_kl, dedicated_kl, perplexity_gap (conditioned / dedicated - 1)}
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from tomoe_core.eval.baselines import (ALL_METHODS, DYNAMIC_CALIBRATION_TOKENS, DYNAMIC_METHODS, EXTERNAL_METHODS,
    activation_stats, baseline_variants, min_budget)
from tomoe_core.convert.accounting import account
from tomoe_core.convert.folder import Conversion, list_conversions
from tomoe_core.convert.materialise import conversion_digest, load_converted
from tomoe_core.moe.modeling import read_metadata
from tomoe_core.infra.locations import cache_dir
from tomoe_core.text.sources import text_windows
from tomoe_core.eval.metrics import LogitsFn, evaluate_variants, logits_fn
from tomoe_core.moe.atomic import atomic_write_bytes, atomic_write_json
from tomoe_core.infra.workspace import safe_name
from tomoe_core.eval.lastword import DEFAULT_ITEMS, encode_items, load_items, score_last_words
from tomoe_core.eval.lastword import rule as last_word_rule
from tomoe_core.infra.machine import machine_info
from tomoe_core.convert.masked_model import MaskedModel
from tomoe_core.convert.dense import load_dense
from tomoe_core.workflows.rebudget import budget_source, materialise_at
from tomoe_core.convert.generation_budget import calibrated_gap
from tomoe_core.convert.folder import conversions_dir

DEFAULT_BUDGETS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
# kind of each baseline row; the studio groups its chart by kind
BASELINE_KINDS = {**{m: "external-baseline" for m in EXTERNAL_METHODS}, "teal": "dynamic, training-free",
                  "teal-half-dense": "dynamic, training-free", "cats": "dynamic, training-free", "oracle": "ceiling"}
BASELINE_LABELS = {"teal": "TEAL-style (per-token input thresholds)", "cats": "CATS-style (per-token gate thresholds)",
                   "teal-half-dense": "TEAL-style, first half of each window dense (TEAL's protocol)",
                   "oracle": "oracle per-token top-k channels (ceiling)"}
SCHEMA_VERSION = 1


def find_conversions(model_name: str, root: Path | None = None) -> list[Path]:
    """The conversions of `model_name` under `root` (default cache/conversions), by name; folders that are
    not readable conversions are left out."""
    return [c.path for c in list_conversions(root or conversions_dir(), model_name, require_weights=False)[0]]


def compare(rows: list[dict]) -> list[dict]:
    """At each budget, every learned-routing conversion against the best baseline (by perplexity)."""
    out = []
    for row in (r for r in rows if r["kind"] == "tomoe"):
        base = [r for r in rows if r["budget"] == row["budget"] and r["kind"] in ("baseline", "external-baseline")]
        if not base:
            continue
        best = min(base, key=lambda r: r["perplexity"])
        out.append({"budget": row["budget"], "conversion": row["conversion"], "tomoe_perplexity": row["perplexity"],
                    "best_baseline": best["method"], "best_baseline_perplexity": best["perplexity"],
                    "perplexity_ratio": best["perplexity"] / row["perplexity"], "tomoe_kl": row["kl_to_dense"],
                    "best_baseline_kl": min(r["kl_to_dense"] for r in base),
                    "tomoe_wins": row["perplexity"] < best["perplexity"],
                    "per_method": {r["method"]: r["perplexity"] / row["perplexity"] for r in base}})
    return out


def conditioned_vs_dedicated(rows: list[dict]) -> list[dict]:
    """At every budget with both, each budget-conditioned conversion against each conversion trained for
    that budget alone (learned routing both): gap = conditioned / dedicated perplexity - 1."""
    out = []
    for cond in (r for r in rows if r["method"] == "tomoe-conditioned"):
        for ded in (r for r in rows if r["method"] == "tomoe" and abs(r["budget"] - cond["budget"]) < 1e-6):
            out.append({"budget": cond["budget"], "conditioned": cond["conversion"], "dedicated": ded["conversion"],
                        "conditioned_perplexity": cond["perplexity"], "dedicated_perplexity": ded["perplexity"],
                        "conditioned_kl": cond["kl_to_dense"], "dedicated_kl": ded["kl_to_dense"],
                        "perplexity_gap": cond["perplexity"] / ded["perplexity"] - 1})
    return out


LAST_WORD_FIELDS = ("last_word_accuracy", "last_word_items", "last_word_loglikelihood", "last_word_seconds")


def reusable_rows(path: Path, result: dict) -> dict[tuple, dict]:
    """Rows of an earlier result on the same model, text, windows and calibration, by (budget, method, digest).

    Their last-word fields are dropped when the earlier run scored other items (another count or rule)
    than this one (result["settings"]["last_word"]; None: this run scores none, earlier fields stay)."""
    if not path.exists():
        return {}
    try:
        old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    same = all(old.get(k) == result[k] for k in ("kind", "schema_version", "model", "text", "window", "windows", "tokens"))
    if not same or old.get("settings", {}).get("calibration_tokens") != result["settings"]["calibration_tokens"]:
        return {}
    rows = old.get("rows", [])
    wanted = result["settings"].get("last_word")
    if wanted is not None and old["settings"].get("last_word") != wanted:
        rows = [{k: v for k, v in r.items() if k not in LAST_WORD_FIELDS} for r in rows]
    return {(r["budget"], r["method"], r.get("conversion_digest")): r for r in rows}


def other_baseline_rows(reuse: dict[tuple, dict], budget: float, methods: list[str]) -> list[dict]:
    """Reused baseline rows at `budget` of methods this run does not evaluate: `--reuse --methods X`
    adds X to an earlier file and keeps what it already held."""
    return [r for (b, m, digest), r in reuse.items() if b == budget and digest is None and m not in methods]


def routed(moe, method: str) -> LogitsFn:
    """A conversion as ids -> logits: its learned routing, or (the ablation) a random expert per token,
    reseeded on every call so a variant sees the same draws however often it runs."""
    if method == "tomoe-random-routing":
        gen = torch.Generator()
        return logits_fn(moe, lambda: (gen.manual_seed(0), moe.set_routing("random", gen)))
    return logits_fn(moe, lambda: moe.set_routing(None))


@torch.no_grad()
def run(args, log=print) -> dict:
    t_start = time.time()
    dense, tokenizer = load_dense(args.model, device=args.device, log=log)
    tag = safe_name(Path(args.model).name)
    held = text_windows(tokenizer, args.text, "heldout", tag, args.window, args.windows)
    text_label = "wiki (held-out split)" if args.text == "wiki" else f"{Path(args.text).name} (your text)"
    masked = MaskedModel(dense, num_experts=1)
    methods = [m for m in args.methods if m]
    conversions = [] if args.no_conversions else find_conversions(args.model)
    conv_budgets, conditioned = {}, []
    for folder in conversions:
        meta = read_metadata(folder)
        if Conversion(folder, meta).is_conditioned:  # a rebudgeted copy has no hypernetwork
            conditioned.append(folder)
        elif meta.get("budget_source", "trained") == "trained":  # rebudgeted copies are rows of their own source
            conv_budgets.setdefault(round(float(meta["budget"]), 4), []).append(folder)
    fallback = [conversions_dir() / name for name in args.fallback_from]
    # read once (a clear error now rather than after an hour of evaluation)
    metas = {folder: read_metadata(folder) for folder in [*conditioned, *fallback]}
    budgets = sorted({round(b, 4) for b in args.budgets} | set(conv_budgets))
    result = {
        "kind": "quality-benchmark", "schema_version": SCHEMA_VERSION, "model": args.model,
        "text": text_label, "window": args.window, "windows": int(held.shape[0]),
        "tokens": int(held.shape[0] * (held.shape[1] - 1)), "machine": machine_info(args.device),
        "command": "python -m benchmarks.quality " + " ".join(shlex.quote(a) for a in args.argv),
        "settings": {"budgets": budgets, "methods": methods, "calibration_text": "wiki (calibration split)",
                     "calibration_tokens": args.calibration_tokens, "complete": False, "last_word": None},
        "dense": None, "rows": [], "comparison": [], "seconds": None,
    }
    last_word = None  # the last-word items as token ids, the same for every variant
    if args.last_word_items:
        items = load_items(args.text, "heldout", args.last_word_items)
        last_word = encode_items(tokenizer, items) if items else None
        if last_word:
            result["settings"]["last_word"] = {"items": len(last_word), "text": text_label, **last_word_rule()}
            log(f"[quality] last-word accuracy on {len(last_word)} items of {text_label}")
        else:
            log(f"[quality] {text_label} has no sentence ending in a long enough word: no last-word accuracy")
    reuse = reusable_rows(args.output, result) if args.reuse else {}
    if reuse:
        old = json.loads(args.output.read_text())
        result["dense"] = old["dense"]
        if last_word is None:  # nothing scored in this run: the earlier rows' items stand
            result["settings"]["last_word"] = old["settings"].get("last_word")
        elif old["settings"].get("last_word") != result["settings"]["last_word"]:
            result["dense"] = {k: v for k, v in old["dense"].items() if k not in LAST_WORD_FIELDS}
        log(f"[quality] reusing {len(reuse)} rows of {args.output}")
    pad_id = getattr(tokenizer, "pad_token_id", None) or 0

    def last_word_fields(fn: LogitsFn) -> dict:
        score = score_last_words(fn, last_word, device=args.device, pad_id=pad_id)
        return {**score.fields(), "last_word_seconds": round(score.seconds, 2)}

    def lacks_last_word(row: dict | None) -> bool:
        return last_word is not None and row is not None and row.get("last_word_items") != len(last_word)

    dense_fn = logits_fn(masked, lambda: masked.set_masks(None))
    dense_last_word = last_word_fields(dense_fn) if last_word is not None and (
        result["dense"] is None or lacks_last_word(result["dense"])) else {}
    if result["dense"] is not None:
        result["dense"].update(dense_last_word)
    calibration = {}  # activation statistics and the per-token baselines' windows, loaded when first needed
    dynamic_tokens = max(1, args.dynamic_calibration_tokens // 512) * 512

    def activation_statistics():
        if "stats" not in calibration:
            n = max(1, args.calibration_tokens // 512)
            calib = text_windows(tokenizer, "wiki", "calibration", tag, 512, n)
            log(f"[quality] activation statistics on {n * 512} calibration tokens")
            calibration["stats"] = activation_stats(masked, calib.to(args.device))
        return calibration["stats"]

    def dynamic_calibration():
        if "dynamic" not in calibration:
            calibration["dynamic"] = text_windows(tokenizer, "wiki", "calibration", tag, 512, dynamic_tokens // 512)
        return calibration["dynamic"]

    def baselines(methods: list[str], budget: float) -> dict:
        stats = activation_statistics() if any(m in ("wanda-sp", "flap") for m in methods) else None
        dynamic = dynamic_calibration() if any(m in ("teal", "cats", "teal-half-dense") for m in methods) else None
        return baseline_variants(masked, methods, budget, stats, held[:1, :64], calibration_ids=dynamic)

    def add_last_word(rows: list[dict], budget: float) -> None:
        """Last-word fields for reused rows that lack them, where their variant can be rebuilt."""
        for row in (r for r in rows if lacks_last_word(r)):
            method, name = row["method"], row.get("conversion")
            folder = conversions_dir() / name if name else None
            if name is None and method in ALL_METHODS and min_budget(masked, method) < budget:
                fn = baselines([method], budget)[method][0]
            elif (folder is not None and (folder / "tomoe.json").exists()
                  and conversion_digest(read_metadata(folder)) == row.get("conversion_digest")):
                if method in ("tomoe", "tomoe-random-routing"):
                    moe = load_converted(folder, device=args.device, layout="prefill", load_tokenizer=False)[0]
                else:  # conditioned or threshold-moved: materialised as the row was
                    moe = materialise_at(folder, budget, device=args.device, layout="memory", log=log,
                                         anchor_gap=row.get("anchor_gap", 0.0))[0]
                fn = routed(moe, method)
            else:
                log(f"[quality] p={budget:g} {row['label']}: cannot be rebuilt here, left without last-word accuracy")
                continue
            row.update(last_word_fields(fn))
            masked.set_masks(None)
            log(f"[quality] p={budget:g} {row['label']}: last-word accuracy {row['last_word_accuracy']:.3f} "
                f"(reused row, {row['last_word_seconds']:.0f} s)")

    for budget in budgets:
        t0 = time.time()
        variants, info = {}, {}
        if args.no_conversions:  # conversions are not evaluated in this run: their earlier rows stand
            result["rows"] += [r for (b, _m, digest), r in reuse.items() if b == budget and digest is not None]
        for folder in conv_budgets.get(budget, []):
            digest = conversion_digest(read_metadata(folder))
            if (budget, "tomoe", digest) in reuse and (budget, "tomoe-random-routing", digest) in reuse:
                result["rows"] += [reuse[(budget, "tomoe", digest)], reuse[(budget, "tomoe-random-routing", digest)]]
                continue
            moe, _, meta = load_converted(folder, device=args.device, layout="prefill", load_tokenizer=False)
            ratio = account(moe).mlp_active_ratio
            common = {"conversion": folder.name, "conversion_digest": conversion_digest(meta), "active_mlp_ratio": ratio}
            variants[f"tomoe:{folder.name}"] = routed(moe, "tomoe")
            info[f"tomoe:{folder.name}"] = {"method": "tomoe", "kind": "tomoe", "label": f"ToMoE ({folder.name})",
                                            "budget_source": "trained", **common}
            variants[f"random:{folder.name}"] = routed(moe, "tomoe-random-routing")
            info[f"random:{folder.name}"] = {"method": "tomoe-random-routing", "kind": "ablation",
                                             "label": f"ToMoE, random expert per token ({folder.name})", **common}
        derived = [(f, "tomoe-conditioned") for f in conditioned if budget_source(metas[f], budget) == "conditioned"]
        derived += [(f, "tomoe-threshold-moved") for f in fallback if abs(float(metas[f]["budget"]) - budget) > 1e-9]
        for folder, method in derived:
            digest = conversion_digest(metas[folder])
            old = reuse.get((budget, method, digest))
            gap = (args.anchor_gap if args.anchor_gap is not None
                   else calibrated_gap(metas[folder].get("anchor_gaps"), budget))
            if old is not None and (method != "tomoe-conditioned" or old.get("anchor_gap", 0.0) == gap):
                result["rows"].append(old)
                continue
            moe, meta, seconds = materialise_at(folder, budget, device=args.device, layout="memory", log=log,
                                                anchor_gap=gap)
            key = f"{method}:{folder.name}"
            variants[key] = routed(moe, method)
            source = meta["budget_source"]
            info[key] = {"method": method, "kind": "tomoe" if method == "tomoe-conditioned" else "fallback",
                         "label": f"ToMoE {source} ({folder.name})", "conversion": folder.name,
                         "conversion_digest": digest, "active_mlp_ratio": account(moe).mlp_active_ratio,
                         "budget_source": source, "materialise_seconds": round(seconds, 2)}
            if method == "tomoe-conditioned":
                info[key].update(anchor_gap=gap, generated_at=meta["mask_calibration"]["generated_at"])
        todo = [m for m in methods if (budget, m, None) not in reuse
                or reuse[(budget, m, None)].get("calibration_tokens", dynamic_tokens) != dynamic_tokens]
        result["rows"] += [reuse[(budget, m, None)] for m in methods if m not in todo]
        result["rows"] += other_baseline_rows(reuse, budget, methods)  # --reuse adds to a file, never drops
        for m in [m for m in todo if min_budget(masked, m) >= budget]:
            log(f"[quality] {m} cannot reach p = {budget:g} (it always computes {min_budget(masked, m):.3f} of the "
                f"MLP weights): no row")
            todo.remove(m)
        for method, (fn, ratio) in baselines(todo, budget).items():
            variants[method] = fn
            info[method] = {"method": method, "kind": BASELINE_KINDS.get(method, "baseline"),
                            "label": BASELINE_LABELS.get(method, method), "conversion": None,
                            "conversion_digest": None, "active_mlp_ratio": ratio}
            if method in DYNAMIC_METHODS and method != "oracle":
                info[method].update(calibration_active_ratio=ratio,
                                    calibration_tokens=int(dynamic_calibration().numel()))
        add_last_word([r for r in result["rows"] if r["budget"] == budget], budget)  # all reused so far
        if variants:
            res = evaluate_variants(dense_fn, variants, held, device=args.device)
            masked.set_masks(None)
            log(f"[quality] dense perplexity {res['dense'].perplexity:.4f} on these windows")
            if result["dense"] is None:
                d = res["dense"]
                result["dense"] = {"perplexity": d.perplexity, "kl_to_dense": d.kl_to_dense,
                                   "top1_agreement": d.top1_agreement, **dense_last_word}
            for name, r in res.items():
                if name == "dense":
                    continue
                if name in DYNAMIC_METHODS:  # what the held-out tokens used, not the calibration's (nor the items')
                    info[name]["active_mlp_ratio"] = variants[name].active_ratio
                row = {"budget": budget, **info[name], "perplexity": r.perplexity, "kl_to_dense": r.kl_to_dense,
                       "top1_agreement": r.top1_agreement, "seconds": round(r.seconds, 2)}
                if last_word is not None:
                    row.update(last_word_fields(variants[name]))
                    masked.set_masks(None)
                result["rows"].append(row)
        result["comparison"] = compare(result["rows"])
        result["conditioned_vs_dedicated"] = conditioned_vs_dedicated(result["rows"])
        result["seconds"] = round(time.time() - t_start, 1)
        save(result, args.output)
        log(f"[quality] budget {budget}: {len(variants)} variants in {time.time() - t0:.0f} s")
        del variants
    result["settings"]["complete"] = True
    save(result, args.output)
    return result


def save(result: dict, output: Path) -> None:
    atomic_write_json(output, result)
    atomic_write_bytes(output.with_suffix(".html"),
                       quality_figure(result).to_html(include_plotlyjs=True, full_html=True).encode("utf-8"))


# -- presentation ----------------------------------------------------------------------------------------
METHOD_STYLE = {
    "tomoe": dict(color="#4338ca", symbol="circle", size=13),
    "tomoe-conditioned": dict(color="#7c3aed", symbol="star", size=11),
    "tomoe-threshold-moved": dict(color="#c4b5fd", symbol="circle-dot", size=9),
    "tomoe-random-routing": dict(color="#a5b4fc", symbol="circle-open", size=11),
    "magnitude": dict(color="#d97706", symbol="square", size=8),
    "wanda-sp": dict(color="#059669", symbol="diamond", size=8),
    "flap": dict(color="#dc2626", symbol="triangle-up", size=9),
    "torch-pruning": dict(color="#6b7280", symbol="x", size=8),
    "teal": dict(color="#0891b2", symbol="hexagon", size=9),
    "cats": dict(color="#db2777", symbol="pentagon", size=9),
    "oracle": dict(color="#111827", symbol="line-ew", size=10),
}


def quality_figure(result: dict) -> go.Figure:
    """Perplexity (log) and KL to dense against the active MLP ratio: one line per method."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("Perplexity (log scale)", "KL(dense || variant) per token"))
    methods = list(dict.fromkeys(r["method"] for r in result["rows"]))
    for method in methods:
        rows = sorted((r for r in result["rows"] if r["method"] == method), key=lambda r: r["active_mlp_ratio"])
        style = METHOD_STYLE.get(method, dict(color="#111827", symbol="circle", size=8))
        mode = "markers" if method in ("tomoe", "tomoe-random-routing") else "lines+markers"
        label = {"tomoe": "ToMoE (learned routing)", "tomoe-random-routing": "ToMoE, random routing (ablation)",
                 "tomoe-conditioned": "ToMoE, one budget-conditioned conversion",
                 "tomoe-threshold-moved": "ToMoE, threshold moved (no retraining)",
                 "torch-pruning": "torch-pruning (external, group magnitude)", **BASELINE_LABELS}.get(method, method)
        hover = [f"{r['label']}<br>budget {r['budget']:g}, active MLP {r['active_mlp_ratio']:.3f}<br>"
                 f"ppl {r['perplexity']:.2f}, KL {r['kl_to_dense']:.3f}, top-1 agr {r['top1_agreement']:.3f}"
                 + (f", last-word acc {r['last_word_accuracy']:.3f}" if "last_word_accuracy" in r else "")
                 for r in rows]
        for col, key in ((1, "perplexity"), (2, "kl_to_dense")):
            fig.add_trace(go.Scatter(x=[r["active_mlp_ratio"] for r in rows], y=[r[key] for r in rows], mode=mode,
                                     name=label, legendgroup=method, showlegend=col == 1, hovertext=hover,
                                     hoverinfo="text", marker=dict(color=style["color"], symbol=style["symbol"],
                                                                   size=style["size"]),
                                     line=dict(color=style["color"], dash="dot" if method == "oracle" else None)),
                          row=1, col=col)
    if result.get("dense"):
        fig.add_hline(y=result["dense"]["perplexity"], line_dash="dash", line_color="#1f2937",
                      annotation_text=f"dense {result['dense']['perplexity']:.2f}", row=1, col=1)
    fig.update_yaxes(type="log", row=1, col=1)
    fig.update_xaxes(title_text="active MLP parameters per token (fraction of dense)")
    fig.update_layout(title=f"{result['model']}: quality at equal active MLP budget "
                            f"({result['text']}, {result['windows']} x {result['window']} tokens)",
                      template="plotly_white", height=520, legend=dict(orientation="h", y=-0.2))
    return fig


def _last_word(row: dict) -> str:
    return f"{row['last_word_accuracy']:.3f}" if "last_word_accuracy" in row else "-"


def format_table(result: dict) -> str:
    methods = list(dict.fromkeys(r["method"] for r in result["rows"]))
    dense = result["dense"]
    items = (result["settings"].get("last_word") or {}).get("items")
    lines = [f"model {result['model']}, text {result['text']}, {result['windows']} windows x {result['window']} "
             f"tokens, machine {result['machine']['platform']} ({result['machine']['cpu_count']} CPUs)",
             f"dense perplexity {dense['perplexity']:.2f}, last-word accuracy {_last_word(dense)}"
             + (f" ({items} items)" if items else ""),
             "perplexity (KL to dense) [active MLP ratio] last-word accuracy ('-': not measured)",
             f"{'budget':>6}  " + "".join(f"{m[:30]:>32}" for m in methods)]
    for budget in result["settings"]["budgets"]:
        cells = []
        for m in methods:
            rs = [r for r in result["rows"] if r["budget"] == budget and r["method"] == m]
            cells.append(" / ".join(f"{r['perplexity']:.1f} ({r['kl_to_dense']:.2f}) [{r['active_mlp_ratio']:.2f}] "
                                    f"{_last_word(r)}" for r in rs) or "-")
        lines.append(f"{budget:>6g}  " + "".join(f"{c:>32}" for c in cells))
    for c in result.get("comparison", []):
        verdict = "ToMoE wins" if c["tomoe_wins"] else "ToMoE loses"
        lines.append(f"p={c['budget']:g} {c['conversion']}: {verdict}: ToMoE ppl {c['tomoe_perplexity']:.2f} vs best "
                     f"baseline {c['best_baseline']} {c['best_baseline_perplexity']:.2f} "
                     f"(x{c['perplexity_ratio']:.2f}); KL {c['tomoe_kl']:.3f} vs {c['best_baseline_kl']:.3f}")
    for c in result.get("conditioned_vs_dedicated", []):
        lines.append(f"p={c['budget']:g} conditioned {c['conditioned']} {c['conditioned_perplexity']:.2f} vs dedicated "
                     f"{c['dedicated']} {c['dedicated_perplexity']:.2f}: {c['perplexity_gap']:+.1%}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--budgets", type=float, nargs="+", default=list(DEFAULT_BUDGETS))
    p.add_argument("--methods", default=",".join(ALL_METHODS),
                   help="comma-separated baselines (default: %(default)s); 'none' for conversions only")
    p.add_argument("--text", default="wiki",
                   help="evaluation text: 'wiki' (its held-out split) or your .txt file or folder of .txt files "
                        "(all of it; calibration stays on the wiki calibration split) (default: %(default)s)")
    p.add_argument("--windows", type=int, default=8, help="held-out windows (default: %(default)s)")
    p.add_argument("--window", type=int, default=512, help="tokens per window (default: %(default)s)")
    p.add_argument("--calibration-tokens", type=int, default=16384)
    p.add_argument("--dynamic-calibration-tokens", type=int, default=DYNAMIC_CALIBRATION_TOKENS,
                   help="calibration tokens of the per-token thresholds (teal, cats; one batched pass per budget; "
                        "default: %(default)s)")
    p.add_argument("--no-conversions", action="store_true", help="baselines only")
    p.add_argument("--last-word-items", type=int, default=DEFAULT_ITEMS,
                   help="last-word accuracy on this many items of the held-out split (LAMBADA-style, "
                        "tomoe_core.eval.lastword; 0: skip; default: %(default)s)")
    p.add_argument("--fallback-from", nargs="*", default=[], metavar="NAME",
                   help="single-budget conversions (folder names in cache/conversions) to re-threshold to every "
                        "other budget: the no-retraining fallback")
    p.add_argument("--anchor-gap", type=float, default=None,
                   help="a conditioned conversion generates its masks this far below each budget, then widens "
                        "them to it (0: at the budget itself; default: the gaps its anchor calibration recorded, "
                        "else 0)")
    p.add_argument("--reuse", action="store_true",
                   help="keep rows of an earlier result on the same windows; evaluate only new variants")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--output", type=Path, default=cache_dir() / "results" / "quality_benchmark.json")
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = build_parser()
    args = p.parse_args(argv)
    args.argv = argv
    args.methods = [] if args.methods == "none" else [m.strip() for m in args.methods.split(",")]
    unknown = [m for m in args.methods if m not in ALL_METHODS]
    if unknown:
        p.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(ALL_METHODS)}")
    if any(not 0 < b <= 1 for b in args.budgets):
        p.error("budgets are fractions in (0, 1]")
    if args.last_word_items < 0:
        p.error("--last-word-items is a count of items (0 skips the metric)")
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args)
    print(format_table(result))
    print(f"result written to {args.output} and {args.output.with_suffix('.html')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
