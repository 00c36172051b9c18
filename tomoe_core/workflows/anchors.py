"""Anchor calibration of a budget-conditioned conversion (`python -m tomoe_core calibrate-anchor`): for
each budget and gap, generate the experts at max(lo, p - gap), widen them to p and measure KL to the
dense model on validation windows; the gap with the lowest KL is recorded in tomoe.json."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from ..convert.config import ConversionConfig
from ..convert.dense import load_dense
from ..convert.generation_budget import ANCHOR_BUDGETS, ANCHOR_GAPS, ANCHOR_SKIP_WINDOWS, ANCHOR_WINDOWS, anchor_budget
from ..convert.masked_model import MaskedModel
from ..convert.materialise import materialise
from ..convert.train import finalize_masks
from ..eval.metrics import default_window, evaluate_variants, logits_fn
from ..infra.workspace import file_lock, safe_name
from ..moe.metadata import ConversionMetadata
from ..moe.modeling import read_metadata
from ..text.sources import cached_stream, special_prefix
from ..text.sources import windows as make_windows
from .rebudget import hypernet_path, load_trainable

logger = logging.getLogger(__name__)  # diagnostics; the CLI shows them on stderr


def anchor_windows(tokenizer, model_name: str, text: str, window: int = 512, count: int = ANCHOR_WINDOWS,
                   skip: int = ANCHOR_SKIP_WINDOWS) -> torch.Tensor:
    """Validation windows for the anchor calibration: held-out windows `skip` .. `skip + count` (fewer
    when the held-out text ends sooner). Raises TextSourceError when not even one is left."""
    from ..text.reading import TextSourceError

    stream = cached_stream(tokenizer, text, "heldout", None, safe_name(Path(model_name).name))
    held = make_windows(stream, window, skip + count, special_prefix(tokenizer))[skip:]
    if held.shape[0] == 0:
        raise TextSourceError(f"the held-out text of {text!r} has {stream.numel()} tokens: no window of {window} "
                              f"after the first {skip} (reserved for reporting)")
    return held


def calibrate_anchor(masked: MaskedModel, windows: torch.Tensor, budgets=ANCHOR_BUDGETS, gaps=ANCHOR_GAPS,
                     device: str = "cpu", progress=None) -> dict:
    """Measure, for a budget-conditioned conversion, at which budget its hypernetwork should generate
    the experts that the threshold then widens to each requested budget.

    For every budget inside the range and every gap, the masks are generated at max(lo, p - gap),
    widened to p and evaluated against the dense model on `windows` (one variant in memory at a
    time; the dense logits of the windows are computed once and kept).
    Returns {"anchor_gaps": {"p": gap with the lowest KL to dense}, "rows": [one per variant]}."""
    lo, hi = masked.budget_range
    budgets = [b for b in budgets if lo - 1e-9 <= b <= hi + 1e-9]
    dense_logits = logits_fn(masked, lambda: masked.set_masks(None))
    memo = {}  # every variant sees the same few windows: run the dense model once per window

    def dense_fn(ids):
        key = tuple(ids.flatten().tolist())
        if key not in memo:
            memo[key] = dense_logits(ids)
        return memo[key]

    todo = [(b, g) for b in budgets for g in gaps]
    rows, done = [], set()
    for i, (budget, gap) in enumerate(todo):
        at = anchor_budget(masked.budget_range, budget, gap)
        if (budget, round(at, 9)) not in done:  # near the range's floor larger gaps generate at the same budget
            done.add((budget, round(at, 9)))
            masks, _info = finalize_masks(masked, budget, generate_at=at)
            moe = materialise(masked, masks, budget).to(device)
            res = evaluate_variants(dense_fn, {"moe": logits_fn(moe, lambda: moe.set_routing(None))}, windows,
                                    device=device)["moe"]
            rows.append({"budget": budget, "gap": gap, "generated_at": round(at, 6), "perplexity": res.perplexity,
                         "kl_to_dense": res.kl_to_dense, "top1_agreement": res.top1_agreement})
            del moe
        if progress is not None:
            progress(i + 1, len(todo))
    masked.set_masks(None)
    best = {}
    for r in rows:
        key = f"{r['budget']:g}"
        if key not in best or r["kl_to_dense"] < best[key]["kl_to_dense"]:
            best[key] = r
    return {"anchor_gaps": {k: r["gap"] for k, r in best.items()}, "rows": rows}


def format_anchor_row(row: dict) -> str:
    """One measurement of `calibrate_anchor`, as the CLI and benchmarks.anchor_gap print it."""
    return (f"p={row['budget']:g} gap {row['gap']:g} (generated at {row['generated_at']:.2f}): perplexity "
            f"{row['perplexity']:8.2f}  KL {row['kl_to_dense']:.3f}  agreement {row['top1_agreement']:.3f}")


def calibrate_after_training(masked: MaskedModel, tokenizer, cfg: ConversionConfig, count: int, log) -> dict | None:
    """run_conversion's anchor calibration of a conditioned conversion; None when skipped."""
    from ..text.reading import TextSourceError

    if count <= 0:
        return None
    try:
        held = anchor_windows(tokenizer, cfg.model, cfg.text, min(512, default_window(masked.model)), count,
                              ANCHOR_SKIP_WINDOWS)
    except TextSourceError as err:
        log(f"[tomoe] anchor calibration skipped ({err}); materialisation generates at the budget itself")
        return None
    return _logged_calibration(masked, held, cfg.device, ANCHOR_SKIP_WINDOWS, log)


