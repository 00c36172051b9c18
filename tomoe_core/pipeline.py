"""High-level operations shared by the CLI and the studio: convert, evaluate."""
from __future__ import annotations

import contextlib
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from .baselines import activation_stats, baseline_variants
from .budget import account
from .convert import (conversion_digest, load_converted, materialise, materialise_from_recipe, read_metadata,
                      save_converted, save_recipe)
from .data import cache_dir, cached_stream, windows as make_windows
from .evaluate import default_window, evaluate_variants, logits_fn
from .io import atomic_write_bytes, atomic_write_json, file_lock, safe_name
from .masked import MaskedModel
from .models import load_dense
from .train import ConversionConfig, finalize_masks, layer_stats, train_conversion


def machine_info(device: str = "cpu") -> dict:
    info = {"platform": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": str(device)}
    if str(device).startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    return info


def conversions_dir() -> Path:
    return cache_dir() / "conversions"


def default_conversion_name(cfg: ConversionConfig) -> str:
    budget = f"{cfg.budget:g}" if cfg.budget_range is None else "{:g}-{:g}".format(*cfg.budget_range)
    if cfg.budget_range is not None and cfg.budget_sampling != "uniform":
        budget += f"-{cfg.budget_sampling}"
    return safe_name(f"{Path(cfg.model).name}-p{budget}-e{cfg.num_experts}")


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
    return dist.get_rank(), world


def run_conversion(cfg: ConversionConfig, output: Path | None = None, progress=None, show_tqdm=True,
                   log=print, command: str | None = None) -> Path:
    """Train a conversion (resuming if a checkpoint exists), materialise and save it. Returns the folder.

    Under `torchrun --nproc_per_node N` every process trains a DDP replica on its own shard of the
    calibration text; rank 0 writes checkpoints, the log and the converted model.
    """
    output = Path(output) if output else conversions_dir() / default_conversion_name(cfg)
    workdir = output.with_name(output.name + ".work")
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
        summary = train_conversion(masked, stream, cfg, workdir, progress=progress, show_tqdm=show_tqdm, log=log)
        if not summary["finished"] or rank != 0:
            return workdir if not summary["finished"] else output
        masks, calib = finalize_masks(masked, cfg.budget, generate_at=anchor_budget(cfg.budget_range, cfg.budget))
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
        save_converted(moe, output, tokenizer, meta)
        _copy_artefact(workdir / "log.jsonl", output / TRAINING_LOG)
        # the trained hypernetwork + routers stay beside the model: other budgets re-threshold it
        _copy_artefact(workdir / "checkpoint" / "trainable.safetensors", output / HYPERNET_FILE)
        log(f"[tomoe] saved {output}: MLP active ratio {report.mlp_active_ratio:.4f} "
            f"(requested {cfg.budget}), whole model {report.active_ratio_vs_dense:.4f}, "
            f"{summary['tokens_seen']} tokens in {summary['train_seconds'] / 60:.1f} min")
        if cfg.prune_attention:
            log(f"[tomoe] attention pruning: executed active ratio over MLP + q/k/v/o projections "
                f"{report.executed_active_ratio:.4f} (requested {cfg.budget})")
    return output


def mask_stats(masked: MaskedModel, masks: list, budget: float) -> dict:
    """tomoe.json's per-layer mask statistics: MLP expert widths, union and the fraction of (expert,
    channel) entries that differ from the initial prior at `budget` ("layers", with their mean in
    "moved_from_prior": how far training reshaped the experts) and, with attention pruning, the fraction
    of Q/K rotary pairs kept and V/O widths ("attention_layers")."""
    mlp, qk, vo = masked.split_masks(masks)
    out = {"layers": layer_stats(mlp)}
    moved = [float(((m > 0) != (masked.mask_base(l, budget) > 0)).float().mean()) for l, m in enumerate(mlp)]
    for layer, frac in zip(out["layers"], moved):
        layer["moved_from_prior"] = round(frac, 4)
    out["moved_from_prior"] = round(sum(moved) / len(moved), 4)
    if masked.attention is not None:
        out["attention_layers"] = [{"qk_pairs": round(float(q.sum()) / q.numel(), 4), **layer_stats([v])[0]}
                                   for q, v in zip(qk, vo)]
    return out


HYPERNET_FILE = "hypernet.safetensors"
TRAINING_LOG = "training_log.jsonl"


def _copy_artefact(src: Path, dst: Path) -> None:
    """Copy an optional artefact (training log, hypernetwork) atomically when it exists."""
    if src.exists():
        atomic_write_bytes(dst, src.read_bytes())


def budget_source(meta: dict, budget: float) -> str:
    """How a conversion reaches `budget`: "trained" (its own), "conditioned" (inside the range its
    budget-conditioned hypernetwork was trained on) or "threshold-moved" (no training for it)."""
    rng = meta.get("budget_range") or (meta.get("settings") or {}).get("budget_range")
    if rng and rng[0] - 1e-9 <= budget <= rng[1] + 1e-9:
        return "conditioned"
    return "trained" if abs(budget - float(meta["budget"])) < 1e-9 else "threshold-moved"


# How far below the requested budget a conditioned conversion generates its masks before the threshold
# widens them to the budget. Measured on validation windows (`python -m benchmarks.anchor_gap`, README
# "Every budget"): a gap of 0.1 helped at p = 0.7 and hurt at 0.4 and 0.5, so the default generates at
# the budget itself.
DEFAULT_ANCHOR_GAP = 0.0


def anchor_budget(budget_range, budget: float, anchor_gap: float | None = None) -> float | None:
    """The budget a conditioned conversion generates its masks for when materialised at `budget`:
    max(lo, budget - gap), inside the range; None for a single-budget conversion."""
    if budget_range is None:
        return None
    lo, hi = budget_range
    gap = DEFAULT_ANCHOR_GAP if anchor_gap is None else anchor_gap
    if gap < 0:
        raise ValueError(f"anchor gap must be >= 0, got {gap}")
    return min(max(lo, budget - gap), hi)


def materialise_at(conversion: Path, budget: float, device: str = "cpu", layout: str = "decode",
                   dense=None, log=print, anchor_gap: float | None = None):
    """A trained conversion materialised at `budget`, in memory: (model, metadata, seconds).

    A budget-conditioned conversion generates the experts for max(lo, budget - anchor_gap) and a
    threshold shift lands the ratio exactly on `budget` (anchor_gap None: the conversion's
    recommended gap, `DEFAULT_ANCHOR_GAP`; 0: generated at `budget` itself). Any other conversion
    moves its mask threshold (no retraining; labelled "threshold-moved"). `dense`: an already
    loaded dense model to reuse (it is wrapped, so pass a fresh copy or expect it to be consumed).
    """
    from safetensors.torch import load_file

    if not 0 < budget <= 1:
        raise ValueError(f"budget must be in (0, 1], got {budget}")
    conversion = Path(conversion)
    meta = read_metadata(conversion)
    state_path = conversion / HYPERNET_FILE
    if not state_path.exists():
        state_path = conversion.with_name(conversion.name + ".work") / "checkpoint" / "trainable.safetensors"
    if not state_path.exists():
        raise FileNotFoundError(f"{conversion} has no {HYPERNET_FILE} (shipped recipes keep only the final experts); "
                                "re-run its convert command to get one")
    settings = meta["settings"]
    t0 = time.time()
    if dense is None:
        dense, _ = load_dense(meta["model"], device=device, log=log)
    masked = MaskedModel(dense, settings["num_experts"], offset=settings["offset"], seed=settings["seed"],
                         budget_range=settings.get("budget_range"), prune_attention=settings.get("prune_attention", False))
    masked.load_trainable_state({k: v.to(device) for k, v in load_file(str(state_path)).items()})
    masks, calib = finalize_masks(masked, budget, generate_at=anchor_budget(masked.budget_range, budget, anchor_gap))
    moe = materialise(masked, masks, budget)
    moe.set_layout(layout)
    report = account(moe)
    seconds = time.time() - t0
    new_meta = {**{k: v for k, v in meta.items() if k not in ("weights_sha256", "saved_at")},
                "budget": budget, "budget_source": budget_source(meta, budget), "trained_budget": meta["budget"],
                "derived_from": str(conversion), "mask_calibration": calib, **mask_stats(masked, masks, budget),
                "accounting": report.as_dict(), "materialise_seconds": round(seconds, 2)}
    return moe, new_meta, seconds


def rebudget(conversion: Path, budget: float, output: Path | None = None, log=print) -> Path:
    """Materialise a trained conversion at another budget and save it (see `materialise_at`).

    A single-budget conversion is labelled `"budget_source": "threshold-moved"` in its tomoe.json:
    its experts were trained for the original budget, so expect it to be worse than a conversion
    trained at `budget`. A budget-conditioned one inside its range is labelled "conditioned".
    """
    conversion = Path(conversion)
    dense, tokenizer = load_dense(read_metadata(conversion)["model"], log=log)
    moe, new_meta, seconds = materialise_at(conversion, budget, layout="memory", dense=dense, log=log)
    output = Path(output) if output else conversions_dir() / safe_name(f"{conversion.name}-at-p{budget:g}")
    save_converted(moe, output, tokenizer, new_meta)
    log(f"[tomoe] {output}: {new_meta['budget_source']} from p={new_meta['trained_budget']} to p={budget} "
        f"(MLP active ratio {new_meta['accounting']['mlp_active_ratio']:.4f}) in {seconds:.1f} s")
    return output


def run_evaluation(conversion: Path | None, model_name: str | None = None, text: str = "wiki",
                   window: int | None = None, max_windows: int | None = 16, baselines=("magnitude", "wanda-sp"),
                   budget: float | None = None, routing_modes=True, device="cpu", calibration_tokens: int = 16384,
                   progress=None, log=print) -> dict:
    """Dense vs conversion (learned / random / best fixed routing) vs static baselines, same windows."""
    meta = read_metadata(conversion) if conversion else {}
    model_name = model_name or meta.get("model") or "smollm2-135m"
    budget = budget if budget is not None else meta.get("budget", 0.5)
    dense, tokenizer = load_dense(model_name, device=device, log=log)
    tag = safe_name(Path(model_name).name)
    window = window or default_window(dense)
    held = make_windows(cached_stream(tokenizer, text, "heldout", None, tag), window, max_windows)
    masked = MaskedModel(dense, num_experts=1)
    variants = {}
    if conversion:
        moe, _, _ = load_converted(conversion, device=device, layout="prefill", load_tokenizer=False)
        variants["tomoe"] = logits_fn(moe, lambda: moe.set_routing(None))
        if routing_modes:
            gen = torch.Generator()
            variants["tomoe-random"] = logits_fn(moe, lambda: (gen.manual_seed(0), moe.set_routing("random", gen)))
            best = _best_fixed_expert(moe, held[:2], device)
            variants[f"tomoe-fixed-{best}"] = logits_fn(moe, lambda: moe.set_routing(best))
    stats = None
    if baselines:
        calib_stream = cached_stream(tokenizer, text, "calibration", None, tag)
        seq = min(512, window)
        stats = activation_stats(masked, make_windows(calib_stream, seq, max(1, calibration_tokens // seq)))
    for method, (fn, _ratio) in baseline_variants(masked, baselines, budget, stats, held[:1, :64]).items():
        variants[method] = fn
    dense_fn = logits_fn(masked, lambda: masked.set_masks(None))
    t0 = time.time()
    results = evaluate_variants(dense_fn, variants, held, device=device, progress=progress)
    out = {
        "kind": "quality", "model": model_name, "conversion": str(conversion) if conversion else None,
        "conversion_digest": conversion_digest(meta) if meta else None, "budget": budget,
        "text": f"{text} (held-out split)", "window": window, "windows": int(held.shape[0]),
        "tokens": int(held.numel()), "machine": machine_info(device), "seconds": round(time.time() - t0, 1),
        "results": {k: v.as_dict() for k, v in results.items()},
    }
    if meta:
        out["budget_source"] = meta.get("budget_source", "trained")
        out["derived_from"] = meta.get("derived_from")  # a rebudgeted copy: the conversion it came from
        out["layers"] = meta.get("layers")
        out["accounting"] = meta.get("accounting")
    return out


@torch.no_grad()
def _best_fixed_expert(moe, windows: torch.Tensor, device) -> int:
    """The single expert (same index in every layer) with the lowest NLL on a few windows."""
    losses = []
    for k in range(moe.config.num_experts):
        moe.set_routing(k)
        nll = 0.0
        for row in windows:
            ids = row.unsqueeze(0).to(device)
            logits = moe(input_ids=ids).logits[0, :-1].float()
            nll += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        losses.append(nll)
    moe.set_routing(None)
    return int(torch.tensor(losses).argmin())


def save_result(result: dict, name: str) -> Path:
    path = cache_dir() / "results" / f"{safe_name(name)}.json"
    atomic_write_json(path, result)
    return path


def format_quality_table(result: dict) -> str:
    lines = [f"model {result['model']}, text {result['text']}, {result['windows']} windows x {result['window']} "
             f"tokens, budget {result['budget']}, machine: {result['machine']['platform']} "
             f"({result['machine']['cpu_count']} CPUs, {result['machine']['device']})",
             f"{'variant':<16}{'perplexity':>12}{'KL':>10}{'top-1 agr':>11}"]
    for name, r in result["results"].items():
        lines.append(f"{name:<16}{r['perplexity']:>12.2f}{r['kl_to_dense']:>10.4f}{r['top1_agreement']:>11.4f}")
    return "\n".join(lines)


def shipped_dir() -> Path:
    """Recipes committed to git so a fresh clone has a conversion to explore (cache/shipped/)."""
    return Path(__file__).resolve().parent.parent / "cache" / "shipped"


def ensure_shipped_conversions(log=print) -> list[Path]:
    """Materialise every shipped recipe into cache/conversions/ if it is not there yet (seconds)."""
    out = []
    for recipe in sorted(p for p in shipped_dir().glob("*") if (p / "tomoe.json").exists()):
        target = conversions_dir() / recipe.name
        with file_lock(target):
            if not (target / "tomoe.json").exists():
                meta = read_metadata(recipe)
                dense, tokenizer = load_dense(meta["model"], log=log)
                moe = materialise_from_recipe(recipe, dense)
                meta = {**meta, "rebuilt_from_recipe": str(recipe.relative_to(shipped_dir().parent.parent))}
                meta.pop("recipe_sha256", None)
                save_converted(moe, target, tokenizer, meta)
                _copy_artefact(recipe / TRAINING_LOG, target / TRAINING_LOG)
                log(f"[tomoe] materialised shipped conversion {recipe.name} into {target}")
        out.append(target)
    return out


def ship_conversion(conversion: Path, name: str | None = None) -> Path:
    """Copy a conversion's recipe (routers + index lists, no dense weights) into cache/shipped/."""
    model, _tok, meta = load_converted(conversion, layout="memory", load_tokenizer=False)
    target = shipped_dir() / (name or Path(conversion).name)
    save_recipe(model, target, meta)
    _copy_artefact(Path(conversion) / TRAINING_LOG, target / TRAINING_LOG)
    return target
