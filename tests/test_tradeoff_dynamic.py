"""The studio's Pareto chart with the per-token baselines of the quality benchmark: their own kind and
series, and the oracle as a labelled ceiling left off the Pareto front; the budget explorer explains them."""
import json
from pathlib import Path

import pytest

import studio_fixture
from analysis import speed_cards, tradeoff, tradeoff_figure


def benchmark_result() -> dict:
    rows = []
    for budget in (0.5, 0.7):
        for method, kind, ppl in (("tomoe", "tomoe", 60 - 30 * budget), ("wanda-sp", "baseline", 200 - 200 * budget),
                                  ("teal", "dynamic, training-free", 50 - 30 * budget),
                                  ("cats", "dynamic, training-free", 300 - 350 * budget),
                                  ("oracle", "ceiling", 26 - budget)):
            rows.append({"budget": budget, "method": method, "kind": kind, "label": method,
                         "conversion": "conv" if kind == "tomoe" else None, "conversion_digest": None,
                         "active_mlp_ratio": budget + (0.004 if method == "teal" else 0.0), "perplexity": ppl,
                         "kl_to_dense": ppl / 100, "top1_agreement": 0.5})
    return {"kind": "quality-benchmark", "schema_version": 1, "model": "m", "text": "t", "window": 8, "windows": 2,
            "tokens": 14, "dense": {"perplexity": 24.9, "kl_to_dense": 0.0, "top1_agreement": 1.0}, "rows": rows}


def test_pareto_chart_shows_dynamic_baselines_and_the_oracle_as_a_ceiling():
    cost = tradeoff.CostModel(model="m", attention=100, mlp_dense=1000, lm_head=50, other=5, embeddings=70,
                              score_flops=0, context=512)
    points = tradeoff.quality_points({"q.json": benchmark_result()}, {"m": cost})
    kinds = dict(zip(points["variant"], points["kind"]))
    assert kinds["teal"] == kinds["cats"] == "dynamic, training-free" and kinds["oracle"] == "ceiling"
    teal = points[points["variant"] == "teal"].sort_values("budget")
    assert teal["active_params"].tolist() == [cost.active_params(0.504), cost.active_params(0.704)]
    # the best static baseline of the cards stays a static one
    assert tradeoff.quality_at_budget(points, points["eval_set"][0], 0.5).best_baseline["method"] == "wanda-sp"

    fig = tradeoff_figure.pareto_figure(points, budget=0.5, cost=cost)
    names = [t.name for t in fig.data]
    assert "TEAL-style (training-free, per token)" in names and "CATS-style (training-free, per token)" in names
    ceiling = next(t for t in fig.data if t.name == "Oracle per-token top-k (ceiling)")
    assert ceiling.line.dash == "dash" and len(ceiling.x) == 2
    assert any(a.text == "ceiling" for a in fig.layout.annotations)
    front = next(t for t in fig.data if t.name.startswith("Pareto front"))
    dense = 24.9  # the chart plots perplexity relative to dense
    oracle_y = {round(p / dense, 9) for p in points.loc[points["variant"] == "oracle", "perplexity"]}
    front_y = {round(y, 9) for y in front.y}
    assert not oracle_y & front_y  # unreachable: it must not define the front
    assert {round(p / dense, 9) for p in points.loc[points["variant"] == "teal", "perplexity"]} <= front_y  # TEAL does


def test_budget_explorer_explains_the_per_token_points(tmp_path, monkeypatch):
    """The page draws the benchmark's per-token rows and says what they are and why the oracle is a ceiling."""
    pytest.importorskip("streamlit")
    from streamlit.testing.v1 import AppTest

    cache = tmp_path / "cache"
    studio_fixture.build(cache, with_routing=False)
    path = cache / "results" / "quality_benchmark.json"
    result = json.loads(path.read_text())
    for budget, teal, oracle in ((0.5, 37.0, 26.0), (0.7, 26.2, 25.0)):
        result["rows"] += [{"budget": budget, "method": method, "kind": kind, "label": method, "conversion": None,
                            "conversion_digest": None, "active_mlp_ratio": budget, "perplexity": ppl,
                            "kl_to_dense": 0.1, "top1_agreement": 0.9}
                           for method, kind, ppl in (("teal", "dynamic, training-free", teal),
                                                     ("oracle", "ceiling", oracle))]
    path.write_text(json.dumps(result))
    monkeypatch.setenv("TOMOE_CACHE", str(cache))
    empty = tmp_path / "shipped"
    empty.mkdir()
    monkeypatch.setenv("TOMOE_SHIPPED", str(empty))
    at = AppTest.from_file(str(Path(__file__).resolve().parent.parent / "app" / "main.py"), default_timeout=120).run()
    assert not at.exception, [e.message for e in at.exception]
    assert at.title.values[0] == "Budget explorer"
    assert any("dashed ceiling is the per-token oracle" in c.value for c in at.caption)
    figure = json.loads(at.get("plotly_chart")[0].proto.spec)
    names = [t.get("name", "") for t in figure["data"]]
    assert "TEAL-style (training-free, per token)" in names
    assert "Oracle per-token top-k (ceiling)" in names


def test_per_token_baselines_of_an_evaluate_file_are_not_static_pruning():
    assert [tradeoff.variant_kind(v) for v in ("teal", "cats", "oracle", "wanda-sp", "tomoe-random", "dense")] == \
        ["dynamic, training-free", "dynamic, training-free", "ceiling", "baseline", "ablation", "dense"]


def test_the_structural_speed_comparison_reads_the_teal_speed_file():
    assert speed_cards.structural_speed_summary({}) is None
    rows = [{"workload": w, "variant": v, "vs_dense": x} for w, v, x in (
        ("decode, batch 8", "ToMoE", 0.52), ("decode, batch 8", "TEAL-style", 0.77), ("prefill", "ToMoE", 0.86),
        ("prefill", "TEAL-style", 2.06))]
    text = speed_cards.structural_speed_summary({"shipped/teal_speed.json": {"kind": "teal-speed", "budget": 0.5,
                                                                          "threads": 1, "rows": rows}})
    assert "decode, batch 8: ToMoE 0.52x, TEAL-style 0.77x" in text and "prefill: ToMoE 0.86x, TEAL-style 2.06x" in text
