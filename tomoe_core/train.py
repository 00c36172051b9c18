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

import io
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from .hypernet import logistic_noise, straight_through_sigmoid
from .io import atomic_dir, atomic_write_json, sha256_file
from .masked import MaskedModel


@dataclass
class ConversionConfig:
    budget: float = 0.5  # fraction of prunable MLP parameters active per token
    num_experts: int = 8  # experts per layer
    steps: int = 400  # optimiser steps (CPU default: about 30 min for SmolLM2-135M on 2 cores)
    tokens_per_step: int = 512  # calibration tokens per step
    seq_len: int = 256  # tokens per calibration window; batch = tokens_per_step // seq_len
    lr: float = 1e-3
    weight_decay: float = 0.05
    lam: float = 16.0  # budget penalty weight
    union_weight: float = 3.0
    load_balance_weight: float = 1.0
    mask_tau: float = 0.4
    router_tau: float = 0.4
    offset: float = 3.0  # initial mask logit when init == "offset" (paper)
    init: str = "cluster"  # "cluster": routers/experts from k-means of MLP inputs; "offset": paper init
    init_tokens: int = 8192  # calibration tokens for cluster init
    noise_anneal: float = 0.7  # mask noise decays linearly to 0 over this fraction of steps (0: never anneal)
    distill: str = "kl"  # "kl" (forward KL to dense) or "ce" (next-token cross-entropy)
    seed: int = 0
    checkpoint_every: int = 50
    device: str = "cpu"
    model: str = "smollm2-135m"
    text: str = "wiki"

    def __post_init__(self):
        if not 0 < self.budget <= 1:
            raise ValueError(f"budget must be in (0, 1], got {self.budget}")
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be at least 1, got {self.num_experts}")
        if self.steps < 1 or self.tokens_per_step < self.seq_len:
            raise ValueError("steps must be >= 1 and tokens_per_step >= seq_len")
        if self.init not in ("cluster", "offset") or self.distill not in ("kl", "ce"):
            raise ValueError(f"init must be 'cluster' or 'offset' and distill 'kl' or 'ce'")

    @property
    def batch_size(self) -> int:
        return self.tokens_per_step // self.seq_len


def _step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step * 7_919 + 17) % (2 ** 63)


def sample_batch(stream: torch.Tensor, cfg: ConversionConfig, step: int) -> torch.Tensor:
    """Random calibration windows for one step, a pure function of (seed, step). -> (B, T)"""
    g = torch.Generator().manual_seed(_step_seed(cfg.seed, step))
    starts = torch.randint(0, stream.numel() - cfg.seq_len, (cfg.batch_size,), generator=g)
    return torch.stack([stream[s:s + cfg.seq_len] for s in starts.tolist()])


def noise_scale(cfg: ConversionConfig, step: int) -> float:
    if cfg.noise_anneal <= 0:
        return 1.0
    return max(0.0, 1.0 - step / (cfg.noise_anneal * cfg.steps))


def conversion_losses(masked: MaskedModel, ids: torch.Tensor, cfg: ConversionConfig, step: int,
                      autocast_dtype=None) -> dict[str, torch.Tensor]:
    """All loss terms of one step. ids: (B, T) on the model's device."""
    device = ids.device
    gen = torch.Generator().manual_seed(_step_seed(cfg.seed, step) + 1)
    amp = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else _null()
    with torch.no_grad(), amp, masked.dense():
        teacher = masked.model(ids).logits.float()  # (B, T, V)
    scale = noise_scale(cfg, step)
    logits = masked.mask_logits()
    noise = [scale * logistic_noise(z.shape, gen, device) for z in logits] if scale > 0 else None
    train_masks = [straight_through_sigmoid(z if noise is None else z + n, cfg.mask_tau) for z, n in
                   zip(logits, noise or [None] * len(logits))]
    det_masks = [straight_through_sigmoid(z, cfg.mask_tau) for z in logits]
    masked.set_masks(train_masks, train_routing=True)
    for m in masked.mlps:
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
    ratio = masked.ratio_of(det_masks)
    budget = cfg.lam * torch.log(torch.maximum(ratio, torch.tensor(cfg.budget)) /
                                 torch.minimum(ratio, torch.tensor(cfg.budget))).abs()
    union = torch.stack([(1 - torch.prod(1 - m, dim=0)).mean() for m in det_masks]).mean()
    union_loss = cfg.union_weight * -torch.log(union.clamp_min(1e-6))
    lb_terms = []
    for m in masked.mlps:
        frac = m.last_assignment.detach().mean(0)  # (E,) tokens routed to k
        prob = m.last_router_probs.mean(0)  # (E,) mean router probability
        lb_terms.append(m.last_assignment.shape[1] * (frac * prob).sum())
        m.last_assignment = m.last_router_probs = None
    load_balance = torch.stack(lb_terms).mean()
    total = distill + budget + union_loss + cfg.load_balance_weight * load_balance
    return {"loss": total, "distill": distill, "budget_loss": budget, "union_loss": union_loss,
            "load_balance": load_balance, "ratio": ratio.detach(), "union": union.detach(),
            "noise": torch.tensor(scale)}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# -- checkpoints ------------------------------------------------------------------------------
