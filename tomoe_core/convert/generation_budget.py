"""Which budget a conversion's masks are generated at: one home for the train gap and the anchor gap.

Torch-free (the settings and the studio read it without the engine).

The hypernetwork produces mask logits; a global threshold shift (`train.finalize_masks`) then moves the
masks onto the budget p the saved model has. The budget the logits come from may lie below p, and the
shift then widens the experts:

* a single-budget conversion trains its experts at `train_budget(p, train_gap)` = p - train_gap
  (`ConversionConfig.train_gap`, default `default_train_gap`: TRAIN_GAP from TRAIN_GAP_FROM up, else 0)
  and its unconditioned hypernetwork has nothing else to generate them for;
* a budget-conditioned one (trained for every budget in [lo, hi]) generates them at
  `anchor_budget(...)` = max(lo, p - gap), inside the range, where the gap is given or looked up in the
  conversion's anchor calibration (`calibrated_gap`: the gap chosen for the calibrated budget nearest
  to p; DEFAULT_ANCHOR_GAP = 0 without a calibration).

Whatever it is asked for, a conditioned hypernetwork only generates inside its range: `clamp_budget`
(outside it the nearest trained budget, and the shift does the rest).

What tomoe.json records about it (the keys stay as older conversions wrote them; two look alike and
mean different things):

* "budget": the budget of the saved masks (their active ratio, after the shift).
* "budget_range": [lo, hi] of a budget-conditioned conversion (absent or null otherwise).
* "settings" / "train_gap": the train gap of a single-budget conversion (0 in settings saved before it
  existed; `train.LEGACY_SETTINGS`).
* "train_budget": single budget, written only when train_gap > 0: the budget the experts were trained
  at, p - train_gap, before the threshold widened them to "budget".
* "anchor_gaps": {"p": gap} chosen per calibrated budget by the anchor calibration of a conditioned
  conversion (measurements under "anchor_calibration"); read by `calibrated_gap`.
* "mask_calibration" / "generated_at": (conditioned) the budget this model's logits were generated at.
* "trained_budget": in the metadata of `workflows.rebudget.materialise_at` (and so of a copy saved by `rebudget`):
  the "budget" of the conversion it was materialised from ("derived_from"), not where anything was
  trained. Unrelated to "train_budget".
"""
from __future__ import annotations

# A single-budget conversion trains this far below its budget and widens to it, from TRAIN_GAP_FROM up.
# Measured on SmolLM2-135M (README, "Train below the budget"): at p = 0.5 training at 0.4 and widening was
# 7 % better on 60 held-out windows, at 0.7 training at 0.5 was 8 % better on 8, at 0.4 training at 0.32
# was 16 % worse on 8. Below TRAIN_GAP_FROM the default trains at the budget itself.
TRAIN_GAP = 0.1
TRAIN_GAP_FROM = 0.5

# How far below the requested budget a conditioned conversion generates its masks before the threshold
# widens them to the budget, when the conversion carries no calibration of its own (`anchor_gaps` in
# tomoe.json, written by `workflows.anchors.calibrate_anchor`): generate at the budget itself.
DEFAULT_ANCHOR_GAP = 0.0
# What `calibrate_anchor` tries: gaps per budget, on validation windows of the held-out text that come
# after the first ANCHOR_SKIP_WINDOWS (those are what `evaluate` and benchmarks.quality report on).
ANCHOR_GAPS = (0.0, 0.1, 0.2)
ANCHOR_BUDGETS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
ANCHOR_SKIP_WINDOWS = 60
ANCHOR_WINDOWS = 4


def check_budget(budget: float) -> float:
    """`budget` itself when it is a fraction of the MLP parameters in (0, 1]; ValueError otherwise."""
    if not 0 < budget <= 1:
        raise ValueError(f"budget must be in (0, 1], got {budget}")
    return budget


def clamp_budget(budget: float, budget_range) -> float:
    """`budget` moved into `budget_range` (lo, hi); unchanged without a range."""
    if budget_range is None:
        return budget
    lo, hi = budget_range
    return min(max(budget, lo), hi)


def default_train_gap(budget: float, budget_range=None, prune_attention: bool = False) -> float:
    """train_gap when none is given: TRAIN_GAP for an MLP-only single-budget conversion at a budget of
    TRAIN_GAP_FROM or more; 0 below it, with a budget range (it calibrates its anchor after training) or
    with attention pruning (not measured)."""
    if budget_range is not None or prune_attention or budget < TRAIN_GAP_FROM - 1e-9:
        return 0.0
    return TRAIN_GAP


def train_budget(budget: float, train_gap: float) -> float:
    """The budget a single-budget conversion trains its experts at: `budget - train_gap`."""
    return budget - train_gap


def calibrated_gap(anchor_gaps: dict | None, budget: float) -> float:
    """The gap a conversion's calibration chose for the calibrated budget nearest to `budget`
    (the lower one on a tie); DEFAULT_ANCHOR_GAP without a calibration."""
    if not anchor_gaps:
        return DEFAULT_ANCHOR_GAP
    nearest = min(anchor_gaps, key=lambda b: (round(abs(float(b) - budget), 9), float(b)))
    return float(anchor_gaps[nearest])


def anchor_budget(budget_range, budget: float, anchor_gap: float | None = None,
                  anchor_gaps: dict | None = None) -> float | None:
    """The budget a conditioned conversion generates its masks for when materialised at `budget`:
    max(lo, budget - gap), inside the range; None for a single-budget conversion. gap: `anchor_gap`
    if given, else the calibrated gap (`anchor_gaps`, see `calibrated_gap`)."""
    if budget_range is None:
        return None
    gap = calibrated_gap(anchor_gaps, budget) if anchor_gap is None else anchor_gap
    if gap < 0:
        raise ValueError(f"anchor gap must be >= 0, got {gap}")
    return clamp_budget(budget - gap, budget_range)
