"""Which process of a torchrun launch this is: `dist_info` and the one "am I rank 0" test, `is_rank0`.

Torch-free: without torch imported there can be no process group, so torchrun's RANK says.
"""
from __future__ import annotations

import os
import sys


def _group():
    """torch.distributed if a process group is initialised in this process, else None."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist
    return None


def dist_info() -> tuple[int, int]:
    """(rank, world size) in the initialised process group; (0, 1) without one."""
    dist = _group()
    return (dist.get_rank(), dist.get_world_size()) if dist is not None else (0, 1)


def is_rank0() -> bool:
    """Whether this process is the one that reports and writes: rank 0 of the process group, or, before
    the group is joined or after it is left, torchrun's RANK (True outside torchrun)."""
    dist = _group()
    return (dist.get_rank() if dist is not None else int(os.environ.get("RANK", "0"))) == 0
