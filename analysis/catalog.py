"""What is on disk: conversions (materialised or shipped as recipes) and result files.

Reads JSON only, without importing torch: the folder rules are `tomoe_core.convert.folder`'s and the cache
folders `tomoe_core.text.sources`'s, both torch-free (the engine's torch modules cost about 6 s on the 2-core
machines here), so the studio's landing page renders fast. A file that cannot be read becomes a
`Problem` for the page to show, never an exception.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from tomoe_core.convert import folder as _conversion
from tomoe_core.convert.folder import WEIGHT_FILES, Problem, read_json
from tomoe_core.infra.locations import cache_dir as cache_root
from tomoe_core.infra.locations import shipped_dir as shipped_root

REPO_ROOT = Path(__file__).resolve().parent.parent


class Conversion(_conversion.Conversion):
    """A conversion as the studio shows it: `tomoe_core.convert.folder.Conversion` and its summary row."""

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


def list_conversions(conversions: Path | None = None, shipped: Path | None = None
                     ) -> tuple[list[Conversion], list[Problem]]:
    """Materialised conversions under cache/conversions plus shipped recipes not yet materialised (a
    conversion of the same name hides its recipe); the rules of `tomoe_core.convert.folder.list_conversions`."""
    found, problems = _conversion.list_conversions(conversions or cache_root() / "conversions")
    recipes, more = _conversion.list_conversions(shipped or shipped_root(), require_weights=False,
                                                 ignore={"results", "routing", *(c.name for c in found)})
    return [Conversion(c.path, c.meta) for c in found + recipes], problems + more


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
