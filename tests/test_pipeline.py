"""End to end on a tiny model saved as a local checkpoint: convert -> evaluate -> rebudget."""
import json

import pytest

from tiny_models import tiny_model
from tomoe_core import load_converted
from tomoe_core.budget import account
from tomoe_core.cli import main
from tomoe_core.models import load_tokenizer
from tomoe_core.pipeline import DEFAULT_ANCHOR_GAP, anchor_budget, materialise_at, rebudget, run_conversion, run_evaluation
from tomoe_core.train import ConversionConfig

WORDS = ("the river city museum quickly painted seven old bridges near a quiet harbour while students "
         "argued about history and music in small cafes during long winter evenings").split()


@pytest.fixture()
def tiny_setup(tmp_path, monkeypatch):
    monkeypatch.setenv("TOMOE_CACHE", str(tmp_path / "cache"))
    dense = tmp_path / "dense"
    tiny_model("llama", vocab_size=49152).save_pretrained(dense)
    load_tokenizer().save_pretrained(dense)
    text = tmp_path / "text.txt"
    paragraphs = [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(120)) + "." for i in range(40)]
    text.write_text("\n\n".join(paragraphs))
    return dense, text, tmp_path


def test_convert_evaluate_rebudget(tiny_setup, capsys):
    dense, text, tmp = tiny_setup
    cfg = ConversionConfig(model=str(dense), text=str(text), steps=3, tokens_per_step=128, seq_len=64,
                           init_tokens=512, budget=0.5, num_experts=4, checkpoint_every=2)
    out = run_conversion(cfg, tmp / "conv", show_tqdm=False, log=lambda *a: None, command="test")
    for name in ("tomoe.json", "model.safetensors", "hypernet.safetensors", "training_log.jsonl", "config.json"):
        assert (out / name).exists(), name
    meta = json.loads((out / "tomoe.json").read_text())
    assert meta["tokens_seen"] == 3 * 128 and meta["command"] == "test"
    assert abs(meta["accounting"]["mlp_active_ratio"] - 0.5) <= 0.02
    # 3 steps barely move the experts off their (default +-1) cluster prior at p = 0.5
    moved = [layer["moved_from_prior"] for layer in meta["layers"]]
    assert meta["moved_from_prior"] == pytest.approx(sum(moved) / len(moved), abs=1e-4)
    assert 0 <= min(moved) and meta["moved_from_prior"] < 0.1

    result = run_evaluation(out, text=str(text), window=64, max_windows=2, baselines=("magnitude", "wanda-sp"),
                            log=lambda *a: None)
    names = set(result["results"])
    assert {"dense", "tomoe", "tomoe-random", "magnitude", "wanda-sp"} <= names
    assert any(n.startswith("tomoe-fixed-") for n in names)
    assert result["window"] == 64 and result["windows"] == 2 and result["machine"]["cpu_count"]

    # the command line shows a progress bar over the windows and writes the same result
    assert main(["evaluate", str(out), "--text", str(text), "--window", "64", "--max-windows", "2",
                 "--baselines", "none", "--no-routing-modes", "--output", str(tmp / "eval.json")]) == 0
    err = capsys.readouterr().err
    assert "evaluate: 100%" in err and "2/2" in err
    cli_result = json.loads((tmp / "eval.json").read_text())
    assert cli_result["results"]["tomoe"]["perplexity"] == pytest.approx(result["results"]["tomoe"]["perplexity"])

    lower = rebudget(out, 0.3, log=lambda *a: None)
    model, _tok, lower_meta = load_converted(lower)
    assert lower_meta["budget_source"] == "threshold-moved" and lower_meta["trained_budget"] == 0.5
    assert abs(account(model).mlp_active_ratio - 0.3) <= 0.02
    # no expert is wider than 0.3 now, so at least ~0.2 of each expert's entries left the p = 0.5 prior
    assert lower_meta["moved_from_prior"] > 0.15


def test_budget_conditioned_conversion_materialises_at_every_budget(tiny_setup):
    dense, text, tmp = tiny_setup
    cfg = ConversionConfig(model=str(dense), text=str(text), steps=4, tokens_per_step=128, seq_len=64,
                           init_tokens=512, budget=0.5, budget_range=(0.3, 1.0), num_experts=4)
    out = run_conversion(cfg, tmp / "cond", show_tqdm=False, log=lambda *a: None, command="test")
    meta = json.loads((out / "tomoe.json").read_text())
    assert meta["budget_source"] == "conditioned" and meta["budget_range"] == [0.3, 1.0]
    log = [json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines()]
    targets = [row["target"] for row in log]
    assert len(set(targets)) == 4 and all(0.3 <= t <= 1.0 for t in targets)  # every step its own budget
    widths = []
    for budget in (0.3, 0.6, 0.9):
        model, info, seconds = materialise_at(out, budget, log=lambda *a: None)
        assert info["budget_source"] == "conditioned" and seconds > 0
        assert abs(account(model).mlp_active_ratio - budget) <= 0.02
        widths.append(info["mask_calibration"]["ratio"])
    assert widths == sorted(widths)
    # masks are generated `anchor_gap` below the budget (never below the range) and widened to it
    _model, info, _ = materialise_at(out, 0.6, log=lambda *a: None)
    assert info["mask_calibration"]["generated_at"] == pytest.approx(0.6 - DEFAULT_ANCHOR_GAP)
    model, info, _ = materialise_at(out, 0.6, log=lambda *a: None, anchor_gap=0.1)
    assert info["mask_calibration"]["generated_at"] == pytest.approx(0.5)
    assert abs(account(model).mlp_active_ratio - 0.6) <= 0.02
    _model, info, _ = materialise_at(out, 0.32, log=lambda *a: None, anchor_gap=0.1)
    assert info["mask_calibration"]["generated_at"] == pytest.approx(0.3)
    assert anchor_budget(None, 0.6) is None
    with pytest.raises(ValueError, match="anchor gap must be >= 0"):
        anchor_budget((0.3, 1.0), 0.6, -0.1)
    # outside the trained range the threshold moves, and says so
    _model, info, _ = materialise_at(out, 0.2, log=lambda *a: None)
    assert info["budget_source"] == "threshold-moved"
    # a single-budget conversion's hypernetwork must not be asked for conditioning it never had
    with pytest.raises(ValueError, match="budget range"):
        ConversionConfig(budget=0.2, budget_range=(0.3, 1.0))
