"""benchmarks.quality with the per-token baselines, on a tiny model: their kinds, the oracle as a ceiling,
CATS skipped where its gate alone exceeds the budget, held-out active ratios, --reuse --no-conversions
keeping an earlier run's conversion rows, and last-word accuracy added to reused rows that can be rebuilt."""
import json
import re

from benchmarks import quality
from test_lastword import docs
from tiny_models import tiny_ids, tiny_model, tiny_tokenizer
from tomoe_core.eval.lastword import candidate_items


def test_quality_runs_the_per_token_baselines_and_keeps_earlier_conversion_rows(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(quality, "load_dense",
                        lambda name, device="cpu", log=print: (tiny_model("llama"), tiny_tokenizer(adds_bos=True)))
    monkeypatch.setattr(quality, "load_items", lambda source, split, count: candidate_items(docs())[:count])
    # held-out and calibration windows are different token streams, as the two text splits are
    monkeypatch.setattr(quality, "text_windows", lambda tok, text, split, tag, length, count: tiny_ids(
        batch=count, length=length, seed=11 if split == "heldout" else 12))
    out = tmp_path / "quality.json"
    common = ["--windows", "2", "--window", "24", "--calibration-tokens", "512", "--dynamic-calibration-tokens", "1024",
              "--budgets", "0.3", "0.6", "--output", str(out)]
    assert quality.main([*common, "--no-conversions", "--methods", "magnitude", "--last-word-items", "0"]) == 0
    first = json.loads(out.read_text())
    assert first["settings"]["last_word"] is None and "last_word_accuracy" not in first["rows"][0]
    conversion_row = {**first["rows"][0], "method": "tomoe", "kind": "tomoe", "conversion": "gone",
                      "label": "ToMoE (gone)", "conversion_digest": "abc", "perplexity": 1.5}  # a conversion this checkout lacks
    first["rows"].append(conversion_row)
    out.write_text(json.dumps(first))

    assert quality.main([*common, "--reuse", "--no-conversions", "--methods", "magnitude,teal,cats,oracle",
                         "--last-word-items", "3"]) == 0
    result = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert "cats cannot reach p = 0.3" in printed
    assert "p=0.3 ToMoE (gone): cannot be rebuilt here, left without last-word accuracy" in printed
    assert re.search(r"dense perplexity [\d.]+, last-word accuracy [\d.]+ \(3 items\)", printed)
    rows = {(r["budget"], r["method"]): r for r in result["rows"]}
    assert set(rows) == {(0.3, "magnitude"), (0.6, "magnitude"), (0.3, "tomoe"), (0.3, "teal"), (0.6, "teal"),
                         (0.3, "oracle"), (0.6, "oracle"), (0.6, "cats")}
    assert rows[(0.3, "tomoe")] == conversion_row  # its conversion is not here: left without the new metric
    reused = rows[(0.3, "magnitude")]  # rebuilt for the metric only: its perplexity is the earlier one
    assert {k: v for k, v in reused.items() if not k.startswith("last_word")} == first["rows"][0]
    assert result["settings"]["last_word"]["items"] == 3 and result["dense"]["last_word_items"] == 3
    assert result["dense"]["perplexity"] == first["dense"]["perplexity"]
    for key, row in rows.items():
        if key != (0.3, "tomoe"):
            assert row["last_word_items"] == 3 and 0 <= row["last_word_accuracy"] <= 1, key
            assert row["last_word_loglikelihood"] < 0, key
    for budget in (0.3, 0.6):
        assert rows[(budget, "teal")]["kind"] == "dynamic, training-free"
        assert rows[(budget, "oracle")]["kind"] == "ceiling" and "ceiling" in rows[(budget, "oracle")]["label"]
        teal = rows[(budget, "teal")]
        assert abs(teal["calibration_active_ratio"] - budget) < 2e-3 and teal["calibration_tokens"] == 1024
        assert abs(teal["active_mlp_ratio"] - budget) < 0.1  # measured on the held-out windows
        assert teal["active_mlp_ratio"] != teal["calibration_active_ratio"]
        assert rows[(budget, "oracle")]["kl_to_dense"] < teal["kl_to_dense"]
    assert rows[(0.6, "cats")]["kind"] == "dynamic, training-free"
    assert result["settings"]["complete"]

    fig = quality.quality_figure(result)
    oracle = [t for t in fig.data if t.legendgroup == "oracle"]
    assert len(oracle) == 2 and oracle[0].line.dash == "dot" and "ceiling" in oracle[0].name
    assert {t.legendgroup for t in fig.data} >= {"teal", "cats", "magnitude"}
