"""ToMoE engine: convert dense Hugging Face causal LMs to mixture-of-experts by dynamic structural pruning.

Sub-packages by job: `moe` (the exported runtime), `convert`, `trace`, `eval`, `text`, `infra`,
`workflows`; `cli` is `python -m tomoe_core`. The names below load on first use, so torch-free parts
(`tomoe_core.infra`, `.convert.config`, `.convert.folder`) import without torch and transformers.
`import tomoe_core.convert.materialise` (or using any name below, e.g. `tomoe_core.load_converted`)
registers the model type "tomoe" with transformers' Auto classes.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "ToMoEConfig": "moe.modeling", "ToMoEForCausalLM": "moe.modeling", "load_converted": "convert.materialise",
    "materialise": "convert.materialise", "save_converted": "convert.materialise",
    "SUPPORTED_FAMILIES": "moe.families", "UnsupportedModelError": "moe.families", "adapter_for": "moe.families",
    "MaskedModel": "convert.masked_model", "Masks": "convert.expert_masks", "DEFAULT_MODEL": "convert.dense",
    "load_dense": "convert.dense", "ConversionConfig": "convert.config", "train_conversion": "convert.train",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tomoe_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
