"""`machine_info`: what a measurement ran on, recorded beside every result (run.json, benchmark JSON);
`release_file_pages`: hand back the resident pages of a memory-mapped weights file a layout has copied;
`release_freed_heap`: hand freed heap memory back to the OS after building a model from a larger one.

Torch-light: torch is imported only when the function is called, so importing this module costs nothing.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import platform
import sys


def machine_info(device: str = "cpu") -> dict:
    import torch

    info = {"platform": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": str(device)}
    if str(device).startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    return info


_MADV_DONTNEED = 4


def _libc():
    """The C library already loaded into this process (symbols of the process itself)."""
    return ctypes.CDLL(None)


def file_mapping_of(start: int, end: int) -> str | None:
    """The file privately mapped over [start, end) in this process, per /proc/self/maps; else None."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                lo, hi = (int(v, 16) for v in fields[0].split("-"))
                if lo <= start and end <= hi:
                    path = fields[5].strip() if len(fields) == 6 else ""
                    return path if fields[1].endswith("p") and path.startswith("/") else None
    except (OSError, ValueError):
        pass
    return None


def release_file_pages(t) -> None:
    """Drop the resident pages of a weights file under tensor `t` (CPU, Linux), once a layout has made its own copy.

    A converted model's weights are memory-mapped from its safetensors file; the mapped original of a
    matrix a layout re-stores would otherwise stay resident beside the copy (about 1/3 of the MLP
    weights for the indexed layout). Only pages of a private file mapping are dropped (MADV_DONTNEED):
    a later read of them faults the file's contents back in, so nothing is lost; anonymous memory
    (a model built in memory) is left alone and is freed with its last tensor as usual.
    """
    if t.device.type != "cpu" or not sys.platform.startswith("linux"):
        return
    page = mmap.PAGESIZE
    start = (t.data_ptr() + page - 1) // page * page
    end = (t.data_ptr() + t.numel() * t.element_size()) // page * page  # the tensor's own extent (contiguous)
    if not t.is_contiguous() or end <= start or file_mapping_of(start, end) is None:
        return
    try:
        _libc().madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), ctypes.c_int(_MADV_DONTNEED))
    except (OSError, AttributeError):
        pass


def release_freed_heap() -> None:
    """Return freed heap memory to the OS (glibc `malloc_trim`; nothing elsewhere). Building a conversion
    from the dense model frees the dense MLPs and the wrapper's buffers (about 100-250 MB for
    SmolLM2-135M); glibc keeps such memory for reuse and the process's RSS keeps counting it."""
    if not sys.platform.startswith("linux"):
        return
    import gc

    gc.collect()
    try:
        _libc().malloc_trim(0)
    except (OSError, AttributeError):
        pass
