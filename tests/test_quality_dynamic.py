"""benchmarks.quality with the per-token baselines, on a tiny model: their kinds, the oracle as a ceiling,
CATS skipped where its gate alone exceeds the budget, held-out active ratios, and --reuse --no-conversions
keeping an earlier run's conversion rows."""
import json

from benchmarks import quality
from tiny_models import tiny_ids, tiny_model


def test_quality_runs_the_per_token_baselines_and_keeps_earlier_conversion_rows(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(quality, "load_dense", lambda name, device="cpu", log=print: (tiny_model("llama"), None))
    # held-out and calibration windows are different token streams, as the two text splits are
    monkeypatch.setattr(quality, "text_windows", lambda tok, text, split, tag, length, count: tiny_ids(
        batch=count, length=length, seed=11 if split == "heldout" else 12))
    out = tmp_path / "quality.json"
    common = ["--windows", "2", "--window", "24", "--calibration-tokens", "512", "--dynamic-calibration-tokens", "1024",
              "--budgets", "0.3", "0.6", "--output", str(out)]
    assert quality.main([*common, "--no-conversions", "--methods", "magnitude"]) == 0
    first = json.loads(out.read_text())
    conversion_row = {**first["rows"][0], "method": "tomoe", "kind": "tomoe", "conversion": "gone",
                      "conversion_digest": "abc", "perplexity": 1.5}  # a conversion this checkout lacks
    first["rows"].append(conversion_row)
    out.write_text(json.dumps(first))

    assert quality.main([*common, "--reuse", "--no-conversions", "--methods", "magnitude,teal,cats,oracle"]) == 0
    result = json.loads(out.read_text())
    assert "cats cannot reach p = 0.3" in capsys.readouterr().out
    rows = {(r["budget"], r["method"]): r for r in result["rows"]}
    assert set(rows) == {(0.3, "magnitude"), (0.6, "magnitude"), (0.3, "tomoe"), (0.3, "teal"), (0.6, "teal"),
                         (0.3, "oracle"), (0.6, "oracle"), (0.6, "cats")}
    assert rows[(0.3, "tomoe")] == conversion_row and rows[(0.3, "magnitude")] == first["rows"][0]
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
