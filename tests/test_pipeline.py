"""End to end on a tiny model saved as a local checkpoint: convert -> evaluate -> rebudget."""
import json

import pytest
from tiny_models import tiny_model

from tomoe_core import load_converted
from tomoe_core.cli import main
from tomoe_core.convert.accounting import account
from tomoe_core.convert.config import ConversionConfig
from tomoe_core.convert.dense import load_tokenizer
from tomoe_core.convert.folder import Conversion, default_conversion_name
from tomoe_core.convert.generation_budget import (
    DEFAULT_ANCHOR_GAP,
    anchor_budget,
    calibrated_gap,
    clamp_budget,
    train_budget,
)
from tomoe_core.moe.metadata import ConvertedModelError
from tomoe_core.workflows import anchors, shipping
from tomoe_core.workflows.conversion_run import run_conversion
from tomoe_core.workflows.evaluation import run_evaluation
from tomoe_core.workflows.rebudget import materialise_at, rebudget

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
                           init_tokens=512, budget=0.5, num_experts=4, checkpoint_every=2, train_gap=0.0)
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


def test_budget_conditioned_conversion_materialises_at_every_budget(tiny_setup, monkeypatch):
    dense, text, tmp = tiny_setup
    # the tiny text's held-out split has a few windows, not the 60 reserved for reporting on real text
    monkeypatch.setattr(anchors, "ANCHOR_SKIP_WINDOWS", 0)
    cfg = ConversionConfig(model=str(dense), text=str(text), steps=4, tokens_per_step=128, seq_len=64,
                           init_tokens=512, budget=0.5, budget_range=(0.3, 1.0), num_experts=4)
    lines = []
    out = run_conversion(cfg, tmp / "cond", show_tqdm=False, log=lines.append, command="test")
    meta = json.loads((out / "tomoe.json").read_text())
    assert meta["budget_source"] == "conditioned" and meta["budget_range"] == [0.3, 1.0]
    # the finished conversion calibrated its anchor: one gap per budget of the range, measured on
    # validation windows, and its own saved experts use the gap chosen for p = 0.5
    gaps = meta["anchor_gaps"]
    assert set(gaps) == {"0.3", "0.4", "0.5", "0.6", "0.7", "0.8", "0.9"} and set(gaps.values()) <= {0.0, 0.1, 0.2}
    rows = meta["anchor_calibration"]["rows"]
    assert len(rows) == 7 * 3 - 2 - 1  # at 0.3 every gap generates at the floor, at 0.4 gaps 0.1 and 0.2 do
    assert meta["anchor_calibration"]["windows"] >= 1 and meta["anchor_calibration"]["window"] == 128
    best = min((r for r in rows if r["budget"] == 0.5), key=lambda r: r["kl_to_dense"])
    assert gaps["0.5"] == best["gap"] and all(r["kl_to_dense"] > 0 for r in rows)
    assert meta["mask_calibration"]["generated_at"] == pytest.approx(max(0.3, 0.5 - gaps["0.5"]))
    assert any("anchor gaps" in str(line) for line in lines)
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
    _model, info, _ = materialise_at(out, 0.6, log=lambda *a: None)  # the calibrated gap
    assert info["mask_calibration"]["generated_at"] == pytest.approx(0.6 - gaps["0.6"])
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


def test_calibrated_gap_takes_the_nearest_calibrated_budget():
    gaps = {"0.4": 0.0, "0.6": 0.1, "0.8": 0.2}
    assert calibrated_gap(None, 0.7) == DEFAULT_ANCHOR_GAP == 0.0
    assert calibrated_gap(gaps, 0.62) == 0.1 and calibrated_gap(gaps, 0.95) == 0.2
    assert calibrated_gap(gaps, 0.5) == 0.0  # a tie goes to the lower budget: the smaller widening
    assert calibrated_gap(gaps, 0.7) == 0.1 and calibrated_gap({"0.6": 0.1, "0.7": 0.2}, 0.65) == 0.1  # float-safe
    assert anchor_budget((0.3, 1.0), 0.9, anchor_gaps=gaps) == pytest.approx(0.7)
    assert anchor_budget((0.3, 1.0), 0.9, 0.0, anchor_gaps=gaps) == pytest.approx(0.9)  # an explicit gap wins


