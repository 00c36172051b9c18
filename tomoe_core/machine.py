"""`machine_info`: what a measurement ran on, recorded beside every result (run.json, benchmark JSON).

Torch-light: torch is imported only when the function is called, so importing this module costs nothing.
"""
from __future__ import annotations

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
