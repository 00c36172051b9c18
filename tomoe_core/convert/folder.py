"""A conversion folder, opened through one object: `Conversion`. Torch-free.

The folder rules live here once, for the command line, the studio (whose landing page must not
load torch) and the benchmarks:

  <name>/                       the conversion (`Conversion.path`)
    tomoe.json                  its metadata (`Conversion.meta`)
    model.safetensors           the materialised weights (or model.safetensors.index.json and shards);
                                a shipped recipe has none and is rebuilt from the dense model
    hypernet.safetensors        a trained conversion's hypernetwork and routers (other budgets)
    training_log.jsonl          the training log, copied from the work folder
  <name>.work/                  the run's work folder while it trains (`Conversion.work_dir`)
    checkpoint/                 the resumable checkpoint (trainable.safetensors, optimizer.pt, state.json)
    log.jsonl                   one line of loss terms per step (a job's live progress)

A folder that cannot be read becomes a `Problem` in `list_conversions`, never an exception.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Collection

from ..infra.workspace import safe_name
from ..infra.locations import cache_dir
from ..moe.metadata import METADATA_FILE
from .generation_budget import default_train_gap

HYPERNET_FILE = "hypernet.safetensors"
TRAINING_LOG = "training_log.jsonl"
# a materialised conversion holds one of these (save_pretrained shards big models behind an index)
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
WORK_SUFFIX = ".work"
CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_STATE = "trainable.safetensors"  # the checkpoint's hypernetwork and routers
PROGRESS_LOG = "log.jsonl"


class ConversionError(ValueError):
    """A folder that is not a readable conversion (no tomoe.json, or a corrupt one)."""


@dataclass(frozen=True)
class Problem:
    path: str
    message: str


def read_json(path: Path) -> tuple[dict | None, Problem | None]:
    """(the JSON object in `path`, None), or (None, the Problem to show) if it is missing or unreadable."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, Problem(str(path), "file is missing")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return None, Problem(str(path), f"cannot be read ({err.__class__.__name__}: {err}); it is corrupt or "
                                        "half-written: rerun the command that made it, or delete it")
    if not isinstance(data, dict):
        return None, Problem(str(path), "is not a JSON object; rerun the command that made it")
    return data, None


def conversions_dir() -> Path:
    """Where conversions are made: cache/conversions (TOMOE_CACHE moves the cache)."""
    return cache_dir() / "conversions"


def work_dir_of(output: Path) -> Path:
    """The work folder (checkpoint, live log) of the conversion that will be saved in `output`."""
    output = Path(output)
    return output.with_name(output.name + WORK_SUFFIX)


def output_of_work_dir(work_dir: Path) -> Path:
    """The conversion folder a work folder trains for (the inverse of `work_dir_of`)."""
    work_dir = Path(work_dir)
    return work_dir.with_name(work_dir.name.removesuffix(WORK_SUFFIX))


def default_conversion_name(cfg) -> str:
    """MODEL-pBUDGET-eEXPERTS for a `ConversionConfig` (or anything with its fields); a budget range
    reads LO-HI[-SAMPLING], a train gap other than the default adds -fromTRAIN_BUDGET."""
    budget = f"{cfg.budget:g}" if cfg.budget_range is None else "{:g}-{:g}".format(*cfg.budget_range)
    if cfg.budget_range is not None and cfg.budget_sampling != "uniform":
        budget += f"-{cfg.budget_sampling}"
    if cfg.train_gap != default_train_gap(cfg.budget, cfg.budget_range, cfg.prune_attention):
        budget += f"-from{cfg.train_budget:g}"
    return safe_name(f"{Path(cfg.model).name}-p{budget}-e{cfg.num_experts}")


