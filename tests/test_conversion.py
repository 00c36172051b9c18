"""`tomoe_core.convert.folder`: one object for a conversion folder, torch-free; `tomoe_core.infra.ranks.is_rank0`."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tomoe_core.infra import ranks
from tomoe_core.convert.config import ConversionConfig
from tomoe_core.convert.folder import (Conversion, ConversionError, default_conversion_name, list_conversions,
    output_of_work_dir, work_dir_of)

ROOT = Path(__file__).resolve().parent.parent


def _folder(root: Path, name: str, weights: bool = True, **meta) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "tomoe.json").write_text(json.dumps(meta))
    if weights:
        (folder / "model.safetensors").write_bytes(b"")
    return folder


def test_conversion_and_ranks_import_without_torch():
    code = ("import sys, tomoe_core.convert.folder, tomoe_core.infra.ranks; "
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_a_conversion_folder_knows_its_files(tmp_path):
    folder = _folder(tmp_path, "c-p0.5", model="m", budget=0.5, budget_range=[0.3, 1.0])
    conv = Conversion.open(folder)
    assert (conv.name, conv.model, conv.budget, conv.budget_range) == ("c-p0.5", "m", 0.5, (0.3, 1.0))
    assert conv.work_dir == tmp_path / "c-p0.5.work" == work_dir_of(folder)
    assert output_of_work_dir(conv.work_dir) == folder
    assert conv.progress_log == tmp_path / "c-p0.5.work" / "log.jsonl"
    assert conv.training_log == folder / "training_log.jsonl"
    assert conv.materialised and not conv.is_recipe and conv.is_conditioned
    assert not Conversion(folder, {**conv.meta, "derived_from": "x"}).is_conditioned
    # the hypernetwork: beside the model, else the work folder's checkpoint, else none
    assert conv.hypernet_path is None
    with pytest.raises(FileNotFoundError, match="has no hypernet.safetensors"):
        conv.require_hypernet_path()
    (conv.checkpoint_dir).mkdir(parents=True)
    (conv.checkpoint_dir / "trainable.safetensors").write_bytes(b"")
    assert conv.require_hypernet_path() == conv.checkpoint_dir / "trainable.safetensors"
    (folder / "hypernet.safetensors").write_bytes(b"")
    assert conv.hypernet_path == folder / "hypernet.safetensors"
    with pytest.raises(ConversionError, match="not a converted ToMoE model"):
        Conversion.open(tmp_path / "nothing")


def test_list_conversions_by_model_with_problems(tmp_path):
    _folder(tmp_path, "b", model="m", budget=0.5)
    _folder(tmp_path, "a", model="m", budget=0.3)
    _folder(tmp_path, "other", model="o", budget=0.5)
    _folder(tmp_path, "recipe", weights=False, model="m", budget=0.4)
    (tmp_path / "a.work").mkdir()
    convs, problems = list_conversions(tmp_path, "m")
    assert [c.name for c in convs] == ["a", "b"] and [Path(p.path).name for p in problems] == ["recipe"]
    convs, problems = list_conversions(tmp_path, require_weights=False, ignore={"other"})
    assert [c.name for c in convs] == ["a", "b", "recipe"] and problems == []


def test_default_conversion_name_is_torch_free_and_unchanged():
    assert default_conversion_name(ConversionConfig(budget=0.5, num_experts=8)) == "smollm2-135m-p0.5-e8"


def test_is_rank0_follows_torchrun_without_a_process_group(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    assert ranks.is_rank0() and ranks.dist_info() == (0, 1)
    monkeypatch.setenv("RANK", "1")
    assert not ranks.is_rank0()
