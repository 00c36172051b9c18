"""Precomputed continuations (`python -m benchmarks.continuations`) for the budget on the slider.

Torch-free: reads the JSON the benchmark wrote (under cache/results/ or shipped with the clone)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Continuations:
    budget: float  # the precomputed budget shown (the nearest to the one asked for)
    exact: bool  # True when it is the budget asked for
    conversion: str
    rows: list[dict]  # per prompt: prompt, dense, moe, first_divergence, mean_kl
    new_tokens: int
    source: str  # result file name


def continuations_at(results: dict[str, dict], budget: float, model: str | None = None,
                     available: set[str] | None = None, tol: float = 1e-6) -> Continuations | None:
    """The continuations of the nearest precomputed budget, from the file of a conversion the user has
    (`available`: conversion folder names; None: any). None when there is no usable file."""
    best = None
    for name, res in sorted(results.items()):
        if res.get("kind") != "continuations" or not isinstance(res.get("budgets"), dict):
            continue
        if (model is not None and res.get("model") != model) or (
                available is not None and res.get("conversion") not in available):
            continue
        for key in res["budgets"]:
            try:
                b = float(key)
            except ValueError:
                continue
            dist = abs(b - budget)
            if best is None or dist < best[0] - tol:
                best = (dist, b, key, name, res)
    if best is None:
        return None
    dist, b, key, name, res = best
    rows = [{"prompt": prompt, "dense": dense, "moe": moe.get("text", ""),
             "first_divergence": moe.get("first_divergence"), "mean_kl": moe.get("mean_kl")}
            for prompt, dense, moe in zip(res.get("prompts", []), res.get("dense", []), res["budgets"][key])]
    return Continuations(b, dist <= 1e-3, str(res.get("conversion")), rows, int(res.get("new_tokens") or 0), name)
