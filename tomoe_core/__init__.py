"""ToMoE engine: convert dense Hugging Face causal LMs to mixture-of-experts by dynamic structural pruning.

The names below load on first use, so torch-free parts (`tomoe_core.jobs`, `.paths`, `.config`, `.io`)
import without torch and transformers. `import tomoe_core.convert` (or using any name below, e.g.
`tomoe_core.load_converted`) registers the model type "tomoe" with transformers' Auto classes.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "ToMoEConfig": "convert", "ToMoEForCausalLM": "convert", "load_converted": "convert", "materialise": "convert",
    "save_converted": "convert", "SUPPORTED_FAMILIES": "families", "UnsupportedModelError": "families",
    "adapter_for": "families", "MaskedModel": "masked", "Masks": "masks", "DEFAULT_MODEL": "models",
    "load_dense": "models",
    "ConversionConfig": "config", "train_conversion": "train",
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