@dataclass
class Conversion:
    """A conversion folder. `Conversion(path)` knows its files; `Conversion.open(path)` also reads tomoe.json."""
    path: Path
    meta: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.path = Path(self.path)

    @classmethod
    def open(cls, path: str | Path) -> Conversion:
        """The conversion in `path`, its tomoe.json read; ConversionError if it has none or cannot read it."""
        path = Path(path)
        if not (path / METADATA_FILE).exists():
            raise ConversionError(f"{path} is not a converted ToMoE model (no {METADATA_FILE})")
        meta, problem = read_json(path / METADATA_FILE)
        if problem:
            raise ConversionError(f"{problem.path} {problem.message}")
        return cls(path, meta)

    # -- files ---------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.path.name

    @property
    def metadata_path(self) -> Path:
        return self.path / METADATA_FILE

    @property
    def work_dir(self) -> Path:
        return work_dir_of(self.path)

    @property
    def checkpoint_dir(self) -> Path:
        return self.work_dir / CHECKPOINT_DIR

    @property
    def training_log(self) -> Path:
        """The training log saved beside the model."""
        return self.path / TRAINING_LOG

    @property
    def progress_log(self) -> Path:
        """The log a running conversion appends to, one line per step (in the work folder)."""
        return self.work_dir / PROGRESS_LOG

    @property
    def hypernet_path(self) -> Path | None:
        """The trained hypernetwork and routers: the folder's hypernet.safetensors, else the work folder's
        checkpoint; None if neither exists (a shipped single-budget recipe keeps only the final experts)."""
        for path in (self.path / HYPERNET_FILE, self.checkpoint_dir / CHECKPOINT_STATE):
            if path.exists():
                return path
        return None

    def require_hypernet_path(self) -> Path:
        """`hypernet_path`, or FileNotFoundError saying how to get one."""
        path = self.hypernet_path
        if path is None:
            raise FileNotFoundError(f"{self.path} has no {HYPERNET_FILE} (shipped recipes keep only the final "
                                    "experts); re-run its convert command to get one")
        return path

    @property
    def materialised(self) -> bool:
        """Whether the weights are here (False: a shipped recipe, rebuilt from the dense model on first use)."""
        return any((self.path / f).exists() for f in WEIGHT_FILES)

    @property
    def is_recipe(self) -> bool:
        return not self.materialised

    @property
    def is_conditioned_recipe(self) -> bool:
        """A shipped budget-conditioned conversion: its hypernetwork and routers, no dense weights."""
        return (self.path / HYPERNET_FILE).exists() and not (self.path / WEIGHT_FILES[0]).exists()

    # -- metadata ------------------------------------------------------------------------------
    @property
    def budget(self) -> float | None:
        return self.meta.get("budget")

    @property
    def model(self) -> str:
        return str(self.meta.get("model", "?"))

    @property
    def accounting(self) -> dict | None:
        return self.meta.get("accounting")

    @property
    def budget_range(self) -> tuple[float, float] | None:
        """(lo, hi) of a budget-conditioned conversion: it materialises at any budget inside in seconds."""
        rng = self.meta.get("budget_range")
        return (float(rng[0]), float(rng[1])) if rng else None

    @property
    def is_conditioned(self) -> bool:
        """Trained budget-conditioned (not a copy materialised from one at another budget)."""
        return bool(self.meta.get("budget_range")) and not self.meta.get("derived_from")


def list_conversions(root: Path | None = None, model: str | None = None, require_weights: bool = True,
                     ignore: Collection[str] = ()) -> tuple[list[Conversion], list[Problem]]:
    """The conversions in `root` (default cache/conversions), sorted by name, and the Problems of the
    folders that are not readable conversions.

    Skipped: hidden folders, work folders (*.work) and the names in `ignore`. A non-empty folder without
    tomoe.json, an unreadable tomoe.json and (require_weights) a folder without weights are Problems.
    `model`: only the conversions of that dense model (problems are reported whatever the model).
    """
    root = Path(root) if root is not None else conversions_dir()
    found: list[Conversion] = []
    problems: list[Problem] = []
    if not root.is_dir():
        return found, problems
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if folder.name.endswith(WORK_SUFFIX) or folder.name in ignore:
            continue
        meta_path = folder / METADATA_FILE
        if not meta_path.exists():
            if any(folder.iterdir()):
                problems.append(Problem(str(folder), f"has no {METADATA_FILE}: not a finished conversion"))
            continue
        meta, problem = read_json(meta_path)
        if problem:
            problems.append(problem)
            continue
        conversion = Conversion(folder, meta)
        if require_weights and not conversion.materialised:
            problems.append(Problem(str(folder), f"has {METADATA_FILE} but no model.safetensors "
                                    "(or sharded index): incomplete"))
            continue
        if model is None or meta.get("model") == model:
            found.append(conversion)
    return found, problems
