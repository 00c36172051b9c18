"""Shared fixtures of the routing tests: a tiny converted model with the real SmolLM2 tokenizer."""
from __future__ import annotations

import os
import tempfile
from functools import lru_cache
from pathlib import Path

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tiny_models import tiny_model

TEXTS = [
    "The cat sat on the mat. It didn't move, and the dog barked loudly at 5 o'clock!",
    "Alice wrote three short letters to her friends in Paris.\n\nThey answered quickly: \"Thanks!\"",
    "Running fast, the children laughed; however, nobody won the race that day.",
]


def make_converted(folder: Path, tokenizer, num_experts: int = 4, seed: int = 0) -> Path:
    from tomoe_core import MaskedModel, materialise, save_converted

    mm = MaskedModel(tiny_model("llama", seed=seed, vocab_size=len(tokenizer)), num_experts=num_experts)
    g = torch.Generator().manual_seed(seed)
    masks = [(torch.rand(num_experts, size, generator=g) < 0.5).float() for size in mm.intermediate_sizes]
    for m in masks:
        m[:, 0] = 1  # no empty expert
    moe = materialise(mm, masks, budget=0.5)
    return save_converted(moe, folder, tokenizer, metadata={"model": "tiny", "budget": 0.5, "num_experts": num_experts})


@lru_cache(maxsize=1)
def shared_tokenizer():
    """Loaded once per process (a few seconds on the 2-core machines)."""
    from tomoe_core.convert.dense import load_tokenizer

    return load_tokenizer()


@lru_cache(maxsize=1)
def shared_converted() -> Path:
    return make_converted(Path(tempfile.mkdtemp(prefix="tomoe-test-")) / "tiny-p0.5-e4", shared_tokenizer())


@pytest.fixture(scope="module")
def tokenizer():
    return shared_tokenizer()


@pytest.fixture(scope="module")
def routing_cache(tmp_path_factory):
    """TOMOE_CACHE pointed at a fresh temp folder while a test module runs."""
    root = tmp_path_factory.mktemp("cache")
    old = os.environ.get("TOMOE_CACHE")
    os.environ["TOMOE_CACHE"] = str(root)
    yield root
    if old is None:
        os.environ.pop("TOMOE_CACHE", None)
    else:
        os.environ["TOMOE_CACHE"] = old


@pytest.fixture(scope="module")
def converted() -> Path:
    return shared_converted()


@pytest.fixture(scope="module")
def traced_run(converted, routing_cache) -> Path:
    from tomoe_core.trace.run import trace_run

    return trace_run(converted, prompts=TEXTS, seq_len=16, batch_size=2, run_id="fixture")


@pytest.fixture(scope="module")
def annotated_run(traced_run) -> Path:
    from analysis.syntax import annotate_run

    annotate_run(traced_run)
    return traced_run


def sibling_log(run: Path, root: Path, budget: float, run_id: str, shuffle: float = 0.0) -> Path:
    """A copy of `run` relabelled as a log of the same conversion at `budget`, with a share of the
    expert choices moved to the next expert."""
    folder = root / f"run_id={run_id}"
    shutil.copytree(run, folder, ignore=shutil.ignore_patterns("ablation"))
    meta = json.loads((folder / "run.json").read_text())
    meta.update(run_id=run_id, budget=budget, conversion=f"{meta['conversion']}-at-p{budget:g}")
    if shuffle:
        for part in folder.glob("part-*.parquet"):
            table = pq.read_table(part)
            experts = table["expert"].to_numpy().copy()
            moved = np.random.default_rng(0).random(len(experts)) < shuffle
            experts[moved] = (experts[moved] + 1) % meta["num_experts"]
            table = table.set_column(table.schema.get_field_index("expert"), "expert", pa.array(experts, pa.int16()))
            pq.write_table(table, part)
        from tomoe_core.trace.routing_log import file_table

        meta["files"] = file_table(folder)  # the checksums of the changed parts
    (folder / "run.json").write_text(json.dumps(meta))
    return folder