def _logged_calibration(masked, held, device, skip, log, budgets=ANCHOR_BUDGETS, gaps=ANCHOR_GAPS,
                        progress=None) -> dict:
    t0 = time.time()
    log(f"[tomoe] anchor calibration: gaps {list(gaps)} at every budget of {list(budgets)} in range, on "
        f"{held.shape[0]} validation windows x {held.shape[1]} tokens")
    calib = calibrate_anchor(masked, held, budgets, gaps, device=device, progress=progress)
    calib.update(windows=int(held.shape[0]), window=int(held.shape[1]), skip_windows=skip,
                 seconds=round(time.time() - t0, 1))
    log(f"[tomoe] anchor gaps: {calib['anchor_gaps']} in {calib['seconds']:.0f} s")
    return calib


def record_anchor_calibration(conversion: Path, device: str = "cpu", windows: int = ANCHOR_WINDOWS,
                              window: int = 512, skip: int = ANCHOR_SKIP_WINDOWS, budgets=ANCHOR_BUDGETS,
                              gaps=ANCHOR_GAPS, progress=None, log=logger.info, record: bool = True) -> dict:
    """Calibrate a saved budget-conditioned conversion (`calibrate_anchor`) and (record) write the chosen
    gaps into its tomoe.json (`anchor_gaps`, with the measurements under `anchor_calibration`), so that
    every later `materialise_at` uses them."""
    conversion = Path(conversion)
    meta = read_metadata(conversion)
    if not meta.get("budget_range"):
        raise ValueError(f"{conversion} is not budget-conditioned (no budget_range): nothing to anchor")
    lo, hi = meta["budget_range"]
    if not any(lo - 1e-9 <= b <= hi + 1e-9 for b in budgets):
        raise ValueError(f"none of the budgets {list(budgets)} lies in the conversion's range {lo:g}..{hi:g}")
    hypernet_path(conversion)
    dense, tokenizer = load_dense(meta["model"], device=device, log=log)
    held = anchor_windows(tokenizer, meta["model"], meta.get("text") or "wiki", min(window, default_window(dense)),
                          windows, skip)
    calib = _logged_calibration(load_trainable(conversion, dense), held, device, skip, log, budgets, gaps, progress)
    if record:  # merged: budgets not calibrated now keep their earlier gaps and measurements
        with file_lock(conversion / "tomoe.json.lock"):
            meta = read_metadata(conversion)  # re-read: keep whatever changed meanwhile
            meta["anchor_gaps"] = {**(meta.get("anchor_gaps") or {}), **calib["anchor_gaps"]}
            kept = [r for r in (meta.get("anchor_calibration") or {}).get("rows", [])
                    if f"{r['budget']:g}" not in calib["anchor_gaps"]]
            meta["anchor_calibration"] = {**{k: v for k, v in calib.items() if k != "anchor_gaps"},
                                          "rows": kept + calib["rows"]}
            ConversionMetadata(meta).write(conversion)
    return calib