def test_generation_budget_clamps_into_the_range_and_trains_single_budgets_below():
    assert clamp_budget(0.2, (0.3, 1.0)) == 0.3 and clamp_budget(0.5, (0.3, 0.4)) == 0.4
    assert clamp_budget(0.2, None) == 0.2
    assert train_budget(0.5, 0.1) == pytest.approx(0.4) == ConversionConfig(budget=0.5, train_gap=0.1).train_budget


def test_calibrate_anchor_cli_records_the_gaps_or_only_prints_them(tiny_setup, capsys):
    dense, text, tmp = tiny_setup
    cfg = ConversionConfig(model=str(dense), text=str(text), steps=2, tokens_per_step=128, seq_len=64,
                           init_tokens=512, budget=0.5, budget_range=(0.3, 1.0), num_experts=4)
    out = run_conversion(cfg, tmp / "cond", show_tqdm=False, log=lambda *a: None, anchor_windows=0)
    assert "anchor_gaps" not in json.loads((out / "tomoe.json").read_text())  # 0 windows: not calibrated
    args = ["calibrate-anchor", str(out), "--budgets", "0.4", "0.7", "--gaps", "0", "0.1", "0.3",
            "--windows", "2", "--window", "32", "--skip-windows", "1"]
    assert main([*args, "--dry-run"]) == 0
    printed = capsys.readouterr()
    assert printed.out.count("p=0.4 ") == 2 and printed.out.count("p=0.7 ") == 3 and "dry run" in printed.out
    assert "calibrate" in printed.err  # the progress bar
    assert "anchor_gaps" not in json.loads((out / "tomoe.json").read_text())
    assert main(args) == 0
    meta = json.loads((out / "tomoe.json").read_text())
    assert set(meta["anchor_gaps"]) == {"0.4", "0.7"} and meta["anchor_calibration"]["skip_windows"] == 1
    _model, info, _ = materialise_at(out, 0.65, log=lambda *a: None)
    assert info["mask_calibration"]["generated_at"] == pytest.approx(0.65 - meta["anchor_gaps"]["0.7"])
    # recalibrating one budget keeps the others; materialisation follows whatever tomoe.json records
    assert main(["calibrate-anchor", str(out), "--budgets", "0.4", "--gaps", "0", "--windows", "1", "--window", "32",
                 "--skip-windows", "1"]) == 0
    meta = json.loads((out / "tomoe.json").read_text())
    assert meta["anchor_gaps"]["0.4"] == 0 and set(meta["anchor_gaps"]) == {"0.4", "0.7"}
    assert {r["budget"] for r in meta["anchor_calibration"]["rows"]} == {0.4, 0.7}
    (out / "tomoe.json").write_text(json.dumps({**meta, "anchor_gaps": {"0.6": 0.2}}))
    _model, info, _ = materialise_at(out, 0.6, log=lambda *a: None)
    assert info["mask_calibration"]["generated_at"] == pytest.approx(0.4)
    assert main(["calibrate-anchor", str(out), "--budgets", "0.2"]) == 2  # outside the range 0.3..1
    assert "none of the budgets" in capsys.readouterr().err
    # a single-budget conversion has nothing to anchor
    single = run_conversion(ConversionConfig(model=str(dense), text=str(text), steps=1, tokens_per_step=128,
                                             seq_len=64, init_tokens=512, num_experts=2),
                            tmp / "single", show_tqdm=False, log=lambda *a: None)
    assert main(["calibrate-anchor", str(single)]) == 2
    assert "not budget-conditioned" in capsys.readouterr().err


def test_train_gap_trains_below_the_budget_and_widens_to_it(tiny_setup):
    dense, text, tmp = tiny_setup
    cfg = ConversionConfig(model=str(dense), text=str(text), steps=2, tokens_per_step=128, seq_len=64,
                           init_tokens=512, budget=0.5, train_gap=0.2, num_experts=4)
    assert default_conversion_name(cfg).endswith("-p0.5-from0.3-e4")
    default = ConversionConfig(budget=0.5)  # trains 0.1 below a budget of 0.5 or more unless told otherwise
    assert default.train_gap == pytest.approx(0.1) and default_conversion_name(default).endswith("-p0.5-e8")
    assert ConversionConfig(budget=0.4).train_gap == 0.0 and ConversionConfig(budget=0.9).train_gap == 0.1
    assert ConversionConfig(budget=0.5, train_gap=0).train_budget == 0.5
    out = run_conversion(cfg, tmp / "gap", show_tqdm=False, log=lambda *a: None)
    meta = json.loads((out / "tomoe.json").read_text())
    log = [json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines()]
    assert [row["target"] for row in log] == pytest.approx([0.3, 0.3])  # every step trains for 0.5 - 0.2
    assert meta["train_budget"] == pytest.approx(0.3) and meta["budget"] == 0.5
    assert abs(meta["accounting"]["mlp_active_ratio"] - 0.5) <= 0.02  # saved widened to the budget
    assert meta["mask_calibration"]["raw_ratio"] < 0.45 and meta["mask_calibration"]["shift"] > 0
    for bad in ({"train_gap": 0.5}, {"train_gap": -0.1}, {"train_gap": 0.1, "budget_range": (0.3, 1.0)}):
        with pytest.raises(ValueError, match="train_gap"):
            ConversionConfig(**{"budget": 0.5, **bad})


