"""How a budget-conditioned run spreads its training steps over the budget range."""
import json
import math

import pytest

from tomoe_core.convert.folder import default_conversion_name
from tomoe_core.convert.config import BUDGET_SAMPLING, ConversionConfig
from tomoe_core.convert.train import budget_quantile, step_budget

CDF = {  # share of the range's mass below p, for each sampling density over [lo, hi]
    "uniform": lambda p, lo, hi: (p - lo) / (hi - lo),
    "log": lambda p, lo, hi: math.log(p / lo) / math.log(hi / lo),
    "inverse": lambda p, lo, hi: (1 / lo - 1 / p) / (1 / lo - 1 / hi),
}


@pytest.mark.parametrize("sampling", BUDGET_SAMPLING)
def test_steps_follow_the_named_density(sampling):
    cfg = ConversionConfig(budget_range=(0.3, 1.0), budget_sampling=sampling, steps=400)
    budgets = [step_budget(cfg, s) for s in range(400)]
    assert all(0.3 <= b <= 1.0 for b in budgets)
    # the golden-ratio sweep is low-discrepancy: the empirical CDF of 400 steps is within 1 % of the density's
    for p in (0.35, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95):
        share = sum(b < p for b in budgets) / len(budgets)
        assert abs(share - CDF[sampling](p, 0.3, 1.0)) < 0.01, (p, share)
    # every stretch of 50 steps (one checkpoint interval) already covers both ends of the range
    for start in range(0, 400, 50):
        chunk = budgets[start:start + 50]
        assert min(chunk) < 0.35 and max(chunk) > 0.9


def test_low_budget_share_grows_from_uniform_to_inverse():
    # the shares of steps below p = 0.5 docs/GUIDE.md quotes (29 %, 42 %, 57 %), from the training schedule itself
    below = {s: sum(step_budget(ConversionConfig(budget_range=(0.3, 1.0), budget_sampling=s), i) < 0.5
                    for i in range(1000)) / 1000 for s in BUDGET_SAMPLING}
    assert below["uniform"] == pytest.approx(0.286, abs=0.005)
    assert below["log"] == pytest.approx(0.424, abs=0.005)
    assert below["inverse"] == pytest.approx(0.571, abs=0.005)
    for s in BUDGET_SAMPLING:  # quantile is the inverse of the CDF, ends included
        assert budget_quantile(s, 0.3, 1.0, 0.0) == pytest.approx(0.3)
        assert budget_quantile(s, 0.3, 1.0, 1.0) == pytest.approx(1.0)
        assert CDF[s](budget_quantile(s, 0.3, 1.0, 0.37), 0.3, 1.0) == pytest.approx(0.37)


def test_sampling_needs_a_range_and_bad_names_are_refused():
    assert [step_budget(ConversionConfig(budget=0.6), s) for s in range(3)] == pytest.approx([0.5] * 3)  # train below
    assert {step_budget(ConversionConfig(budget=0.4), s) for s in range(20)} == {0.4}  # below 0.5: at the budget
    with pytest.raises(ValueError, match="spreads steps over a budget range"):
        ConversionConfig(budget=0.4, budget_sampling="log")
    assert ConversionConfig().budget_sampling is None
    assert ConversionConfig(budget_range=(0.3, 1.0)).budget_sampling == "log"  # the default with a range
    with pytest.raises(ValueError, match="budget_sampling must be one of uniform, log, inverse"):
        ConversionConfig(budget_range=(0.3, 1.0), budget_sampling="cosine")
    assert default_conversion_name(ConversionConfig(budget_range=(0.3, 1.0), budget_sampling="uniform")) == \
        "smollm2-135m-p0.3-1-e8"
    assert default_conversion_name(ConversionConfig(budget_range=(0.3, 1.0))) == "smollm2-135m-p0.3-1-log-e8"


