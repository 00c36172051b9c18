"""The speed and memory cards: rows of one speed benchmark file, read at any budget.

A file of `python -m benchmarks.speed` (or `benchmarks.gpu_speed`) measured dense and every budget in
one run under one protocol; the cards read one such file, never a mix. Between measured budgets a
value is interpolated (linear in p); outside the measured range it is a labelled estimate
(`curve_value`). Nothing here loads a network.
"""
from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

# -- speed results -------------------------------------------------------------------------------

# The files `python -m benchmarks.speed` (and `benchmarks.gpu_speed`) write: one per machine, dense and
# every budget measured in one run under one protocol. The cards read one of these, never a mix.
SPEED_FILES = ("speed_benchmark.json", "speed_benchmark-cuda.json")
SPEED_COLUMNS = ["model", "machine", "layout", "threads", "batch", "budget", "decode_tokens_per_s",
                 "decode_speedup", "decode_speedup_iqr", "prefill_tokens_per_s", "prefill_speedup", "prefill_speedup_iqr",
                 "peak_memory_mb", "peak_memory_kind", "source"]


def speed_sources(results: dict[str, dict]) -> list[str]:
    """Names of the speed benchmark files among `results` (local before shipped, as `list_results` keys them)."""
    names = [n for n, r in results.items() if r.get("kind") == "speed" and n.rsplit("/", 1)[-1] in SPEED_FILES]
    return sorted(names, key=lambda n: (n.startswith("shipped/"), SPEED_FILES.index(n.rsplit("/", 1)[-1])))


def speed_rows(results: dict[str, dict], source: str | None = None) -> pd.DataFrame:
    """Measured rows of one speed benchmark file (`source`, default the first of `speed_sources`)."""
    sources = speed_sources(results)
    source = source if source in sources else (sources[0] if sources else None)
    rows = []
    res = results.get(source) or {}
    machine = res.get("machine") or {}
    settings_threads = (res.get("settings") or {}).get("threads")
    for r in res.get("rows") or []:
        if r.get("method") not in (None, "dense", "tomoe"):  # baselines: `method_speed_rows`
            continue
        threads = r.get("threads") or (settings_threads if isinstance(settings_threads, int) else None) \
            or machine.get("torch_threads")
        rows.append({"model": str(res.get("model")), "machine": _machine_label(machine, res.get("dtype")),
                     "layout": r.get("layout") or "dense", "threads": threads, "batch": r.get("batch", 1),
                     "budget": r.get("budget"), "decode_tokens_per_s": r.get("decode_tokens_per_s"),
                     "decode_speedup": r.get("decode_speedup"), "decode_speedup_iqr": r.get("decode_speedup_iqr"),
                     "prefill_tokens_per_s": r.get("prefill_tokens_per_s"), "prefill_speedup": r.get("prefill_speedup"),
                     "prefill_speedup_iqr": r.get("prefill_speedup_iqr"), "peak_memory_mb": r.get("peak_memory_mb"),
                     "peak_memory_kind": r.get("peak_memory_kind"), "source": source})
    return pd.DataFrame(rows, columns=SPEED_COLUMNS)


METHOD_COLUMNS = ["method", "layout", "threads", "batch", "budget", "decode_tokens_per_s", "decode_speedup",
                  "decode_speedup_iqr", "prefill_tokens_per_s", "prefill_speedup", "prefill_speedup_iqr", "machine",
                  "source", "model"]


def method_speed_rows(results: dict[str, dict], source: str | None = None) -> pd.DataFrame:
    """Every method's rows of one speed file (dense, ToMoE by layout, and the baselines the file timed:
    teal, wanda-sp, flap), for quality at equal speed. Columns: METHOD_COLUMNS."""
    sources = speed_sources(results)
    source = source if source in sources else (sources[0] if sources else None)
    res = results.get(source) or {}
    machine_info = res.get("machine") or {}
    machine = _machine_label(machine_info, res.get("dtype"))
    settings_threads = (res.get("settings") or {}).get("threads")
    rows = []
    for r in res.get("rows") or []:
        method = r.get("method") or ("tomoe" if r.get("layout") else "dense")
        threads = r.get("threads") or (settings_threads if isinstance(settings_threads, int) else None) \
            or machine_info.get("torch_threads")  # as `speed_rows`: the cards' thread choice matches
        rows.append({"method": method, "layout": r.get("layout"), "threads": threads, "batch": r.get("batch", 1),
                     "budget": r.get("budget"), **{k: r.get(k) for k in METHOD_COLUMNS[5:11]},
                     "machine": machine, "source": source, "model": str(res.get("model"))})
    return pd.DataFrame(rows, columns=METHOD_COLUMNS)


def _machine_label(machine: dict, dtype: str | None = None) -> str:
    if machine.get("gpu"):
        label = str(machine["gpu"])
    elif machine.get("cpu_count"):
        model = machine.get("cpu_model") or "CPU model not recorded"
        label = f"{model}, {machine['cpu_count']} cores"
    else:
        label = str(machine.get("platform", "unknown machine"))
    return f"{label}, {dtype}" if dtype else label


