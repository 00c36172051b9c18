"""How long a trace will take: measured throughput of earlier traces on this machine, or a default.

The Runs page proposes a trace size that finishes in about a minute and shows the estimate
for the size the user picks. Throughput comes from run.json (`timing.tokens_per_s`,
`timing.load_s`) of the latest traces of the same conversion, else of any conversion with the
same number of layers, else the defaults below (SmolLM2-135M on 2 shared CPU cores).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_TOKENS_PER_S = 110.0  # SmolLM2-135M p = 0.5, one process, 2 shared CPU cores (3,000 tokens in 26 s)
DEFAULT_LOAD_S = 8.0  # loading the converted model and tokenising, same machine
DEFAULT_ACTIVE_PARAMS = 94_840_368  # that conversion's active parameters per token (tomoe.json accounting)
DEFAULT_TOTAL_PARAMS = 134_653_488  # and its dense model's, which loading reads
START_S = 8.0  # starting Python and importing torch, before run.json's clock starts
TARGET_SECONDS = 60.0
MIN_TOKENS = 1000  # traces shorter than this do not count towards the throughput


@dataclass(frozen=True)
class TraceSpeed:
    tokens_per_s: float
    load_s: float
    basis: str  # where the numbers come from, in words

    def seconds(self, tokens: int) -> float:
        return START_S + self.load_s + tokens / self.tokens_per_s

    def tokens_for(self, seconds: float = TARGET_SECONDS, step: int = 500) -> int:
        """Tokens that finish in about `seconds`, rounded down to `step` (at least one step)."""
        tokens = max(seconds - START_S - self.load_s, 0.0) * self.tokens_per_s
        return max(step, int(tokens // step) * step)


def trace_speed(runs: list[dict], conversion: str | Path | None = None, num_layers: int | None = None,
                latest: int = 3, accounting: dict | None = None) -> TraceSpeed:
    """Median throughput of the `latest` single-process CPU traces of at least MIN_TOKENS tokens of
    `conversion` (or, failing that, of any conversion with `num_layers` layers) in `runs`
    (`routing_log.list_runs()`, newest first). With none, the defaults, scaled to the conversion's
    size when its `accounting` (tomoe.json) is given: tokens/s by active, loading by total parameters."""

    def usable(run):  # short traces (a few prompts) are dominated by fixed costs: they would mislead
        timing = run.get("timing") or {}
        return (timing.get("tokens_per_s") and timing.get("load_s") is not None
                and not run.get("shipped")  # the clone's own log was traced on another machine
                and (run.get("tokens") or 0) >= MIN_TOKENS and (run.get("world_size") or 1) == 1
                and str((run.get("machine") or {}).get("device", "cpu")).startswith("cpu"))

    def median(values):
        values = sorted(values)
        return values[len(values) // 2]

    name = Path(str(conversion)).name if conversion else None
    for basis, match in (("earlier traces of this conversion", lambda r: name and Path(str(r.get("conversion", ""))).name == name),
                         (f"earlier traces of {num_layers}-layer conversions", lambda r: num_layers and r.get("num_layers") == num_layers)):
        chosen = [r for r in runs if usable(r) and match(r)][:latest]
        if chosen:
            return TraceSpeed(median([r["timing"]["tokens_per_s"] for r in chosen]),
                              median([r["timing"]["load_s"] for r in chosen]), f"{basis} on this machine")
    active, total = (accounting or {}).get("active_total"), (accounting or {}).get("dense_total")
    if active and total:
        return TraceSpeed(DEFAULT_TOKENS_PER_S * DEFAULT_ACTIVE_PARAMS / active, DEFAULT_LOAD_S * total / DEFAULT_TOTAL_PARAMS,
                          f"SmolLM2-135M on 2 CPU cores scaled to this conversion's {active / 1e6:.0f} M active "
                          "parameters; no earlier trace here")
    return TraceSpeed(DEFAULT_TOKENS_PER_S, DEFAULT_LOAD_S, "SmolLM2-135M on 2 CPU cores; no earlier trace here")


def describe(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"