def test_cli_passes_sampling_and_regularisation_through(monkeypatch, tmp_path):
    from tomoe_core import cli
    from tomoe_core.workflows import conversion_run

    seen = {}

    def fake_run(cfg, output, command="", anchor_windows=None):
        seen["cfg"], seen["command"], seen["anchor_windows"] = cfg, command, anchor_windows
        return tmp_path

    monkeypatch.setattr(conversion_run, "run_conversion", fake_run)
    assert cli.main(["convert", "--budget-range", "0.3", "1.0", "--budget-sampling", "inverse",
                     "--regularise", "sampled", "--steps", "3"]) == 0
    cfg = seen["cfg"]
    assert cfg.budget_range == (0.3, 1.0) and cfg.budget_sampling == "inverse" and cfg.regularise == "sampled"
    assert "--budget-sampling inverse" in seen["command"]
    assert cli.main(["convert", "--budget-sampling", "log"]) == 2  # no range: refused with a message
    assert cli.main(["convert", "--budget-range", "0.3", "1.0"]) == 0 and seen["cfg"].budget_sampling == "log"
    assert cli.main(["convert"]) == 0 and seen["cfg"].budget_sampling is None
    assert seen["anchor_windows"] is None and seen["cfg"].train_gap == pytest.approx(0.1)  # the default from p = 0.5 up
    assert cli.main(["convert", "--budget-range", "0.3", "1.0"]) == 0 and seen["cfg"].train_gap == 0.0
    assert cli.main(["convert", "--budget-range", "0.3", "1.0", "--anchor-windows", "0"]) == 0
    assert seen["anchor_windows"] == 0
    assert cli.main(["convert", "--budget", "0.5", "--train-gap", "0.1"]) == 0
    assert seen["cfg"].train_gap == 0.1 and seen["cfg"].train_budget == pytest.approx(0.4)
    assert cli.main(["convert", "--budget", "0.5", "--train-gap", "0.6"]) == 2  # at or past the budget: refused


def test_a_range_checkpoint_saved_before_sampling_existed_resumes_only_as_uniform(tmp_path):
    from dataclasses import asdict

    from tomoe_core.convert.train import CheckpointError, _check_same_settings

    saved = json.loads(json.dumps(asdict(ConversionConfig(budget_range=(0.3, 1.0), budget_sampling="uniform"))))
    del saved["budget_sampling"]  # tomoe.json / state.json of a conversion made before the option
    _check_same_settings(saved, ConversionConfig(budget_range=(0.3, 1.0), budget_sampling="uniform"), tmp_path)
    with pytest.raises(CheckpointError, match="budget_sampling"):
        _check_same_settings(saved, ConversionConfig(budget_range=(0.3, 1.0)), tmp_path)  # now log by default
    # a single-budget checkpoint that recorded a sampling (the option's first version did) still resumes
    single = {**json.loads(json.dumps(asdict(ConversionConfig()))), "budget_sampling": "uniform"}
    _check_same_settings(single, ConversionConfig(), tmp_path)


def test_a_checkpoint_saved_before_prior_scale_and_mask_noise_resumes_only_with_their_old_values(tmp_path):
    """Conversions saved before --prior-scale / --mask-noise existed trained with a +-3 prior and noise of
    amplitude 1 (since changed to 1.0 / 0.33): resuming one with today's defaults would mix recipes."""
    from dataclasses import asdict

    from tomoe_core.convert.train import CheckpointError, _check_same_settings

    saved = json.loads(json.dumps(asdict(ConversionConfig())))
    del saved["prior_scale"], saved["mask_noise"]
    _check_same_settings(saved, ConversionConfig(prior_scale=3.0, mask_noise=1.0), tmp_path)
    with pytest.raises(CheckpointError, match="prior_scale.*mask_noise"):
        _check_same_settings(saved, ConversionConfig(), tmp_path)
    _check_same_settings(json.loads(json.dumps(asdict(ConversionConfig()))), ConversionConfig(), tmp_path)
