"""ToMoE engine: convert dense Hugging Face causal LMs to mixture-of-experts by dynamic structural pruning."""
from .convert import ToMoEConfig, ToMoEForCausalLM, load_converted, materialise, save_converted  # registers Auto classes
from .families import SUPPORTED_FAMILIES, UnsupportedModelError, adapter_for
from .masked import MaskedModel
from .models import DEFAULT_MODEL, load_dense
from .train import ConversionConfig, train_conversion

__all__ = ["ToMoEConfig", "ToMoEForCausalLM", "load_converted", "materialise", "save_converted",
           "SUPPORTED_FAMILIES", "UnsupportedModelError", "adapter_for", "MaskedModel", "DEFAULT_MODEL",
           "load_dense", "ConversionConfig", "train_conversion"]
