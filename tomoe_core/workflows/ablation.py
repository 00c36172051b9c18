"""The expert-ablation job (`python -m tomoe_core ablate RUN`): find the conversion that wrote a
routing log, load it at the log's budget and run `tomoe_core.trace.ablation` over the log's text."""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from ..convert.folder import Conversion, conversions_dir
from ..infra.locations import shipped_dir
from ..infra.machine import machine_info
from ..trace.ablation import REPLACEMENTS, AblationError, default_max_tokens, plan_ablation, run_ablation
from ..trace.routing_log import read_run_meta

logger = logging.getLogger(__name__)  # diagnostics; the CLI shows them on stderr


def conversion_for_run(run, conversion: str | Path | None = None) -> Path:
    """The conversion folder that wrote `run`: `conversion` if given, else the one named in its
    run.json, else one of the same name under cache/conversions or cache/shipped (a fresh clone
    has the shipped recipe, not the folder the log was traced with)."""
    if conversion is not None:
        path = Path(conversion)
        if not path.is_dir():
            raise AblationError(f"conversion folder {str(path)!r} does not exist")
        return path
    recorded = Path(read_run_meta(run).get("conversion") or "")
    for candidate in (recorded, conversions_dir() / recorded.name, shipped_dir() / recorded.name):
        if recorded.name and candidate.is_dir():
            return candidate
    raise AblationError(f"the conversion that wrote run {run} ({recorded}) is not on this machine: pass --conversion")


def load_run_model(run, conversion: str | Path | None = None, device: str = "cpu", log=logger.info):
    """The log's conversion at the log's budget, laid out for long windows. -> (model, conversion path)"""
    from ..convert.materialise import load_converted
    from .rebudget import materialise_at

    path = conversion_for_run(run, conversion)
    meta = read_run_meta(run)
    folder = Conversion.open(path)
    if folder.materialised and (folder.budget is None or abs(folder.budget - float(meta["budget"])) < 1e-6):
        model, _, _ = load_converted(path, device=device, layout="prefill", load_tokenizer=False)
    elif folder.is_conditioned_recipe or folder.hypernet_path is not None:
        log(f"[ablate] materialising {path} at p = {meta['budget']}")
        model, _, _ = materialise_at(path, float(meta["budget"]), device=device, layout="prefill", log=log)
    else:
        raise AblationError(f"{path} is at p = {folder.budget}, the log at p = {meta['budget']}, and it has no "
                            "hypernetwork to materialise another budget: pass the conversion that wrote the log")
    return model, path


def ablate(run, conversion: str | Path | None = None, layers: Sequence[int] | None = None,
           experts: Sequence[int] | None = None, replacements: Sequence[str] = REPLACEMENTS,
           max_tokens: int | None = None, seed: int = 0, device: str = "cpu",
           progress: Callable[[int, int], None] | None = None, log=logger.info, command: str | None = None,
           effect: str = "total") -> Path:
    """Plan (refusing bad layers or experts before any loading), state the cost, load, ablate.
    `max_tokens` None: the effect's default (`default_max_tokens`)."""
    max_tokens = default_max_tokens(effect) if max_tokens is None else max_tokens
    plan = plan_ablation(run, layers, experts, replacements, seed=seed, max_tokens=max_tokens, effect=effect)
    conversion_for_run(run, conversion)  # a missing conversion fails before the cost is paid
    log(f"[ablate] {plan.cost()}")
    t0 = time.time()
    model, path = load_run_model(run, conversion, device=device, log=log)
    info = {"conversion": str(path), "load_seconds": round(time.time() - t0, 1), "machine": machine_info(device),
            "command": command or " ".join(["python -m tomoe_core ablate", *sys.argv[2:]])}
    return run_ablation(model, plan, progress=progress, info=info)
