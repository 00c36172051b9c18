"""High-level operations shared by the CLI and the studio: convert, evaluate."""
from __future__ import annotations

import logging
import time
from pathlib import Path

from ..convert.accounting import account
from ..convert.dense import load_dense
from ..convert.expert_masks import Masks
from ..convert.folder import Conversion, conversions_dir
from ..convert.generation_budget import anchor_budget, check_budget
from ..convert.masked_model import MaskedModel
from ..convert.materialise import dense_model_of, materialise, save_converted
from ..convert.train import finalize_masks, layer_stats
from ..infra.workspace import safe_name
from ..infra.machine import release_freed_heap
from ..moe.modeling import read_metadata

logger = logging.getLogger(__name__)  # diagnostics; the CLI shows them on stderr


def mask_stats(masked: MaskedModel, masks: Masks, budget: float) -> dict:
    """tomoe.json's per-layer mask statistics: MLP expert widths, union and the fraction of (expert,
    channel) entries that differ from the initial prior at `budget` ("layers", with their mean in
    "moved_from_prior": how far training reshaped the experts) and, with attention pruning, the fraction
    of Q/K rotary pairs kept and V/O widths ("attention_layers")."""
    masks = masked.masks_of(masks)
    out = {"layers": layer_stats(masks.mlp)}
    moved = [float(((m > 0) != (masked.mask_base(l, budget) > 0)).float().mean()) for l, m in enumerate(masks.mlp)]
    for layer, frac in zip(out["layers"], moved):
        layer["moved_from_prior"] = round(frac, 4)
    out["moved_from_prior"] = round(sum(moved) / len(moved), 4)
    if masked.attention is not None:
        out["attention_layers"] = [{"qk_pairs": round(float(q.sum()) / q.numel(), 4), **layer_stats([v])[0]}
                                   for q, v in zip(masks.qk, masks.vo)]
    return out


def budget_source(meta: dict, budget: float) -> str:
    """How a conversion reaches `budget`: "trained" (its own), "conditioned" (inside the range its
    budget-conditioned hypernetwork was trained on) or "threshold-moved" (no training for it)."""
    rng = meta.get("budget_range") or (meta.get("settings") or {}).get("budget_range")
    if rng and rng[0] - 1e-9 <= budget <= rng[1] + 1e-9:
        return "conditioned"
    return "trained" if abs(budget - float(meta["budget"])) < 1e-9 else "threshold-moved"


def hypernet_path(conversion: Path) -> Path:
    """Where a conversion's trained hypernetwork and routers are (FileNotFoundError if nowhere)."""
    return Conversion(conversion).require_hypernet_path()


def load_trainable(conversion: Path, dense) -> MaskedModel:
    """The trained hypernetwork and routers of a conversion around `dense` (which it wraps)."""
    from safetensors.torch import load_file

    state_path = hypernet_path(conversion)
    settings = read_metadata(conversion)["settings"]
    device = next(dense.parameters()).device
    masked = MaskedModel(dense, settings["num_experts"], offset=settings["offset"], seed=settings["seed"],
                         budget_range=settings.get("budget_range"), prune_attention=settings.get("prune_attention", False))
    masked.load_trainable_state({k: v.to(device) for k, v in load_file(str(state_path)).items()})
    return masked


def materialise_at(conversion: Path, budget: float, device: str = "cpu", layout: str = "decode",
                   dense=None, log=logger.info, anchor_gap: float | None = None):
    """A trained conversion materialised at `budget`, in memory: (model, metadata, seconds).

    A budget-conditioned conversion generates the experts for max(lo, budget - anchor_gap) and a
    threshold shift lands the ratio exactly on `budget` (anchor_gap None: the gap the conversion's
    anchor calibration chose, `DEFAULT_ANCHOR_GAP` without one; 0: generated at `budget` itself).
    Any other conversion moves its mask threshold (no retraining; labelled "threshold-moved").
    `dense`: an already loaded dense model to reuse (it is wrapped, so pass a fresh copy or expect it
    to be consumed).
    """
    check_budget(budget)
    conversion = Path(conversion)
    meta = read_metadata(conversion)
    hypernet_path(conversion)  # fail before loading the dense model
    t0 = time.time()
    if dense is None:
        dense, _ = load_dense(meta["model"], device=device, log=log)
    masked = load_trainable(conversion, dense)
    masks, calib = finalize_masks(masked, budget, generate_at=anchor_budget(masked.budget_range, budget, anchor_gap,
                                                                             meta.get("anchor_gaps")))
    moe = materialise(masked, masks, budget)
    moe.set_layout(layout)
    report = account(moe)
    stats = mask_stats(masked, masks, budget)
    del masked, dense, masks  # the caller's dense model (if any) lives on in the caller
    release_freed_heap()
    seconds = time.time() - t0
    new_meta = {**{k: v for k, v in meta.items() if k not in ("weights_sha256", "saved_at")},
                "budget": budget, "budget_source": budget_source(meta, budget),
                "trained_budget": meta["budget"],  # the source conversion's budget (not `train_budget`)
                "derived_from": str(conversion), "mask_calibration": calib, **stats,
                "accounting": report.as_dict(), "materialise_seconds": round(seconds, 2)}
    return moe, new_meta, seconds


def rebudget(conversion: Path, budget: float, output: Path | None = None, log=logger.info) -> Path:
    """Materialise a trained conversion at another budget and save it (see `materialise_at`).

    A single-budget conversion is labelled `"budget_source": "threshold-moved"` in its tomoe.json:
    its experts were trained for the original budget, so expect it to be worse than a conversion
    trained at `budget`. A budget-conditioned one inside its range is labelled "conditioned".
    """
    conversion = Path(conversion)
    check_budget(budget)
    meta = read_metadata(conversion)
    hypernet_path(conversion)  # fail before loading the dense model
    dense, tokenizer = load_dense(dense_model_of(conversion, meta), log=log)
    moe, new_meta, seconds = materialise_at(conversion, budget, layout="memory", dense=dense, log=log)
    output = Path(output) if output else conversions_dir() / safe_name(f"{conversion.name}-at-p{budget:g}")
    save_converted(moe, output, tokenizer, new_meta)
    log(f"[tomoe] {output}: {new_meta['budget_source']} from p={new_meta['trained_budget']} to p={budget} "
        f"(MLP active ratio {new_meta['accounting']['mlp_active_ratio']:.4f}) in {seconds:.1f} s")
    return output
