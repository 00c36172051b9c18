"""What a clone ships under cache/shipped/: making it from a conversion, and materialising it on first use.

A single-budget conversion ships as a recipe (routers and channel index lists, `save_recipe`); a
budget-conditioned one as its hypernetwork and routers, which give every budget of its range.
Neither holds dense weights: they are rebuilt from the dense model the metadata names.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from ..convert.dense import load_dense
from ..convert.folder import HYPERNET_FILE, TRAINING_LOG, Conversion, conversions_dir
from ..convert.materialise import load_converted, materialise_from_recipe, save_converted, save_recipe
from ..infra.workspace import copy_if_exists, file_lock
from ..infra.locations import REPO_ROOT, shipped_dir
from ..moe.atomic import atomic_dir, sha256_file
from ..moe.metadata import ConversionMetadata, ConvertedModelError
from ..moe.modeling import read_metadata
from .rebudget import hypernet_path, materialise_at

logger = logging.getLogger(__name__)  # diagnostics; the CLI shows them on stderr


def ensure_shipped_conversions(log=logger.info) -> list[Path]:
    """Materialise every shipped recipe into cache/conversions/ if it is not there yet (seconds).

    A single-budget recipe is rebuilt from its index lists; a conditioned recipe is materialised at
    its default budget and keeps its hypernetwork beside the weights, so every other budget of its
    range materialises in memory in seconds (`materialise_at`)."""
    out = []
    for recipe in sorted(p for p in shipped_dir().glob("*") if ConversionMetadata.exists(p)):
        target = conversions_dir() / recipe.name
        with file_lock(target):
            if not ConversionMetadata.exists(target):
                _materialise_recipe(recipe, target, log)
        out.append(target)
    return out


def _materialise_recipe(recipe: Path, target: Path, log) -> None:
    meta = read_metadata(recipe)
    dense, tokenizer = load_dense(meta["model"], log=log)
    meta = {**meta, "rebuilt_from_recipe": os.path.relpath(recipe, REPO_ROOT)}
    if Conversion(recipe).is_conditioned_recipe:
        expected = meta.pop("hypernet_sha256", None)
        if sha256_file(recipe / HYPERNET_FILE) != expected:
            raise ConvertedModelError(f"{recipe / HYPERNET_FILE} does not match its checksum in tomoe.json: the "
                                      "clone is incomplete (git lfs?) or the file was changed")
        moe, _, _ = materialise_at(recipe, float(meta["budget"]), layout="memory", dense=dense, log=log)
        with atomic_dir(target) as tmp:  # weights and hypernetwork appear together
            save_converted(moe, tmp, tokenizer, meta)
            copy_if_exists(recipe / HYPERNET_FILE, tmp / HYPERNET_FILE)
            copy_if_exists(recipe / TRAINING_LOG, tmp / TRAINING_LOG)
    else:
        moe = materialise_from_recipe(recipe, dense)
        meta.pop("recipe_sha256", None)
        save_converted(moe, target, tokenizer, meta)
        copy_if_exists(recipe / TRAINING_LOG, target / TRAINING_LOG)
    log(f"[tomoe] materialised shipped conversion {recipe.name} into {target}")


def ship_conversion(conversion: Path, name: str | None = None) -> Path:
    """Copy what a conversion adds to the dense model into cache/shipped/ (small enough for git).

    Single budget: a recipe (routers + index lists, about 2 MB for SmolLM2-135M). Budget-conditioned:
    its hypernetwork and routers (every budget of its range; 28 MB for SmolLM2-135M in float32, kept
    exact so the shipped model is the measured one) and its anchor gaps, in tomoe.json."""
    conversion = Path(conversion)
    meta = read_metadata(conversion)
    target = shipped_dir() / (name or conversion.name)
    if Conversion(conversion, meta).is_conditioned:
        source = hypernet_path(conversion)
        with atomic_dir(target) as tmp:
            copy_if_exists(source, tmp / HYPERNET_FILE)
            copy_if_exists(conversion / TRAINING_LOG, tmp / TRAINING_LOG)
            shipped = {k: v for k, v in meta.items() if k not in ("weights_sha256", "weight_files", "saved_at")}
            shipped["hypernet_sha256"] = sha256_file(tmp / HYPERNET_FILE)
            ConversionMetadata(shipped).write(tmp)
        return target
    model, _tok, meta = load_converted(conversion, layout="memory", load_tokenizer=False)
    save_recipe(model, target, meta)
    copy_if_exists(conversion / TRAINING_LOG, target / TRAINING_LOG)
    return target
