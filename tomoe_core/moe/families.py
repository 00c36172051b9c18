"""Family adapters: where each Hugging Face family keeps its decoder layers, MLP and attention.

Every adapter answers the same questions explicitly (no `type(m).__name__` sniffing):
which attribute path holds the decoder layers, which attribute of a layer is the MLP,
how the MLP's weights map onto the canonical form below, and which projections
make up attention (for accounting).

Canonical MLP (I = intermediate channels, D = hidden size):
    gated:  y = W_down @ (act(W_gate x + b_gate) * (W_up x + b_up)) + b_down
    plain:  y = W_down @ act(W_up x + b_up) + b_down
with W_gate, W_up of shape (I, D) and W_down of shape (D, I). Fused (Phi-3
`gate_up_proj`) and Conv1D (GPT-2, weights stored transposed) layouts are mapped
onto it by views, never copies, so the masked model shares the dense weights.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class MLPWeights:
    """Views of one MLP's weights in canonical orientation."""

    up: torch.Tensor  # (I, D)
    down: torch.Tensor  # (D, I)
    act: nn.Module
    gate: torch.Tensor | None = None  # (I, D); None for a plain MLP
    up_bias: torch.Tensor | None = None  # (I,)
    gate_bias: torch.Tensor | None = None  # (I,)
    down_bias: torch.Tensor | None = None  # (D,)

    @property
    def gated(self) -> bool:
        return self.gate is not None

    @property
    def intermediate_size(self) -> int:
        return self.up.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.up.shape[1]


@dataclass(frozen=True)
class FamilyAdapter:
    model_type: str
    layers_path: str  # dotted attribute path from the *ForCausalLM module to the layer list
    mlp_kind: str  # "gated" | "fused" | "plain" | "conv1d"
    proj: tuple[str, ...]  # gated: (gate, up, down); fused: (gate_up, down); plain/conv1d: (fc_in, fc_out)
    act_attr: str
    attn_attr: str
    attn_proj: tuple[str, ...]  # projections counted as attention parameters
    mlp_attr: str = "mlp"
    rotary: str = "full"  # "full" | "partial" | "none" (for the attention stage)

    def layers(self, model: nn.Module) -> nn.ModuleList:
        obj = model
        for part in self.layers_path.split("."):
            obj = getattr(obj, part)
        assert isinstance(obj, nn.ModuleList), f"{self.model_type}: {self.layers_path} is not a ModuleList"
        return obj

    def mlp(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.mlp_attr)

    def set_mlp(self, layer: nn.Module, module: nn.Module) -> None:
        setattr(layer, self.mlp_attr, module)

    def attention(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.attn_attr)

    def attention_params(self, layer: nn.Module) -> int:
        attn = self.attention(layer)
        return sum(p.numel() for name in self.attn_proj for p in getattr(attn, name).parameters())

    def mlp_weights(self, mlp: nn.Module) -> MLPWeights:
        """Canonical views of an MLP's weights; asserts every shape it relies on."""
        act = getattr(mlp, self.act_attr)
        kind = self.mlp_kind
        if kind == "gated":
            gate, up, down = (getattr(mlp, n) for n in self.proj)
            w = MLPWeights(up=up.weight, gate=gate.weight, down=down.weight, act=act,
                           up_bias=up.bias, gate_bias=gate.bias, down_bias=down.bias)
        elif kind == "fused":
            gate_up, down = (getattr(mlp, n) for n in self.proj)
            inter = down.weight.shape[1]
            assert gate_up.weight.shape[0] == 2 * inter, (
                f"{self.model_type}: fused gate_up has {gate_up.weight.shape[0]} rows, expected 2 x {inter}")
            # Phi-3 chunks the fused output as (gate, up): rows [:I] gate, [I:] up.
            w = MLPWeights(gate=gate_up.weight[:inter], up=gate_up.weight[inter:], down=down.weight, act=act,
                           down_bias=down.bias)
            assert gate_up.bias is None, f"{self.model_type}: fused gate_up with bias is not supported"
        elif kind == "plain":
            fc_in, fc_out = (getattr(mlp, n) for n in self.proj)
            w = MLPWeights(up=fc_in.weight, down=fc_out.weight, act=act, up_bias=fc_in.bias, down_bias=fc_out.bias)
        elif kind == "conv1d":
            # GPT-2 Conv1D stores weight as (in, out): transpose views give canonical (out, in).
            fc_in, fc_out = (getattr(mlp, n) for n in self.proj)
            w = MLPWeights(up=fc_in.weight.t(), down=fc_out.weight.t(), act=act,
                           up_bias=fc_in.bias, down_bias=fc_out.bias)
        else:  # pragma: no cover - adapter table is static
            raise AssertionError(f"unknown mlp kind {kind}")
        inter, hidden = w.up.shape
        assert w.down.shape == (hidden, inter), (
            f"{self.model_type}: down projection {tuple(w.down.shape)} does not match up {tuple(w.up.shape)}")
        if w.gate is not None:
            assert w.gate.shape == w.up.shape, f"{self.model_type}: gate {tuple(w.gate.shape)} != up {tuple(w.up.shape)}"
        return w


_LLAMA_LIKE = dict(layers_path="model.layers", mlp_kind="gated", proj=("gate_proj", "up_proj", "down_proj"),
                   act_attr="act_fn", attn_attr="self_attn", attn_proj=("q_proj", "k_proj", "v_proj", "o_proj"))

ADAPTERS: dict[str, FamilyAdapter] = {
    "llama": FamilyAdapter("llama", **_LLAMA_LIKE),
    "mistral": FamilyAdapter("mistral", **_LLAMA_LIKE),
    "qwen2": FamilyAdapter("qwen2", **_LLAMA_LIKE),
    "qwen3": FamilyAdapter("qwen3", **_LLAMA_LIKE),
    "gemma3_text": FamilyAdapter("gemma3_text", **_LLAMA_LIKE),
    "phi3": FamilyAdapter("phi3", layers_path="model.layers", mlp_kind="fused", proj=("gate_up_proj", "down_proj"),
                          act_attr="activation_fn", attn_attr="self_attn", attn_proj=("qkv_proj", "o_proj")),
    "phi": FamilyAdapter("phi", layers_path="model.layers", mlp_kind="plain", proj=("fc1", "fc2"),
                         act_attr="activation_fn", attn_attr="self_attn",
                         attn_proj=("q_proj", "k_proj", "v_proj", "dense"), rotary="partial"),
    "gpt2": FamilyAdapter("gpt2", layers_path="transformer.h", mlp_kind="conv1d", proj=("c_fc", "c_proj"),
                          act_attr="act", attn_attr="attn", attn_proj=("c_attn", "c_proj"), rotary="none"),
}

SUPPORTED_FAMILIES = tuple(sorted(ADAPTERS))


class UnsupportedModelError(ValueError):
    pass


def adapter_for(model_or_config) -> FamilyAdapter:
    """The adapter of a model (or config); a clear error listing supported families otherwise."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type in ADAPTERS:
        return ADAPTERS[model_type]
    raise UnsupportedModelError(
        f"model family {model_type!r} is not supported by ToMoE Studio; supported families: "
        f"{', '.join(SUPPORTED_FAMILIES)}. Open an issue with the model's config.json to add an adapter.")
