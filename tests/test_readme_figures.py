"""The README quotes the same speed statistic as the studio's cards: the paired median ratio to dense
and its IQR from the shipped speed file the cards read."""
from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _row(rows, threads, budget):
    return next(r for r in rows if r["threads"] == threads and r["batch"] == 1 and r["budget"] == budget
                and r.get("layout") == "indexed")


def test_readme_speed_figures_are_the_card_statistic_of_the_shipped_file():
    readme = (ROOT / "README.md").read_text()
    data = json.loads((ROOT / "cache" / "shipped" / "results" / "speed_benchmark.json").read_text())
    assert "cache/shipped/results/speed_benchmark.json" in readme
    m = re.search(r"at p = 0\.5 decode runs \*\*([\d.]+)x\*\* dense \(IQR ([\d.]+)-([\d.]+)x\) with 1 thread and\s+"
                  r"([\d.]+)x \(([\d.]+)-([\d.]+)x\) with 2", readme)
    assert m, "the README's p = 0.5 decode figures moved: keep them in this form"
    for threads, (median, q1, q3) in ((1, m.group(1, 2, 3)), (2, m.group(4, 5, 6))):
        row = _row(data["rows"], threads, 0.5)
        assert f"{row['decode_speedup']:.2f}" == median
        assert [f"{x:.2f}" for x in row["decode_speedup_iqr"]] == [q1, q3]
    m = re.search(r"peak memory\s+([\d,]+) against dense's ([\d,]+) MiB \(Wanda-sp ([\d,]+), FLAP ([\d,]+), "
                  r"TEAL-style as deployed ([\d,]+)", readme)
    assert m, "the README's p = 0.5 peak-memory figures moved: keep them in this form"
    peaks = {(r["method"], r["budget"]): r["peak_memory_mb"] for r in data["rows"]
             if r["threads"] == 1 and r["batch"] == 1 and r.get("layout") in ("indexed", None)}
    quoted = [int(x.replace(",", "")) for x in m.groups()]
    assert quoted == [round(peaks[k]) for k in (("tomoe", 0.5), ("dense", 1.0), ("wanda-sp", 0.5), ("flap", 0.5),
                                                 ("teal", 0.5))]