def speed_choices(speed: pd.DataFrame) -> dict[str, list]:
    """The layouts (dense excluded), thread counts and batch sizes a speed file measured."""
    if speed is None or speed.empty:
        return {"layouts": [], "threads": [], "batches": []}
    layouts = [lay for lay in dict.fromkeys(speed["layout"]) if lay != "dense"]
    return {"layouts": layouts, "threads": sorted(int(t) for t in speed["threads"].dropna().unique()),
            "batches": sorted(int(b) for b in speed["batch"].dropna().unique())}


@dataclass
class CurveValue:
    value: float | None
    status: str  # "dense", "measured", "interpolated", "estimate" or "missing"
    how: str  # in words: which measurements gave the value


def curve_value(points: list[tuple[float, float]], dense: float | None, budget: float,
                tol: float = 0.011) -> CurveValue:
    """A quantity measured at some budgets (and for dense at p = 1) read at `budget`: dense at p = 1,
    measured within `tol`, linear between measured budgets ("interpolated"), and outside the measured
    range an "estimate": linear through the two nearest points, dense counting as p = 1 (so between the
    highest measured budget and 1 it moves towards dense). Never a neighbour's value as this budget's."""
    pts = sorted((float(b), float(v)) for b, v in points if b is not None and v is not None and not pd.isna(v))
    if budget >= 1.0 - 1e-9:
        return CurveValue(dense, "dense", "the dense model") if dense is not None else \
            CurveValue(None, "missing", "dense not measured")
    if not pts:
        return CurveValue(None, "missing", "no measurement of this layout")
    near = min(pts, key=lambda bv: abs(bv[0] - budget))
    if abs(near[0] - budget) <= tol:
        return CurveValue(near[1], "measured", f"measured at p = {near[0]:g}")
    lo, hi = pts[0][0], pts[-1][0]
    if lo < budget < hi:
        a = max(bv for bv in pts if bv[0] < budget)
        b = min(bv for bv in pts if bv[0] > budget)
        return CurveValue(_line(a, b, budget), "interpolated", f"interpolated between measured p = {a[0]:g} and {b[0]:g}")
    span = f"p = {lo:g}" if lo == hi else f"p = {lo:g}-{hi:g}"
    anchors = pts + ([(1.0, float(dense))] if dense is not None else [])
    if len(anchors) < 2:
        return CurveValue(None, "missing", f"outside the measured range ({span}) and nothing to estimate from")
    a, b = (anchors[0], anchors[1]) if budget < lo else (anchors[-2], anchors[-1])
    value = max(_line(a, b, budget), 0.05 * min(abs(a[1]), abs(b[1])))
    through = "dense (p = 1)" if b[0] == 1.0 and dense is not None else f"p = {b[0]:g}"
    return CurveValue(value, "estimate", f"estimate outside the measured range ({span}): linear through "
                                         f"p = {a[0]:g} and {through}")


def _line(a: tuple[float, float], b: tuple[float, float], x: float) -> float:
    t = (x - a[0]) / (b[0] - a[0])
    return (1 - t) * a[1] + t * b[1]


@dataclass
class SpeedAtBudget:
    tokens_per_s: CurveValue
    memory_mb: CurveValue
    dense_tokens_per_s: float | None
    dense_memory_mb: float | None
    setting: str  # machine, layout, threads, batch, file
    speedup_iqr: list | None = None  # [q1, q3] of the paired per-repeat speed ratios to dense, where measured
    memory_kind: str | None = None  # what the peak memory is (peak RSS of a fresh process ...)
    speedup: float | None = None  # median of the paired per-repeat ratios to dense, where measured: THE figure
    within_noise_of: list | None = None  # measured budgets whose speed-ratio IQR overlaps this one's

    def speed_ratio(self) -> float | None:
        """The speed ratio to dense the studio quotes everywhere (card delta, tooltip): the paired median
        where this budget was measured, else tokens/s over dense tokens/s of the curve."""
        if self.speedup is not None:
            return self.speedup
        if self.tokens_per_s.value is None or not self.dense_tokens_per_s:
            return None
        return self.tokens_per_s.value / self.dense_tokens_per_s


