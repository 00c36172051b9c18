import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def studio_cache(tmp_path_factory):
    """The studio's fixture cache (tests/studio_fixture.py), built once per session."""
    import studio_fixture

    cache = tmp_path_factory.mktemp("studio-cache")
    studio_fixture.build(cache)
    return cache


@pytest.fixture
def cache_env(studio_cache, monkeypatch, tmp_path):
    """The fixture cache, and no shipped recipes (the repository's would pull in the real model)."""
    import studio_fixture

    return studio_fixture.use_studio_cache(studio_cache, monkeypatch, tmp_path)
