"""The trade-off analysis behind the studio's budget explorer (`analysis.tradeoff`): the cost model from a
conversion's accounting, quality at a budget (measured, interpolated, nearest; conditioned curves never
mixed), the Pareto front and figure. Tests on the fixture cache use `cache_env` (conftest.py).
"""
from __future__ import annotations

import pandas as pd
import pytest

from analysis import catalog, tradeoff, tradeoff_figure


def test_quality_benchmark_and_evaluations_are_separate_evaluation_sets(cache_env):
    cat = catalog.read_catalog()
    points = tradeoff.quality_points(cat.results, tradeoff.cost_models(cat.conversions, cat.results))
    sets = tradeoff.eval_sets(points)
    assert len(sets) == 2 and "4 x 256" in sets[0]  # the benchmark has the most points
    bench = points[points["eval_set"] == sets[0]]
    assert set(bench["variant"]) == {"dense", "tomoe", "magnitude", "wanda-sp", "flap", "teal"}
    assert tradeoff.quality_at_budget(points, sets[0], 0.3).perplexity == 60.0


ACC = {"embeddings": 1000, "lm_head": 1000, "attention": 300, "mlp_dense": 800, "mlp_active": 400,
       "mlp_active_mean": 400, "other": 20, "mlp_active_ratio": 0.5, "active_total": 1720, "dense_total": 2120,
       "active_ratio_vs_dense": 1720 / 2120, "flops_per_token": 2 * 1700 + 64, "context": 512}


def test_cost_model_reproduces_the_conversion_accounting():
    cost = tradeoff.CostModel.from_accounting("m", ACC)
    assert cost.active_params(0.5) == ACC["active_total"]
    assert cost.dense_params == ACC["dense_total"]
    assert cost.flops_per_token(0.5) == ACC["flops_per_token"]
    assert cost.flops_per_token(1.0) - cost.flops_per_token(0.5) == 2 * 400


def test_cost_per_million_tokens_and_a_free_machine():
    assert tradeoff.cost_per_million_tokens(1000, 3.6) == pytest.approx(1.0)
    assert tradeoff.cost_per_million_tokens(1000, 0.0) == 0.0
    assert tradeoff.cost_per_million_tokens(None, 1.0) is None and tradeoff.cost_per_million_tokens(0.0, 1.0) is None


def _points(budgets_ppl):
    rows = [{"eval_set": "s", "kind": "dense", "variant": "dense", "budget": 1.0, "perplexity": 10.0,
             "kl_to_dense": 0.0, "top1_agreement": 1.0, "conversion": None}]
    rows += [{"eval_set": "s", "kind": "tomoe", "variant": "tomoe", "budget": b, "perplexity": p,
              "kl_to_dense": 1.0, "top1_agreement": 0.5, "conversion": f"c{b}"} for b, p in budgets_ppl]
    return pd.DataFrame(rows)


def test_quality_at_budget_measured_interpolated_nearest():
    pts = _points([(0.4, 40.0), (0.6, 10.0 * 4 ** 0.0 + 10.0)])
    assert tradeoff.quality_at_budget(pts, "s", 0.4).exact
    mid = tradeoff.quality_at_budget(pts, "s", 0.5)
    assert not mid.exact and "interpolated" in mid.label
    assert mid.perplexity == pytest.approx((40.0 * 20.0) ** 0.5)  # log-linear midpoint
    far = tradeoff.quality_at_budget(pts, "s", 0.9)
    assert "nearest" in far.label and far.perplexity == 20.0


def test_slider_reads_the_conditioned_curve_when_one_exists():
    pts = _points([(0.5, 30.0)])
    cond = [{"eval_set": "s", "kind": "tomoe", "variant": "tomoe-conditioned", "budget": b, "perplexity": p,
             "kl_to_dense": 1.0, "top1_agreement": 0.5, "conversion": "cond", "active_params": 100 * b, "source": "q.json"}
            for b, p in ((0.4, 50.0), (0.5, 35.0), (0.6, 25.0))]
    moved = [{"eval_set": "s", "kind": "fallback", "variant": "tomoe-threshold-moved", "budget": 0.4,
              "perplexity": 90.0, "kl_to_dense": 2.0, "top1_agreement": 0.3, "conversion": "c0.5",
              "active_params": 40.0, "source": "q.json"}]
    pts = pd.concat([pts.assign(active_params=[100.0, 50.0], source="q.json"), pd.DataFrame(cond + moved)],
                    ignore_index=True)
    at = tradeoff.quality_at_budget(pts, "s", 0.5)  # the dedicated 30.0 is better, but the slider is conditioned
    assert at.exact and at.perplexity == 35.0 and "conditioned" in at.label
    between = tradeoff.quality_at_budget(pts, "s", 0.45)
    assert "conditioned" in between.label and 35.0 < between.perplexity < 50.0
    fig = tradeoff_figure.pareto_figure(pts, "s")
    names = {t.name for t in fig.data}
    assert {"ToMoE (one conversion, any budget)", "ToMoE, threshold moved (no retraining)"} <= names
    front = tradeoff_figure.pareto_front(pts[~pts["kind"].isin(("ablation", "fallback"))])
    assert 90.0 not in front["perplexity"].tolist()


