"""Quality at equal measured speed (analysis.equal_speed) and its section on the Budget explorer."""
from __future__ import annotations

import math

import pandas as pd
import pytest

from analysis import equal_speed as es


def _speed_rows() -> pd.DataFrame:
    rows = [{"method": "dense", "layout": None, "budget": 1.0, "tps": 100.0, "ratio": 1.0, "pre": 1.0}]
    for b, tps, pre in ((0.3, 150.0, 1.4), (0.5, 140.0, 1.2), (0.7, 115.0, 1.1)):
        rows.append({"method": "tomoe", "layout": "indexed", "budget": b, "tps": tps, "ratio": tps / 100, "pre": pre})
        rows.append({"method": "tomoe", "layout": "packed", "budget": b, "tps": tps + 5, "ratio": tps / 100 + .05, "pre": pre})
    for b, tps in ((0.3, 160.0), (0.5, 130.0), (0.7, 110.0)):
        rows.append({"method": "teal", "layout": None, "budget": b, "tps": tps, "ratio": tps / 100, "pre": 1.0})
    for b, tps in ((0.5, 190.0), (0.7, 150.0)):
        rows.append({"method": "wanda-sp", "layout": None, "budget": b, "tps": tps, "ratio": tps / 100, "pre": tps / 100})
    out = []
    for r in rows:
        for batch in (1, 8):
            out.append({"method": r["method"], "layout": r["layout"], "threads": 1, "batch": batch, "budget": r["budget"],
                        "decode_tokens_per_s": r["tps"], "decode_speedup": r["ratio"],
                        "decode_speedup_iqr": [r["ratio"] - 0.02, r["ratio"] + 0.02],
                        "prefill_tokens_per_s": 500 * r["pre"] if batch == 1 else None,
                        "prefill_speedup": r["pre"] if batch == 1 else None,
                        "prefill_speedup_iqr": [r["pre"], r["pre"]] if batch == 1 else None,
                        "peak_memory_mb": 1000.0 * (r["budget"] if r["method"] == "wanda-sp" else 1.0)})
    return pd.DataFrame(out)


QUALITY = pd.DataFrame([{"method": m, "budget": b, "perplexity": p} for m, pts in {
    "tomoe": ((0.3, 100.0), (0.5, 60.0), (0.7, 40.0)),
    "teal": ((0.3, 400.0), (0.5, 36.0), (0.7, 26.0)),
    "wanda-sp": ((0.5, 140.0), (0.7, 50.0))}.items() for b, p in pts])


def test_table_joins_speed_and_quality_per_scenario_and_layout():
    table = es.equal_speed_table(_speed_rows(), QUALITY, "decode, batch 1", 1, "indexed", dense_perplexity=25.0)
    assert set(table["method"]) == {"dense", "tomoe", "teal", "wanda-sp"}
    tomoe = table[table["method"] == "tomoe"].set_index("budget")
    assert tomoe.loc[0.5, "speedup"] == pytest.approx(1.4) and tomoe.loc[0.5, "perplexity"] == 60.0  # indexed, not packed
    wanda = table[table["method"] == "wanda-sp"].set_index("budget")
    assert wanda.loc[0.5, "peak_memory_mb"] == 500.0  # every method's peak memory rides along (the chart's hover)
    fig = es.equal_speed_figure(table, "decode, batch 1")
    shown = {row[2] for t in fig.data if t.customdata is not None for row in t.customdata}
    assert "<br>peak memory 500 MiB" in shown and "<br>peak memory 1,000 MiB" in shown
    prefill = es.equal_speed_table(_speed_rows(), QUALITY, "prompt (prefill)", 1, "indexed", 25.0)
    assert (prefill.loc[prefill["method"] == "teal", "speedup"] == 1.0).all()  # TEAL's prompt pass is dense


