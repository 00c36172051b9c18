"""Where the engine keeps things: the repository root, the cache, and what a clone ships. Torch-free.

  REPO_ROOT      the checkout (relative paths of the studio and its jobs resolve here)
  cache_dir()    TOMOE_CACHE or <repo>/cache: models, conversions, routing logs, results
  shipped_dir()  TOMOE_SHIPPED or <repo>/cache/shipped: what git ships
"""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def cache_dir() -> Path:
    root = os.environ.get("TOMOE_CACHE")
    return Path(root) if root else REPO_ROOT / "cache"


def shipped_dir() -> Path:
    """What a clone ships under cache/shipped/ (recipes, measured results, a routing log), in git.
    TOMOE_SHIPPED points elsewhere (tests use an empty folder to keep the real model out)."""
    root = os.environ.get("TOMOE_SHIPPED")
    return Path(root) if root else REPO_ROOT / "cache" / "shipped"
