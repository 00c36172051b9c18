"""Conversion training: distil the dense model into its masked self, then materialise.

Each step: sample a batch of calibration windows (deterministic in (seed, step)), run the
dense teacher without gradient, draw expert masks from the hypernetwork (straight-through
Gumbel-sigmoid whose noise anneals to zero), route tokens with a straight-through
Gumbel-softmax, and minimise
    KL(dense || masked) + lam * |log(r / p)| + w_union * -log(union) + w_lb * load_balance
with AdamW on the hypernetwork and routers only. The budget and union terms see the
*noise-free* masks (the ones inference uses), so the deterministic model cannot drift from
the budget or collapse while the noisy samples look fine. After training a global logit
shift is bisected so the saved model's active ratio sits on the budget.

Resume is exact: the checkpoint holds the trainable state, AdamW's state and the step,
and every random draw is seeded by (seed, step).
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ..infra.ranks import dist_info
from ..moe.atomic import atomic_dir, atomic_write_json, sha256_file
from ..text.sources import windows
from .config import BUDGET_SAMPLING, ConversionConfig
from .expert_masks import Masks
from .folder import CHECKPOINT_DIR, CHECKPOINT_STATE, PROGRESS_LOG, output_of_work_dir
from .hypernet import logistic_noise, straight_through_sigmoid
from .layerwise import layerwise_init
from .masked_model import MaskedModel

logger = logging.getLogger(__name__)  # diagnostics; the CLI shows them on stderr


def _step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step * 7_919 + 17) % (2 ** 63)


def sample_batch(stream: torch.Tensor, cfg: ConversionConfig, step: int, micro: int = 0,
                 prefix: Sequence[int] = ()) -> torch.Tensor:
    """Calibration windows of one micro-batch: a pure function of (seed, step, micro). -> (B / M, T)

    The stream is cut into `micro_batches` contiguous shards and micro-batch m reads shard m,
    so the processes of a distributed run read disjoint parts of the text. Each window is
    `prefix` (the tokenizer's BOS, if it adds one) followed by T - len(prefix) tokens of text.
    """
    shard_len = stream.numel() // cfg.micro_batches
    if shard_len <= cfg.seq_len:
        raise ValueError(f"calibration text of {stream.numel()} tokens is too short for {cfg.micro_batches} "
                         f"shards of windows of {cfg.seq_len} tokens")
    shard = stream[micro * shard_len:(micro + 1) * shard_len]
    g = torch.Generator().manual_seed(_step_seed(cfg.seed, step) + 7_777_777 * micro)
    starts = torch.randint(0, shard.numel() - cfg.seq_len, (cfg.batch_size // cfg.micro_batches,), generator=g)
    body = cfg.seq_len - len(prefix)
    batch = torch.stack([shard[s:s + body] for s in starts.tolist()])  # (B / M, T - len(prefix))
    if prefix:
        batch = torch.cat([torch.tensor(list(prefix), dtype=batch.dtype).expand(len(batch), -1), batch], dim=1)
    return batch


_GOLDEN = (5 ** 0.5 - 1) / 2


def step_budget(cfg: ConversionConfig, step: int) -> float:
    """The budget a step trains for: fixed, or (conditioned) a low-discrepancy sweep of the range.

    The golden-ratio sequence u = frac(0.5 + step * 0.618...) covers [0, 1) evenly over any stretch
    of steps (no clumps, unlike i.i.d. draws) and is a pure function of the step, so resume and
    distributed runs agree on it; `budget_quantile` maps it onto the range by `cfg.budget_sampling`.
    """
    if cfg.budget_range is None:
        return cfg.train_budget  # budget - train_gap (generation_budget.train_budget)
    lo, hi = cfg.budget_range
    return budget_quantile(cfg.budget_sampling, lo, hi, (0.5 + step * _GOLDEN) % 1.0)


def budget_quantile(sampling: str, lo: float, hi: float, u: float) -> float:
    """The budget at quantile u in [0, 1] of a sampling density over [lo, hi].

    uniform: density constant in p; log: density ~ 1/p (uniform in log p); inverse: density ~ 1/p^2
    (uniform in 1/p). Over 0.3..1.0 the share of steps below p = 0.5 is 29 %, 42 % and 57 %.
    """
    if sampling == "uniform":
        return lo + (hi - lo) * u
    if sampling == "log":
        return lo * (hi / lo) ** u
    if sampling == "inverse":
        return 1.0 / (1.0 / lo + u * (1.0 / hi - 1.0 / lo))
    raise ValueError(f"budget_sampling must be one of {', '.join(BUDGET_SAMPLING)}, got {sampling!r}")


def noise_scale(cfg: ConversionConfig, step: int) -> float:
    """Amplitude of the logistic mask noise at `step`: cfg.mask_noise, decaying linearly to 0."""
    if cfg.noise_anneal <= 0:
        return cfg.mask_noise
    return cfg.mask_noise * max(0.0, 1.0 - step / (cfg.noise_anneal * cfg.steps))


def _mean_union(masks: Masks) -> torch.Tensor:
    """Fraction of channels some expert keeps (soft: 1 - prod(1 - m)), averaged over the routed layers."""
    return torch.stack([(1 - torch.prod(1 - m, dim=0)).mean() for m in masks.routed]).mean()


def conversion_losses(masked: MaskedModel, ids: torch.Tensor, cfg: ConversionConfig, step: int,
                      autocast_dtype=None, micro: int = 0) -> dict[str, torch.Tensor]:
    """All loss terms of one micro-batch. ids: (B, T) on the model's device."""
    device = ids.device
    gen = torch.Generator().manual_seed(_step_seed(cfg.seed, step) + 1 + 7_777_777 * micro)
    amp = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    with torch.no_grad(), amp, masked.dense():
        teacher = masked.model(ids).logits.float()  # (B, T, V)
    scale = noise_scale(cfg, step)
    target = step_budget(cfg, step)
    logits = masked.mask_logits(target)
    if scale > 0:
        noise = logits.map(lambda z: scale * logistic_noise(z.shape, gen, device))  # drawn in mlp, qk, vo order
        train_masks = logits.map(lambda z, n: straight_through_sigmoid(z + n, cfg.mask_tau), noise)
    else:
        train_masks = logits.map(lambda z: straight_through_sigmoid(z, cfg.mask_tau))
    det_masks = logits.map(lambda z: straight_through_sigmoid(z, cfg.mask_tau))
    masked.set_masks(train_masks, train_routing=True)
    for m in masked.routed_modules():
        m.noise_generator, m.router_tau = gen, cfg.router_tau
    try:
        with amp:
            student = masked.model(ids).logits.float()
    finally:
        masked.set_masks(None)
    if cfg.distill == "kl":
        log_t = F.log_softmax(teacher, -1)
        distill = (log_t.exp() * (log_t - F.log_softmax(student, -1))).sum(-1).mean()
    else:
        distill = F.cross_entropy(student[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    reg_masks = det_masks if cfg.regularise == "deterministic" else train_masks
    ratio = masked.ratio_of(reg_masks)
    budget = cfg.lam * torch.log(ratio / target).abs()  # = lam * log(max(r, p) / min(r, p))
    union = _mean_union(reg_masks)
    union_loss = cfg.union_weight * -torch.log(union.clamp_min(1e-6))
    lb_terms = []
    for stats in masked.take_router_stats():  # one per routed module
        frac = stats.assignment.detach().mean(0)  # (E,) tokens routed to k
        prob = stats.probs.mean(0)  # (E,) mean router probability
        lb_terms.append(stats.assignment.shape[1] * (frac * prob).sum())
    load_balance = torch.stack(lb_terms).mean()
    total = distill + budget + union_loss + cfg.load_balance_weight * load_balance
    out = {"loss": total, "distill": distill, "budget_loss": budget, "union_loss": union_loss,
           "load_balance": load_balance, "ratio": ratio.detach(), "union": union.detach(),
           "noise": torch.tensor(scale), "target": torch.tensor(target)}
    if cfg.regularise == "sampled":  # what inference will see, to watch it drift from the regularised masks
        with torch.no_grad():
            out["det_ratio"] = masked.ratio_of(det_masks)
            out["det_union"] = _mean_union(det_masks)
    return out


class ConversionObjective(nn.Module):
    """The loss of one micro-batch as a module, so DistributedDataParallel can wrap it."""

    def __init__(self, masked: MaskedModel, cfg: ConversionConfig, autocast_dtype=None):
        super().__init__()
        self.masked, self.cfg, self.autocast_dtype = masked, cfg, autocast_dtype

    def forward(self, ids: torch.Tensor, step: int, micro: int) -> dict[str, torch.Tensor]:
        return conversion_losses(self.masked, ids, self.cfg, step, self.autocast_dtype, micro)


# -- checkpoints ------------------------------------------------------------------------------
def save_checkpoint(folder: Path, masked: MaskedModel, opt: torch.optim.Optimizer, step: int,
                    cfg: ConversionConfig, extra: dict) -> None:
    with atomic_dir(folder) as tmp:
        save_file(masked.trainable_state(), str(tmp / CHECKPOINT_STATE))
        buf = io.BytesIO()
        torch.save(opt.state_dict(), buf)
        (tmp / "optimizer.pt").write_bytes(buf.getvalue())
        meta = {"step": step, "config": asdict(cfg), **extra,
                "sha256": {n: sha256_file(tmp / n) for n in (CHECKPOINT_STATE, "optimizer.pt")}}
        atomic_write_json(tmp / "state.json", meta)


class CheckpointError(ValueError):
    pass


def load_checkpoint(folder: Path, masked: MaskedModel, opt: torch.optim.Optimizer) -> dict:
    state_path = folder / "state.json"
    if not state_path.exists():
        raise CheckpointError(f"checkpoint {folder} has no state.json: it is incomplete; delete it to start over")
    try:
        meta = json.loads(state_path.read_text())
    except json.JSONDecodeError:
        raise CheckpointError(f"checkpoint {state_path} is corrupt; delete {folder} to start over") from None
    for name, digest in meta["sha256"].items():
        if not (folder / name).exists() or sha256_file(folder / name) != digest:
            raise CheckpointError(f"checkpoint file {folder / name} is missing or corrupt (checksum mismatch); "
                                  f"delete {folder} to start over")
    device = next(masked.model.parameters()).device
    masked.load_trainable_state({k: v.to(device) for k, v in load_file(str(folder / CHECKPOINT_STATE)).items()})
    opt.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True, map_location=device))
    return meta


# -- the loop -----------------------------------------------------------------------------------
ProgressFn = Callable[[int, int, dict], None]


def train_conversion(masked: MaskedModel, stream: torch.Tensor, cfg: ConversionConfig, workdir: Path,
                     progress: ProgressFn | None = None, show_tqdm: bool = True, stop_after: int | None = None,
                     log=logger.info, prefix: Sequence[int] = ()) -> dict:
    """Train (or resume) a conversion in `workdir`. Returns a summary dict.

    `prefix`: token ids every window starts with, as the tokenizer starts a text (`data.special_prefix`).
    `stop_after`: end after this many steps of this call (to test interruption).
    Writes workdir/checkpoint (every `checkpoint_every` steps and at the end) and
    workdir/log.jsonl (one line of loss terms per step).
    """
    from tqdm.auto import tqdm

    workdir = Path(workdir)
    rank, world = dist_info()
    if cfg.micro_batches % world:
        raise ValueError(f"{world} processes cannot share {cfg.micro_batches} micro-batches: set --micro-batches "
                         f"to a multiple of {world}")
    if rank == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(workdir)
    device = torch.device(cfg.device)
    autocast_dtype = torch.bfloat16 if device.type == "cuda" else None
    opt = torch.optim.AdamW(masked.trainable_parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ckpt = workdir / CHECKPOINT_DIR
    start, elapsed, init_info = 0, 0.0, {}
    _barrier(world)
    if (ckpt / "state.json").exists():
        meta = load_checkpoint(ckpt, masked, opt)
        _check_same_settings(meta["config"], cfg, ckpt)
        start, elapsed, init_info = meta["step"], meta.get("elapsed_s", 0.0), meta.get("init", {})
        log(f"[tomoe] resuming from step {start}/{cfg.steps}")
    elif cfg.init in ("cluster", "layerwise"):
        t0 = time.time()
        calib = windows(stream, cfg.seq_len, max(1, cfg.init_tokens // cfg.seq_len), prefix)
        n = calib.shape[0]
        if cfg.init == "cluster":
            init_info = masked.cluster_init(calib, cfg.train_budget, prior_scale=cfg.prior_scale, seed=cfg.seed,
                                            balance=cfg.init_balance)
        else:
            init_info = layerwise_init(masked, calib, cfg.train_budget, prior_scale=cfg.prior_scale, seed=cfg.seed)
        init_info["method"] = cfg.init
        init_info["seconds"] = time.time() - t0
        elapsed += init_info["seconds"]
        log(f"[tomoe] {cfg.init} init of {len(masked.mlps)} layers from {n * cfg.seq_len} tokens "
            f"in {init_info['seconds']:.0f} s")
    objective = ConversionObjective(masked, cfg, autocast_dtype)
    if world > 1:  # replicas of hypernetwork + routers; DDP broadcasts rank 0's state (incl. mask bases) here
        objective = nn.parallel.DistributedDataParallel(objective, broadcast_buffers=False)
    my_micro = list(range(rank, cfg.micro_batches, world))
    log_path = workdir / PROGRESS_LOG
    if rank == 0:
        _truncate_log(log_path, start)
    bar = tqdm(total=cfg.steps, initial=start, desc="convert", disable=not show_tqdm or rank != 0,
               dynamic_ncols=True)
    end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
    t_start = time.time()
    record = {}
    log_file = open(log_path, "a") if rank == 0 else None
    try:
        for step in range(start, end):
            opt.zero_grad(set_to_none=True)
            sums: dict[str, float] = {}
            for i, micro in enumerate(my_micro):
                ids = sample_batch(stream, cfg, step, micro, prefix).to(device)
                last = i == len(my_micro) - 1
                sync = contextlib.nullcontext() if world == 1 or last else objective.no_sync()
                with sync:
                    terms = objective(ids, step, micro)
                    # DDP averages over processes; each process sums its share of micro-batches
                    (terms["loss"] * world / cfg.micro_batches).backward()
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach()) / len(my_micro)
            opt.step()
            record = {"step": step + 1, **{k: round(v, 5) for k, v in sums.items()},
                      "elapsed_s": round(elapsed + time.time() - t_start, 2)}
            if log_file is not None:
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
            bar.update(1)
            bar.set_postfix(kl=f"{record['distill']:.3f}", p=f"{record['target']:.2f}", r=f"{record.get('det_ratio', record['ratio']):.3f}",
                            u=f"{record.get('det_union', record['union']):.2f}", lb=f"{record['load_balance']:.3f}")
            if progress is not None and rank == 0:
                progress(step + 1, cfg.steps, record)
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == end:
                if rank == 0:
                    save_checkpoint(ckpt, masked, opt, step + 1, cfg,
                                    {"elapsed_s": elapsed + time.time() - t_start, "init": init_info,
                                     "world_size": world})
                _barrier(world)
    finally:
        bar.close()
        if log_file is not None:
            log_file.close()
    return {"steps_done": end, "finished": end == cfg.steps, "tokens_seen": end * cfg.tokens_per_step,
            "train_seconds": elapsed + time.time() - t_start, "last": record, "init": init_info,
            "world_size": world}


def _remove_stale_temporaries(workdir: Path) -> None:
    """Half-written checkpoint folders of a killed run (never read: they were never renamed)."""
    import shutil

    for tmp in workdir.glob(".*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


_RESUMABLE = ("steps", "checkpoint_every", "device")  # settings a resumed run may change


# settings added after conversions had been saved, with the behaviour those conversions had
LEGACY_SETTINGS = {"prior_scale": 3.0, "mask_noise": 1.0, "train_gap": 0.0}


def _check_same_settings(saved: dict, cfg: ConversionConfig, ckpt: Path) -> None:
    defaults = json.loads(json.dumps(asdict(ConversionConfig())))  # tuples as JSON lists, like `saved`
    defaults.update(LEGACY_SETTINGS)  # what a checkpoint saved before a setting existed trained with
    if saved.get("budget_range") is not None:  # saved before budget_sampling existed: the uniform sweep
        defaults["budget_sampling"] = "uniform"
    else:  # a single-budget run samples no budgets, whatever its settings say
        saved = {**saved, "budget_sampling": None}
    now = json.loads(json.dumps(asdict(cfg)))
    diff = {k: (saved.get(k, defaults[k]), v) for k, v in now.items()
            if k not in _RESUMABLE and saved.get(k, defaults[k]) != v}
    if diff:
        hint = ""
        if "train_gap" in diff and "train_gap" not in saved:
            hint = (f"; it was saved before --train-gap existed and trained at the budget: resume it with "
                    f"--train-gap 0 --output {output_of_work_dir(ckpt.parent)}")
        raise CheckpointError(f"checkpoint in {ckpt} was made with other settings {diff}; "
                              f"use the same settings or another output folder{hint}")


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines past the checkpoint we resume from (they were redone)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


def finalize_masks(masked: MaskedModel, budget: float, generate_at: float | None = None) -> tuple[Masks, dict]:
    """Deterministic masks at the budget: global logit shift by bisection, then report.

    generate_at: a conditioned hypernetwork generates the logits for this budget (default: `budget`;
    see generation_budget.anchor_budget) and the shift moves them to `budget`."""
    gen = budget if generate_at is None else generate_at
    raw = masked.deterministic_masks(0.0, gen)
    raw_ratio = float(masked.ratio_of(raw))
    shift = masked.calibrate_shift(budget, generate_at=gen)
    masks = masked.deterministic_masks(shift, gen)
    ratio = float(masked.ratio_of(masks))
    info = {"raw_ratio": raw_ratio, "shift": shift, "ratio": ratio}
    if generate_at is not None:
        info["generated_at"] = generate_at
    return masks, info


def layer_stats(masks: list[torch.Tensor]) -> list[dict]:
    """Per layer: width of every expert and of their union, as fractions of the channels."""
    out = []
    for m in masks:
        size = m.shape[1]
        out.append({"expert_widths": [round(float(w) / size, 4) for w in m.sum(1)],
                    "union": round(float(m.amax(0).sum()) / size, 4)})
    return out
