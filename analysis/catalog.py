"""What is on disk: conversions (materialised or shipped as recipes) and result files.

Reads JSON only, without importing torch or `tomoe_core` (that import costs about 6 s on
the 2-core machines here), so the studio's landing page renders fast. A file that cannot
be read becomes a `Problem` for the page to show, never an exception.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
# a materialised conversion holds one of these (save_pretrained shards big models behind an index)
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


def cache_root() -> Path:
    """Same rule as `tomoe_core.data.cache_dir` (a test keeps them equal): TOMOE_CACHE or <repo>/cache."""
    root = os.environ.get("TOMOE_CACHE")
    return Path(root) if root else REPO_ROOT / "cache"


def shipped_root() -> Path:
    """Recipes and results committed to git; the same rule as `tomoe_core.data.shipped_dir` (a test keeps
    them equal): TOMOE_SHIPPED or <repo>/cache/shipped (tests use an empty folder so the real model stays out)."""
    root = os.environ.get("TOMOE_SHIPPED")
    return Path(root) if root else REPO_ROOT / "cache" / "shipped"


@dataclass(frozen=True)
class Problem:
    path: str
    message: str


@dataclass
class Conversion:
    name: str
    path: Path
    meta: dict
    materialised: bool  # False: a shipped recipe, rebuilt from the dense model on first use

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

    def budget_source(self) -> str:
        """How the conversion reached its budget, in words."""
        settings = self.meta.get("settings") or {}
        if self.budget_range:
            return (f"conditioned on {self.budget_range[0]:g}..{self.budget_range[1]:g} "
                    f"({settings.get('budget_sampling') or 'uniform'} sampling)")
        source = self.meta.get("budget_source", "trained")
        trained_at = self.meta.get("train_budget")
        if source == "trained" and trained_at is not None:
            return f"trained at {float(trained_at):g}, widened to {self.budget:g}"
        return source

    def summary(self) -> dict:
        acc = self.accounting or {}
        settings = self.meta.get("settings") or {}
        return {
            "name": self.name, "model": self.model, "budget": self.budget,
            "budget source": self.budget_source(),
            "experts": self.meta.get("num_experts"), "steps": settings.get("steps"),
            "tokens seen": self.meta.get("tokens_seen"), "train minutes": _minutes(self.meta.get("train_seconds")),
            "MLP active ratio": acc.get("mlp_active_ratio"), "active ratio vs dense": acc.get("active_ratio_vs_dense"),
            "state": "ready" if self.materialised else "recipe (rebuilt on first use)",
            "saved": self.meta.get("saved_at"), "path": str(self.path),
        }


def _minutes(seconds) -> float | None:
    return None if seconds is None else round(float(seconds) / 60, 1)


def read_json(path: Path) -> tuple[dict | None, Problem | None]:
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


def list_conversions(conversions: Path | None = None, shipped: Path | None = None
                     ) -> tuple[list[Conversion], list[Problem]]:
    """Materialised conversions under cache/conversions plus shipped recipes not yet materialised."""
    conversions = conversions or cache_root() / "conversions"
    shipped = shipped or shipped_root()
    found: dict[str, Conversion] = {}
    problems: list[Problem] = []
    for root, materialised in ((conversions, True), (shipped, False)):
        if not root.is_dir():
            continue
        for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if folder.name.endswith(".work") or folder.name in found or (not materialised and folder.name == "results"):
                continue
            meta_path = folder / "tomoe.json"
            if not meta_path.exists():
                if any(folder.iterdir()):
                    problems.append(Problem(str(folder), "has no tomoe.json: not a finished conversion"))
                continue
            meta, problem = read_json(meta_path)
            if problem:
                problems.append(problem)
                continue
            if materialised and not any((folder / f).exists() for f in WEIGHT_FILES):
                problems.append(Problem(str(folder), "has tomoe.json but no model.safetensors "
                                        "(or sharded index): incomplete"))
                continue
            found[folder.name] = Conversion(folder.name, folder, meta, materialised)
    return list(found.values()), problems


def list_results(results: Path | None = None, shipped: Path | None = None) -> tuple[dict[str, dict], list[Problem]]:
    """Every JSON file under cache/results, by file name, plus the measurements committed under
    cache/shipped/results/ (so a fresh clone shows real numbers); a local file of the same name wins."""
    results = results or cache_root() / "results"
    shipped = shipped or shipped_root() / "results"
    out, problems = {}, []
    for folder, prefix in ((results, ""), (shipped, "shipped/")):
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob("*.json")):
            if path.name in out or f"shipped/{path.name}" in out:
                continue
            data, problem = read_json(path)
            if problem:
                problems.append(problem)
            else:
                out[prefix + path.name] = data
    return out, problems


def read_jsonl_tail(path: Path, max_bytes: int = 65536) -> list[dict]:
    """Records of the last `max_bytes` of a JSON-lines log; a half-written last line is skipped."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            chunk = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    lines = chunk.splitlines()
    if size > max_bytes:
        lines = lines[1:]  # the first line is probably cut
    out = []
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


@dataclass
class Catalog:
    """Everything the budget explorer needs, read in one pass."""
    conversions: list[Conversion] = field(default_factory=list)
    results: dict[str, dict] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)


def read_catalog() -> Catalog:
    conversions, p1 = list_conversions()
    results, p2 = list_results()
    return Catalog(conversions, results, p1 + p2)