def test_interpolation_stays_inside_the_measured_speeds():
    teal = es.equal_speed_table(_speed_rows(), QUALITY, "decode, batch 1", 1, "indexed", 25.0).query("method == 'teal'")
    ppl, budget = es.perplexity_at_speed(teal, 1.2)  # between p = 0.5 (1.3x, 36) and 0.7 (1.1x, 26)
    assert 26.0 < ppl < 36.0 and 0.5 < budget < 0.7
    assert math.isclose(ppl, math.sqrt(36.0 * 26.0), rel_tol=1e-6)  # halfway, log-linear
    assert es.perplexity_at_speed(teal, 2.0) is None  # faster than any TEAL budget: no extrapolation


def test_sentence_names_the_best_method_at_tomoes_speed_and_pareto_front():
    table = es.equal_speed_table(_speed_rows(), QUALITY, "decode, batch 1", 1, "indexed", 25.0)
    sentence = es.equal_speed_sentence(table, 0.5, "decode, batch 1")
    assert sentence.startswith("At decode, batch 1, ToMoE at p = 0.5 runs at 1.40x dense speed with perplexity 60.0.")
    assert "TEAL-style" in sentence and "Wanda-sp" in sentence
    # 1.4x: TEAL between p = 0.3 (1.6x, 400) and 0.5 (1.3x, 36), a third of the way: 36 x (400/36)^(1/3) = 80.3
    assert "TEAL-style 80.3 (p ~ 0.43)" in sentence and "ToMoE is the best measured method at this speed" in sentence
    assert "Wanda-sp (always faster: at least 1.50x) not comparable" in sentence
    at_07 = es.equal_speed_sentence(table, 0.7, "decode, batch 1")  # 1.15x: TEAL 26 x (36/26)^(1/4) = 28.2 < 40
    assert "TEAL-style 28.2" in at_07 and "TEAL-style is better at equal speed" in at_07
    assert es.winners(table) == {0.3: "wanda-sp", 0.5: "tomoe", 0.7: "teal"}  # 1.5x: Wanda-sp p = 0.7, 50 < 100
    front = table[es.pareto_front(table)]
    assert ("dense", 1.0) in set(zip(front["method"], front["budget"]))  # the best perplexity is on the front
    assert ("tomoe", 0.3) not in set(zip(front["method"], front["budget"]))  # Wanda-sp p = 0.5 is faster and better
    prefill = es.equal_speed_table(_speed_rows(), QUALITY, "prompt (prefill)", 1, "indexed", 25.0)
    said = es.equal_speed_sentence(prefill, 0.5, "prompt (prefill)")
    assert "No other method's measured budgets reach that speed" in said and "TEAL-style (never this fast" in said
    fig = es.equal_speed_figure(table, "decode, batch 1", 0.5)
    assert {t.name for t in fig.data} >= {"ToMoE", "TEAL-style", "Wanda-sp", "dense", "Pareto front"}


@pytest.mark.parametrize("scenario", list(es.SCENARIOS))
def test_budget_explorer_shows_the_equal_speed_chart_and_sentence_for_every_scenario(cache_env, scenario):
    from streamlit.testing.v1 import AppTest
    from pathlib import Path

    at = AppTest.from_file(str(Path(__file__).parents[1] / "app" / "main.py"), default_timeout=120).run()
    assert not at.exception
    at.radio(key="equal_speed_scenario").set_value(scenario).run()
    assert not at.exception
    assert "Quality at equal speed" in at.subheader.values
    assert any("Quality at equal measured speed" in c.proto.spec for c in at.get("plotly_chart"))
    assert any(m.startswith(f"At {scenario}, ToMoE at p = 0.5") for m in at.markdown.values)


def test_a_tomoe_point_whose_iqr_includes_dense_speed_is_called_no_faster_than_dense():
    rows = _speed_rows()
    rows.loc[(rows["method"] == "tomoe") & (rows["budget"] == 0.7), "decode_speedup_iqr"] = pd.Series(
        [[0.97, 1.2]] * int(((rows["method"] == "tomoe") & (rows["budget"] == 0.7)).sum()),
        index=rows.index[(rows["method"] == "tomoe") & (rows["budget"] == 0.7)])
    table = es.equal_speed_table(rows, QUALITY, "decode, batch 1", 1, "indexed", 25.0)
    assert "not measurably faster than the dense model" in es.equal_speed_sentence(table, 0.7, "decode, batch 1")
    assert es.winners(table)[0.7] == "dense"
