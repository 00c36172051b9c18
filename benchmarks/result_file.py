"""Writing a benchmark's result: the command that made it, the machine, one atomic JSON file."""
from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from tomoe_core.infra.locations import cache_dir
from tomoe_core.infra.machine import machine_info
from tomoe_core.moe.atomic import atomic_write_json


def write_result(result: dict, module: str, argv: list[str] | None, output: Path | None, default_name: str) -> Path:
    """Add the command line, the machine and the load average to `result` and write it to `output`
    (default cache/results/DEFAULT_NAME). Returns the path written."""
    result["command"] = f"python -m {module} " + shlex.join(sys.argv[1:] if argv is None else argv)
    result["machine"] = machine_info("cpu")
    result["loadavg"] = list(os.getloadavg())
    out = output or cache_dir() / "results" / default_name
    atomic_write_json(out, result)
    print(f"wrote {out}")
    return out
