"""The conversion workflow (`python -m tomoe_core convert`): load the dense model and text, train
(single process or torch.distributed), calibrate a conditioned conversion's anchor, materialise and save."""
from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ..convert.accounting import account
from ..convert.config import ConversionConfig
from ..convert.dense import load_dense
from ..convert.folder import (
    CHECKPOINT_STATE,
    HYPERNET_FILE,
    Conversion,
    conversions_dir,
    default_conversion_name,
    work_dir_of,
)
from ..convert.generation_budget import ANCHOR_WINDOWS, anchor_budget
from ..convert.masked_model import MaskedModel
from ..convert.materialise import materialise, save_converted
from ..convert.train import finalize_masks, train_conversion
from ..infra.workspace import copy_if_exists, file_lock, safe_name
from ..infra.machine import machine_info
from ..infra.ranks import dist_info
from ..text.sources import cached_stream, special_prefix
from .anchors import calibrate_after_training
from .rebudget import mask_stats

logger = logging.getLogger(__name__)  # diagnostics; the CLI shows them on stderr


def _init_distributed(cfg: ConversionConfig) -> tuple[int, int]:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if cfg.device.startswith("cuda") else "gloo")
    if cfg.device.startswith("cuda"):
        cfg.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(cfg.device)
    return dist_info()


def run_conversion(cfg: ConversionConfig, output: Path | None = None, progress=None, show_tqdm=True,
                   log=logger.info, command: str | None = None, anchor_windows: int | None = None) -> Path:
    """Train a conversion (resuming if a checkpoint exists), materialise and save it. Returns the folder.

    A budget-conditioned conversion is then calibrated (`calibrate_anchor`) on `anchor_windows`
    validation windows (default ANCHOR_WINDOWS; 0: not calibrated, masks generated at the budget).

    Under `torchrun --nproc_per_node N` every process trains a DDP replica on its own shard of the
    calibration text; rank 0 writes checkpoints, the log and the converted model.
    """
    output = Path(output) if output else conversions_dir() / default_conversion_name(cfg)
    workdir = work_dir_of(output)  # checkpoint and live log; the saved model goes to `output`
    t0 = time.time()
    rank, world = _init_distributed(cfg)
    if rank != 0:
        log = lambda *a, **k: None  # noqa: E731
    # two runs converting into the same folder would corrupt it: rank 0 holds the lock
    lock = file_lock(workdir) if rank == 0 else contextlib.nullcontext()
    with lock:
        model, tokenizer = load_dense(cfg.model, device=cfg.device, log=log)
        tag = safe_name(Path(cfg.model).name)
        stream = cached_stream(tokenizer, cfg.text, "calibration", None, tag)
        masked = MaskedModel(model, cfg.num_experts, offset=cfg.offset, seed=cfg.seed, budget_range=cfg.budget_range,
                             prune_attention=cfg.prune_attention)
        summary = train_conversion(masked, stream, cfg, workdir, progress=progress, show_tqdm=show_tqdm, log=log,
                                   prefix=special_prefix(tokenizer))
        if not summary["finished"] or rank != 0:
            return workdir if not summary["finished"] else output
        anchor = None
        if cfg.budget_range is not None:
            anchor = calibrate_after_training(masked, tokenizer, cfg, ANCHOR_WINDOWS if anchor_windows is None
                                               else anchor_windows, log)
        masks, calib = finalize_masks(masked, cfg.budget, generate_at=anchor_budget(
            cfg.budget_range, cfg.budget, anchor_gaps=anchor["anchor_gaps"] if anchor else None))
        moe = materialise(masked, masks, cfg.budget)
        report = account(moe)
        meta = {
            "kind": "tomoe-conversion",
            "model": cfg.model, "budget": cfg.budget, "num_experts": cfg.num_experts,
            "budget_source": "trained" if cfg.budget_range is None else "conditioned",
            "budget_range": list(cfg.budget_range) if cfg.budget_range else None,
            "settings": asdict(cfg), "command": command, "world_size": world,
            "tokens_seen": summary["tokens_seen"], "train_seconds": round(summary["train_seconds"], 1),
            "wall_seconds": round(time.time() - t0, 1), "final_losses": summary["last"],
            "mask_calibration": calib, **mask_stats(masked, masks, cfg.budget),
            "accounting": report.as_dict(), "machine": machine_info(cfg.device), "text": cfg.text,
        }
        if cfg.train_gap:
            # trained there, widened to `budget` by the threshold (tomoe.json's keys: see generation_budget)
            meta["train_budget"] = cfg.train_budget
        if anchor:
            meta["anchor_gaps"] = anchor.pop("anchor_gaps")
            meta["anchor_calibration"] = anchor
        save_converted(moe, output, tokenizer, meta)
        saved = Conversion(output)
        copy_if_exists(saved.progress_log, saved.training_log)
        # the trained hypernetwork + routers stay beside the model: other budgets re-threshold it
        copy_if_exists(saved.checkpoint_dir / CHECKPOINT_STATE, output / HYPERNET_FILE)
        log(f"[tomoe] saved {output}: MLP active ratio {report.mlp_active_ratio:.4f} "
            f"(requested {cfg.budget}), whole model {report.active_ratio_vs_dense:.4f}, "
            f"{summary['tokens_seen']} tokens in {summary['train_seconds'] / 60:.1f} min")
        if cfg.prune_attention:
            log(f"[tomoe] attention pruning: executed active ratio over MLP + q/k/v/o projections "
                f"{report.executed_active_ratio:.4f} (requested {cfg.budget})")
    return output
