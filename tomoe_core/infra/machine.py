"""`machine_info`: what a measurement ran on, recorded beside every result (run.json, benchmark JSON);
`release_freed_heap`: hand freed heap memory back to the OS after building a model from a larger one.

Torch-light: torch is imported only when the function is called, so importing this module costs nothing.
"""
from __future__ import annotations

import os
import platform
import sys

from ..moe.atomic import _libc


def cpu_model() -> str | None:
    """The CPU's model name (speed depends on it: cache size, AMX/AVX-512): /proc/cpuinfo on Linux."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def machine_info(device: str = "cpu") -> dict:
    import torch

    info = {"platform": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__,
            "cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "device": str(device)}
    if str(device).startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    return info


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