def save_checkpoint(folder: Path, masked: MaskedModel, opt: torch.optim.Optimizer, step: int,
                    cfg: ConversionConfig, extra: dict) -> None:
    with atomic_dir(folder) as tmp:
        save_file(masked.trainable_state(), str(tmp / "trainable.safetensors"))
        buf = io.BytesIO()
        torch.save(opt.state_dict(), buf)
        (tmp / "optimizer.pt").write_bytes(buf.getvalue())
        meta = {"step": step, "config": asdict(cfg), **extra,
                "sha256": {n: sha256_file(tmp / n) for n in ("trainable.safetensors", "optimizer.pt")}}
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
    masked.load_trainable_state({k: v.to(device) for k, v in load_file(str(folder / "trainable.safetensors")).items()})
    opt.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True, map_location=device))
    return meta


# -- the loop -----------------------------------------------------------------------------------
ProgressFn = Callable[[int, int, dict], None]


def train_conversion(masked: MaskedModel, stream: torch.Tensor, cfg: ConversionConfig, workdir: Path,
                     progress: ProgressFn | None = None, show_tqdm: bool = True, stop_after: int | None = None,
                     log=print) -> dict:
    """Train (or resume) a conversion in `workdir`. Returns a summary dict.

    `stop_after`: end after this many steps of this call (to test interruption).
    Writes workdir/checkpoint (every `checkpoint_every` steps and at the end) and
    workdir/log.jsonl (one line of loss terms per step).
    """
    from tqdm.auto import tqdm

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    device = torch.device(cfg.device)
    autocast_dtype = torch.bfloat16 if device.type == "cuda" else None
    opt = torch.optim.AdamW(masked.trainable_parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ckpt = workdir / "checkpoint"
    start, elapsed, init_info = 0, 0.0, {}
    if (ckpt / "state.json").exists():
        meta = load_checkpoint(ckpt, masked, opt)
        saved_cfg = {k: v for k, v in meta["config"].items() if k not in ("steps", "checkpoint_every", "device")}
        now_cfg = {k: v for k, v in asdict(cfg).items() if k not in ("steps", "checkpoint_every", "device")}
        if saved_cfg != now_cfg:
            diff = {k: (saved_cfg.get(k), now_cfg.get(k)) for k in now_cfg if saved_cfg.get(k) != now_cfg.get(k)}
            raise CheckpointError(f"checkpoint in {ckpt} was made with other settings {diff}; "
                                  "use the same settings or another output folder")
        start, elapsed, init_info = meta["step"], meta.get("elapsed_s", 0.0), meta.get("init", {})
        log(f"[tomoe] resuming from step {start}/{cfg.steps}")
    elif cfg.init == "cluster":
        t0 = time.time()
        n = max(1, cfg.init_tokens // cfg.seq_len)
        calib = stream[: n * cfg.seq_len].view(n, cfg.seq_len)
        init_info = masked.cluster_init(calib, cfg.budget, seed=cfg.seed)
        init_info["seconds"] = time.time() - t0
        elapsed += init_info["seconds"]
        log(f"[tomoe] cluster init of {len(masked.mlps)} layers from {n * cfg.seq_len} tokens "
            f"in {init_info['seconds']:.0f} s")
    log_path = workdir / "log.jsonl"
    _truncate_log(log_path, start)
    bar = tqdm(total=cfg.steps, initial=start, desc="convert", disable=not show_tqdm, dynamic_ncols=True)
    end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
    t_start = time.time()
    record = {}
    try:
        with open(log_path, "a") as log_file:
            for step in range(start, end):
                ids = sample_batch(stream, cfg, step).to(device)
                terms = conversion_losses(masked, ids, cfg, step, autocast_dtype)
                opt.zero_grad(set_to_none=True)
                terms["loss"].backward()
                opt.step()
                record = {"step": step + 1, **{k: round(float(v.detach()), 5) for k, v in terms.items()},
                          "elapsed_s": round(elapsed + time.time() - t_start, 2)}
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
                bar.update(1)
                bar.set_postfix(kl=f"{record['distill']:.3f}", r=f"{record['ratio']:.3f}",
                                u=f"{record['union']:.2f}", lb=f"{record['load_balance']:.3f}")
                if progress is not None:
                    progress(step + 1, cfg.steps, record)
                if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == end:
                    save_checkpoint(ckpt, masked, opt, step + 1, cfg,
                                    {"elapsed_s": elapsed + time.time() - t_start, "init": init_info})
    finally:
        bar.close()
    return {"steps_done": end, "finished": end == cfg.steps, "tokens_seen": end * cfg.tokens_per_step,
            "train_seconds": elapsed + time.time() - t_start, "last": record, "init": init_info}


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines past the checkpoint we resume from (they were redone)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


def finalize_masks(masked: MaskedModel, budget: float) -> tuple[list[torch.Tensor], dict]:
    """Deterministic masks at the budget: global logit shift by bisection, then report."""
    raw = masked.deterministic_masks(0.0)
    raw_ratio = float(masked.ratio_of(raw))
    shift = masked.calibrate_shift(budget)
    masks = masked.deterministic_masks(shift)
    ratio = float(masked.ratio_of(masks))
    return masks, {"raw_ratio": raw_ratio, "shift": shift, "ratio": ratio}


def layer_stats(masks: list[torch.Tensor]) -> list[dict]:
    """Per layer: width of every expert and of their union, as fractions of the channels."""
    out = []
    for m in masks:
        size = m.shape[1]
        out.append({"expert_widths": [round(float(w) / size, 4) for w in m.sum(1)],
                    "union": round(float(m.amax(0).sum()) / size, 4)})
    return out