def test_cards_quote_only_conversions_the_user_has():
    rows = [{"eval_set": "s", "kind": "tomoe", "variant": "tomoe-conditioned", "budget": b, "perplexity": p,
             "kl_to_dense": 1.0, "top1_agreement": 0.5, "conversion": "elsewhere", "active_params": 100 * b}
            for b, p in ((0.4, 40.0), (0.5, 33.0), (0.6, 26.0))]
    pts = pd.concat([_points([(0.5, 60.0)]), pd.DataFrame(rows)], ignore_index=True)
    assert tradeoff.quality_at_budget(pts, "s", 0.5).perplexity == 33.0  # without a catalog: every measurement
    mine = tradeoff.quality_at_budget(pts, "s", 0.5, available={"c0.5"})
    assert mine.perplexity == 60.0 and "c0.5" in mine.label and "elsewhere" not in mine.label
    assert tradeoff.quality_at_budget(pts, "s", 0.4, available={"c0.5"}).status == "nearest"
    none = tradeoff.quality_at_budget(pts, "s", 0.5, available=set())
    assert none.perplexity is None and "conversion you have" in none.label


def test_two_conditioned_conversions_are_never_mixed():
    rows = [{"eval_set": "s", "kind": "tomoe", "variant": "tomoe-conditioned", "budget": b, "perplexity": p,
             "kl_to_dense": 1.0, "top1_agreement": 0.5, "conversion": name, "active_params": 100 * b, "source": "q.json"}
            for name, curve in (("uniform", ((0.4, 50.0), (0.5, 30.0), (0.6, 25.0))),
                                ("log", ((0.4, 40.0), (0.5, 33.0), (0.6, 26.0))))
            for b, p in curve]
    pts = pd.DataFrame(rows)
    assert list(tradeoff.conditioned_curves(pts)) == ["log", "uniform"]  # lower mean log-perplexity first
    at = tradeoff.quality_at_budget(pts, "s", 0.5)  # uniform's 30.0 is lower here, but the slider reads one curve
    assert at.perplexity == 33.0 and "log" in at.label
    between = tradeoff.quality_at_budget(pts, "s", 0.45)
    assert "(log)" in between.label and 33.0 < between.perplexity < 40.0
    assert tradeoff.quality_at_budget(pts, "s", 0.5, conversion="uniform").perplexity == 30.0  # the user's pick
    # a curve measured only where the others are not is ranked on the budgets all share, and the slider
    # reads a curve whose span covers the budget
    extra = pd.DataFrame([{**rows[0], "conversion": "high", "budget": b, "perplexity": p, "active_params": 100 * b}
                          for b, p in ((0.6, 20.0), (0.7, 15.0), (0.8, 12.0), (0.9, 11.0))])
    both = pd.concat([pts, extra], ignore_index=True)
    assert list(tradeoff.conditioned_curves(both))[0] == "high"  # 4 budgets measured
    assert "(log)" in tradeoff.quality_at_budget(both, "s", 0.45).label  # "high" starts at 0.6
    names = [t.name for t in tradeoff_figure.pareto_figure(pts, "s").data]
    assert "ToMoE (one conversion, any budget)" in names and "ToMoE, other budget-conditioned conversions" in names
    main = next(t for t in tradeoff_figure.pareto_figure(pts, "s").data if t.name == "ToMoE (one conversion, any budget)")
    assert "log" in main.hovertext[0]  # the best curve is the one drawn in full


def test_rebudgeted_copies_join_their_source_curve():
    res = {"kind": "quality", "model": "m", "conversion": "/c/cond-at-p0.37", "budget": 0.37, "window": 64,
           "windows": 2, "text": "t", "budget_source": "conditioned", "derived_from": "/c/cond",
           "results": {"dense": {"perplexity": 10.0, "kl_to_dense": 0.0, "top1_agreement": 1.0},
                       "tomoe": {"perplexity": 40.0, "kl_to_dense": 1.0, "top1_agreement": 0.5}}}
    pts = tradeoff.quality_points({"e.json": res}, {})
    row = pts[pts["variant"] == "tomoe-conditioned"].iloc[0]
    assert row["conversion"] == "cond"


def test_pareto_front_drops_dominated_points():
    df = pd.DataFrame({"active_params": [1, 2, 3, 4], "perplexity": [50, 20, 30, 10]})
    assert tradeoff_figure.pareto_front(df)["perplexity"].tolist() == [50, 20, 10]


def test_pareto_figure_has_dense_tomoe_and_baselines(cache_env):
    cat = catalog.read_catalog()
    costs = tradeoff.cost_models(cat.conversions, cat.results)
    points = tradeoff.quality_points(cat.results, costs)
    assert len(costs) == 1  # conversion and results name the same dense model
    fig = tradeoff_figure.pareto_figure(points, tradeoff.eval_sets(points)[0], 0.5, next(iter(costs.values())))
    names = {t.name for t in fig.data}
    assert {"Dense", "ToMoE (one conversion per budget)", "Wanda-sp (static pruning)", "FLAP (static pruning)"} <= names
    assert "Magnitude (static pruning)" not in names  # 50x dense everywhere: off by default
    shown = tradeoff_figure.pareto_figure(points, tradeoff.eval_sets(points)[0], 0.5, next(iter(costs.values())),
                                   show_catastrophic=True)
    assert "Magnitude (static pruning)" in {t.name for t in shown.data}


def test_the_explanation_the_budget_explorer_shows_repeats_no_phrase_within_a_sentence():
    """The page shows this docstring ("Measured points and how the numbers are computed"); a sentence
    once said "outside the measured range, the nearest measurement" twice over."""
    import re

    from analysis import tradeoff

    text = " ".join(tradeoff.__doc__.split())
    for sentence in re.split(r"(?<=\.) ", text):
        words = re.findall(r"[a-z]{3,}", sentence.lower())  # formulas' one-letter terms left out
        grams = [tuple(words[i:i + 5]) for i in range(len(words) - 4)]
        assert len(grams) == len(set(grams)), sentence