def speed_at_budget(speed: pd.DataFrame, budget: float, layout: str, threads: int | None, batch: int,
                    tol: float = 0.011) -> SpeedAtBudget:
    """Greedy-decode tokens/s (all sequences of the batch) and peak memory of one layout at one thread count
    and batch size, from one speed file (`speed_rows`), at any budget (`curve_value`). Peak memory was
    measured once per variant and batch (the benchmark's first thread count): it is taken from any
    thread count's row."""
    sel = speed[(speed["batch"].fillna(1).astype(int) == int(batch))]
    at_threads = sel if threads is None else sel[sel["threads"] == threads]
    dense_t = at_threads[at_threads["layout"] == "dense"]["decode_tokens_per_s"].dropna()
    dense_m = sel[sel["layout"] == "dense"]["peak_memory_mb"].dropna()
    conv = at_threads[at_threads["layout"] == layout]
    mem = sel[sel["layout"] == layout].dropna(subset=["peak_memory_mb"]).drop_duplicates("budget")
    dense_tps = float(dense_t.iloc[0]) if not dense_t.empty else None
    dense_mb = float(dense_m.iloc[0]) if not dense_m.empty else None
    tps = curve_value(list(zip(conv["budget"], conv["decode_tokens_per_s"])), dense_tps, budget, tol)
    memory = curve_value(list(zip(mem["budget"], mem["peak_memory_mb"])), dense_mb, budget, tol)
    machine = speed["machine"].iloc[0] if not speed.empty else "?"
    source = speed["source"].iloc[0] if not speed.empty else "?"
    thread_words = "" if threads is None else f", {threads} thread{'s' if threads != 1 else ''}"
    setting = f"{machine}, {layout} layout{thread_words}, batch {batch}; {source}"
    speedup, iqr, noise = _paired(conv, budget, tol, "decode") if tps.status == "measured" else (None, None, None)
    kinds = sel["peak_memory_kind"].dropna()
    return SpeedAtBudget(tps, memory, dense_tps, dense_mb, setting, iqr, str(kinds.iloc[0]) if not kinds.empty else None,
                         speedup, noise)


def _paired(rows: pd.DataFrame, budget: float, tol: float, what: str) -> tuple:
    """(paired median ratio to dense, its IQR, measured budgets whose IQR overlaps it) of `what`
    ("decode" or "prefill") at a measured budget, from one layout's rows."""
    at = rows[(rows["budget"] - budget).abs() <= tol]
    if at.empty:
        return None, None, None
    value, iqr = at[f"{what}_speedup"].iloc[0], at[f"{what}_speedup_iqr"].iloc[0]
    speedup = float(value) if value is not None and not pd.isna(value) else None
    iqr = list(iqr) if isinstance(iqr, (list, tuple)) else None
    noise = None
    if iqr is not None:
        noise = sorted(float(b) for b, other in zip(rows["budget"], rows[f"{what}_speedup_iqr"])
                       if abs(b - budget) > tol and isinstance(other, (list, tuple))
                       and other[0] <= iqr[1] and iqr[0] <= other[1]) or None
    return speedup, iqr, noise


@dataclass
class PrefillAtBudget:
    tokens_per_s: CurveValue
    dense_tokens_per_s: float | None
    speedup: float | None  # paired median ratio to dense, where measured
    speedup_iqr: list | None

    def speed_ratio(self) -> float | None:
        if self.speedup is not None:
            return self.speedup
        if self.tokens_per_s.value is None or not self.dense_tokens_per_s:
            return None
        return self.tokens_per_s.value / self.dense_tokens_per_s


def prefill_at_budget(speed: pd.DataFrame, budget: float, layout: str, threads: int | None,
                      tol: float = 0.011) -> PrefillAtBudget | None:
    """Tokens/s over a prompt (the speed file's prefill: batch 1, its prefill_tokens tokens) at any budget,
    from the same file and rows as `speed_at_budget`; None when the file has no prefill figures."""
    sel = speed[speed["batch"].fillna(1).astype(int) == 1]
    sel = sel if threads is None else sel[sel["threads"] == threads]
    sel = sel.dropna(subset=["prefill_tokens_per_s"])
    if sel.empty:
        return None
    dense = sel[sel["layout"] == "dense"]["prefill_tokens_per_s"]
    dense_tps = float(dense.iloc[0]) if not dense.empty else None
    conv = sel[sel["layout"] == layout]
    tps = curve_value(list(zip(conv["budget"], conv["prefill_tokens_per_s"])), dense_tps, budget, tol)
    speedup, iqr, _ = _paired(conv, budget, tol, "prefill") if tps.status == "measured" else (None, None, None)
    return PrefillAtBudget(tps, dense_tps, speedup, iqr)


def structural_speed_summary(results: dict[str, dict]) -> str | None:
    """One sentence from `benchmarks.teal_speed`: where ToMoE and TEAL-style each save time (None without it)."""
    res = next((r for r in results.values() if r.get("kind") == "teal-speed" and r.get("rows")), None)
    if res is None:
        return None
    by = {(r["workload"], r["variant"]): r["vs_dense"] for r in res["rows"]}
    parts = []
    for workload in ("decode, batch 1", "decode, batch 8", "prefill"):
        if (workload, "ToMoE") in by and (workload, "TEAL-style") in by:
            parts.append(f"{workload}: ToMoE {by[workload, 'ToMoE']:.2f}x, TEAL-style {by[workload, 'TEAL-style']:.2f}x")
    if not parts:
        return None
    return (f"Time of the MLPs relative to dense at p = {res.get('budget'):g} ({res.get('threads', 1)} thread, "
            f"`python -m benchmarks.teal_speed`): " + "; ".join(parts) + ". Per-token gathers lose their savings "
            "once tokens are batched; ToMoE's experts group tokens into dense products.")
