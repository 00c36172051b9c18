"""Numbers on the studio's KPI cards: units, and the change against dense that st.metric colours."""
from __future__ import annotations

import math

def relative_delta(value: float | None, reference: float | None, what: str = "vs dense") -> str | None:
    """'+17% vs dense' / '-29% vs dense' (the sign decides the colour st.metric gives it), 'same as dense'
    within half a percent, or None where there is nothing to compare."""
    if value is None or reference is None or not reference or any(map(math.isnan, (value, reference))):
        return None
    change = value / reference - 1
    return f"same as {what.removeprefix('vs ')}" if abs(change) < 0.005 else f"{change:+.0%} {what}"


def metric_delta(value: float | None, reference: float | None, lower_is_better: bool) -> dict:
    """`delta` and `delta_color` for st.metric: green only for a saving or a gain (lower cost, memory,
    FLOPs, perplexity; higher speed), red for a loss, grey when equal or not comparable."""
    text = relative_delta(value, reference)
    if text is None or text.startswith("same"):
        return {"delta": text, "delta_color": "off", "delta_arrow": "off"}
    return {"delta": text, "delta_color": "inverse" if lower_is_better else "normal"}


def memory_unit(*mbs: float | None) -> str:
    """One unit for memory figures shown together: GiB if the largest is at least 1 GiB, else MiB."""
    known = [mb for mb in mbs if mb is not None and not (isinstance(mb, float) and math.isnan(mb))]
    return "GiB" if known and max(known) >= 1024 else "MiB"


def format_mb(mb: float | None, unit: str | None = None) -> str:
    """A memory figure in MiB or GiB; `unit` (see `memory_unit`) keeps figures shown together in one unit."""
    if mb is None or (isinstance(mb, float) and math.isnan(mb)):
        return "—"
    unit = unit or memory_unit(mb)
    return f"{mb / 1024:.2f} GiB" if unit == "GiB" else f"{mb:,.0f} MiB"


def format_params(n: float) -> str:
    return f"{n / 1e9:.3g} B" if n >= 1e9 else f"{n / 1e6:.4g} M"


def format_flops(n: float) -> str:
    return f"{n / 1e9:.3g} G" if n >= 1e9 else f"{n / 1e6:.4g} M"


def format_usd(x: float | None) -> str:
    """Cents from $1 up ($2.00, $999.50), three significant figures below ($0.445) and from $1,000
    ($14.8k, $2.35M): a card has room for about eight characters."""
    if x is None or math.isnan(x):
        return "—"
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if x >= scale:
            return f"${x / scale:.3g}{suffix}"
    return f"${x:,.2f}" if x >= 1 else f"${x:.3g}"
