"""The engine's file helpers beside the runtime's crash-safe writes (`moe.atomic`): safe names, locks
between processes, copying what exists."""
from __future__ import annotations

import os
import re
from pathlib import Path

from filelock import FileLock

from ..moe.atomic import atomic_write_bytes


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("_")[:80] or "x"


def file_lock(path: str | os.PathLike, timeout: float = -1) -> FileLock:
    """Inter-process lock guarding `path` (two studio tabs, two CLI runs)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path) + ".lock", timeout=timeout)


def copy_if_exists(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy an optional artefact (a training log, a hypernetwork) atomically when it exists."""
    if Path(src).exists():
        atomic_write_bytes(dst, Path(src).read_bytes())