def test_a_single_budget_checkpoint_from_before_train_gap_says_how_to_resume(tiny_setup):
    from tomoe_core.convert.train import CheckpointError

    dense, text, tmp = tiny_setup
    kwargs = dict(model=str(dense), text=str(text), steps=2, tokens_per_step=128, seq_len=64, init_tokens=512,
                  num_experts=2, checkpoint_every=1)
    old = ConversionConfig(**kwargs, train_gap=0.0)
    run_conversion(old, tmp / "old", show_tqdm=False, log=lambda *a: None)
    state = tmp / "old.work" / "checkpoint" / "state.json"
    saved = json.loads(state.read_text())
    del saved["config"]["train_gap"]  # as saved before the option existed
    state.write_text(json.dumps(saved))
    with pytest.raises(CheckpointError, match="--train-gap 0 --output .*old"):
        run_conversion(ConversionConfig(**{**kwargs, "steps": 3}), tmp / "old", show_tqdm=False, log=lambda *a: None)
    out = run_conversion(ConversionConfig(**{**kwargs, "steps": 3}, train_gap=0.0), tmp / "old", show_tqdm=False,
                         log=lambda *a: None)
    assert json.loads((out / "tomoe.json").read_text())["tokens_seen"] == 3 * 128
    assert default_conversion_name(ConversionConfig(prune_attention=True)).endswith("-p0.5-e8")


def test_a_shipped_conditioned_conversion_rebuilds_the_same_model(tiny_setup, monkeypatch, capsys):
    dense, text, tmp = tiny_setup
    cfg = ConversionConfig(model=str(dense), text=str(text), steps=2, tokens_per_step=128, seq_len=64,
                           init_tokens=512, budget=0.5, budget_range=(0.3, 1.0), num_experts=4)
    out = run_conversion(cfg, tmp / "cond", show_tqdm=False, log=lambda *a: None, anchor_windows=0)
    shipped = tmp / "shipped"
    monkeypatch.setenv("TOMOE_SHIPPED", str(shipped))
    assert main(["ship", str(out)]) == 0
    recipe = shipped / "cond"
    assert str(recipe) in capsys.readouterr().out
    # the hypernetwork and metadata only: no dense weights, no tokenizer
    assert sorted(p.name for p in recipe.iterdir()) == ["hypernet.safetensors", "tomoe.json", "training_log.jsonl"]
    assert Conversion(recipe).is_conditioned_recipe
    # a fresh clone materialises it at its budget: the very weights that were measured, hypernetwork beside
    (target,) = shipping.ensure_shipped_conversions(log=lambda *a: None)
    original, rebuilt = (json.loads((f / "tomoe.json").read_text()) for f in (out, target))
    assert rebuilt["weights_sha256"] == original["weights_sha256"]
    assert rebuilt["rebuilt_from_recipe"] and "hypernet_sha256" not in rebuilt
    assert (target / "hypernet.safetensors").exists()
    model, info, _ = materialise_at(target, 0.7, log=lambda *a: None)
    assert info["budget_source"] == "conditioned" and abs(account(model).mlp_active_ratio - 0.7) <= 0.02
    # every budget straight from the shipped folder too (what Compare does before the copy exists)
    _model, info, _ = materialise_at(recipe, 0.4, log=lambda *a: None)
    assert info["budget_source"] == "conditioned"
    # a damaged hypernetwork is refused with a reason, not materialised into a wrong model
    import shutil
    shutil.rmtree(target)
    data = bytearray((recipe / "hypernet.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (recipe / "hypernet.safetensors").write_bytes(bytes(data))
    with pytest.raises(ConvertedModelError, match="checksum"):
        shipping.ensure_shipped_conversions(log=lambda *a: None)
