"""Materialise a trained conversion into a real MoE model; save and load it.

On disk a converted model is a folder:
  config.json        ToMoEConfig: the dense model's config + every layer's union and expert widths
  model.safetensors  weights (union channels only) + routers + expert index lists
  tokenizer files
  tomoe.json         metadata: budget, settings, measured stats, sha256 of model.safetensors
No pickles, no rewritten source files. `AutoModelForCausalLM.from_pretrained(folder)` works
once `tomoe_core` is imported (the config and model classes are registered).
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from .families import adapter_for
from .io import atomic_dir, atomic_write_json, sha256_file
from .routing import LAYOUT_PREFERENCE, LAYOUTS, MaskedMLP, MoEMLP

FORMAT_VERSION = 1


class ConvertedModelError(ValueError):
    pass


class ToMoEConfig(PretrainedConfig):
    model_type = "tomoe"

    def __init__(self, base_config: dict | None = None, num_experts: int = 8, moe_layers: list[dict] | None = None,
                 budget: float | None = None, format_version: int = FORMAT_VERSION,
                 attention_layers: list[dict] | None = None, **kwargs):
        self.base_config = base_config or {}
        if attention_layers:  # attention pruning only: per layer `PrunedAttention.spec()` (absent otherwise)
            self.attention_layers = attention_layers
        self.num_experts = num_experts
        self.moe_layers = moe_layers or []  # per layer: union_size, expert_widths, gated, up_bias, down_bias
        self.budget = budget
        self.format_version = format_version
        super().__init__(**kwargs)

    def base(self) -> PretrainedConfig:
        cfg = dict(self.base_config)
        return AutoConfig.for_model(cfg.pop("model_type"), **cfg)


class ToMoEForCausalLM(PreTrainedModel):
    """A dense HF causal LM whose MLPs are `MoEMLP`s. Forward and generate delegate to it."""

    config_class = ToMoEConfig
    base_model_prefix = "tomoe"
    main_input_name = "input_ids"

    def __init__(self, config: ToMoEConfig, model: PreTrainedModel | None = None):
        super().__init__(config)
        if model is None:
            model = AutoModelForCausalLM.from_config(config.base())
            adapter = adapter_for(model)
            layers = adapter.layers(model)
            assert len(layers) == len(config.moe_layers), (len(layers), len(config.moe_layers))
            for layer, spec in zip(layers, config.moe_layers):
                w = adapter.mlp_weights(adapter.mlp(layer))
                adapter.set_mlp(layer, MoEMLP(w.hidden_size, spec["union_size"], spec["expert_widths"], spec["gated"],
                                              w.act, spec["up_bias"], spec["down_bias"]))
            attention_specs = getattr(config, "attention_layers", None) or []
            if attention_specs:
                from .attention import PrunedAttention

                assert len(attention_specs) == len(layers), (len(layers), len(attention_specs))
            for l, (layer, spec) in enumerate(zip(layers, attention_specs)):
                pruned = PrunedAttention.from_spec(model.config, l, model.config.hidden_size, spec)
                setattr(layer, adapter.attn_attr, pruned)
        self.model = model.eval()

    @property
    def base_model_for_accounting(self):
        return self.model

    @property
    def pruned_attention(self) -> list:
        """The `PrunedAttention` modules (attention pruning), else an empty list."""
        from .attention import PrunedAttention

        adapter = adapter_for(self.model)
        return [a for a in (adapter.attention(layer) for layer in adapter.layers(self.model))
                if isinstance(a, PrunedAttention)]

    @property
    def moe_mlps(self) -> list[MoEMLP]:
        adapter = adapter_for(self.model)
        return [adapter.mlp(layer) for layer in adapter.layers(self.model)]

    def set_layout(self, layout: str = "auto", memory_limit_bytes: int | None = None) -> str:
        """Choose how the experts' weights are laid out in memory; returns the layout chosen.

        `layout` is a layout ("shared", "packed", "core+extras"; see `MoEMLP`) or a use:
        "decode" (= "auto": token-by-token generation), "prefill" (long prompts, scoring text)
        or "memory" (no copies). A use picks the fastest layout for it whose extra memory fits
        `memory_limit_bytes` (default: half of the memory now available on the model's device).
        """
        if layout in LAYOUT_PREFERENCE:
            limit = available_memory_bytes(self.device) // 2 if memory_limit_bytes is None else memory_limit_bytes
            mlps = self.moe_mlps
            for candidate in LAYOUT_PREFERENCE[layout]:
                if sum(m.layout_extra_bytes(candidate) for m in mlps) <= limit or candidate == "shared":
                    layout = candidate
                    break
        elif layout not in LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}; choose a layout ({', '.join(LAYOUTS)}) "
                             f"or a use ({', '.join(LAYOUT_PREFERENCE)})")
        for m in self.moe_mlps:
            m.set_layout(layout)
        return layout

    @property
    def layout(self) -> str:
        return self.moe_mlps[0].layout

    def layout_bytes(self) -> dict:
        """Resident bytes of the MoE MLPs: union weights (saved) and the current layout's copies."""
        mlps = self.moe_mlps
        extra = sum(m.layout_extra_bytes() for m in mlps)
        return {"layout": self.layout, "mlp_bytes": sum(m.weight_bytes() for m in mlps) - extra, "layout_extra_bytes": extra}

    def set_routing(self, override: int | str | None, generator: torch.Generator | None = None) -> None:
        for m in self.moe_mlps + self.pruned_attention:
            m.routing_override = override
            m.random_generator = generator

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def get_output_embeddings(self):
        return self.model.get_output_embeddings()

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.model.generate(*args, **kwargs)

    @property
    def generation_config(self):
        return self.model.generation_config

    @generation_config.setter
    def generation_config(self, value):  # PreTrainedModel.__init__ assigns one
        pass

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        device = kwargs.get("device_map") if isinstance(kwargs.get("device_map"), str) else "cpu"
        model, _tok, _meta = load_converted(pretrained_model_name_or_path, device=device or "cpu",
                                            load_tokenizer=False)
        return model

    def save_pretrained(self, save_directory, **kwargs):
        save_converted(self, save_directory, metadata=kwargs.get("metadata"))


AutoConfig.register("tomoe", ToMoEConfig, exist_ok=True)
AutoModelForCausalLM.register(ToMoEConfig, ToMoEForCausalLM, exist_ok=True)


def materialise(masked, masks: list[torch.Tensor], budget: float | None = None) -> ToMoEForCausalLM:
    """Build the MoE model from a MaskedModel and its deterministic expert masks (L x (E, I)), with
    attention pruning 3 L masks (MLP, then Q/K pairs, then V/O experts; see `MaskedModel.split_masks`)."""
    maskers = list(getattr(masked, "attention", None) or [])
    for a in maskers:  # their hooks must not be copied along with the projections they watch
        a.detach()
    try:
        base = copy.deepcopy(masked.model)
    finally:
        for a in maskers:
            a.attach()
    adapter = adapter_for(base)
    specs = []
    for layer, m in zip(adapter.layers(base), masks):
        masked_mlp = adapter.mlp(layer)
        assert isinstance(masked_mlp, MaskedMLP)
        w = adapter.mlp_weights(masked_mlp.dense_mlp)
        moe = MoEMLP.from_masks(w, masked_mlp.router, m)
        adapter.set_mlp(layer, moe)
        specs.append({"union_size": moe.union_size, "expert_widths": moe.expert_widths, "gated": w.gated,
                      "up_bias": w.up_bias is not None, "down_bias": w.down_bias is not None})
    attention_specs = None
    if len(masks) > len(specs):
        from .attention import PrunedAttention

        _mlp, qk, vo = masked.split_masks(masks)
        attention_specs = []
        for l, layer in enumerate(adapter.layers(base)):
            pruned = PrunedAttention.from_masks(adapter.attention(layer), base.config, l, maskers[l].router, qk[l],
                                                vo[l], adapter.model_type)
            setattr(layer, adapter.attn_attr, pruned)
            attention_specs.append(pruned.spec())
    base_cfg = base.config.to_dict()
    config = ToMoEConfig(base_config=base_cfg, num_experts=masks[0].shape[0], moe_layers=specs, budget=budget,
                         attention_layers=attention_specs)
    return ToMoEForCausalLM(config, model=base)


def save_converted(model: ToMoEForCausalLM, folder: str | Path, tokenizer=None, metadata: dict | None = None) -> Path:
    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        model.config.to_json_file(tmp / "config.json")
        save_model(model, str(tmp / "model.safetensors"))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        meta = dict(metadata or {})
        meta.update(format_version=FORMAT_VERSION, saved_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    weights_sha256=sha256_file(tmp / "model.safetensors"))
        atomic_write_json(tmp / "tomoe.json", meta)
    return folder


def read_metadata(folder: str | Path) -> dict:
    path = Path(folder) / "tomoe.json"
    if not path.exists():
        raise ConvertedModelError(f"{folder} is not a converted ToMoE model (no tomoe.json); "
                                  "create one with `python -m tomoe_core convert`")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConvertedModelError(f"{path} is corrupt ({err}); re-run the conversion") from None


def available_memory_bytes(device: str | torch.device = "cpu") -> int:
    """Free memory of a device now: CUDA free memory, or the host's available RAM."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return info["MemAvailable"]
    except (OSError, KeyError, ValueError):  # not Linux: physical pages available
        import os
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def load_converted(folder: str | Path, device: str | torch.device = "cpu", layout: str = "auto",
                   verify: bool = True, load_tokenizer: bool = True, memory_limit_bytes: int | None = None):
    """Load a converted folder. Returns (model, tokenizer or None, metadata).

    layout: a layout or a use, as in `ToMoEForCausalLM.set_layout`; "auto" (the default) is the
    fastest for decoding that fits in half the device's available memory (or memory_limit_bytes).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ConvertedModelError(f"converted model folder {str(folder)!r} does not exist")
    meta = read_metadata(folder)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ConvertedModelError(f"{folder} has format version {meta.get('format_version')}, this tomoe_core "
                                  f"reads version {FORMAT_VERSION}; re-run the conversion")
    weights = folder / "model.safetensors"
    if not weights.exists():
        raise ConvertedModelError(f"{weights} is missing; the conversion folder is incomplete")
    if verify and sha256_file(weights) != meta.get("weights_sha256"):
        raise ConvertedModelError(f"{weights} does not match the checksum in tomoe.json (truncated or modified); "
                                  "re-run the conversion")
    config = ToMoEConfig.from_json_file(str(folder / "config.json"))
    model = ToMoEForCausalLM(config)
    missing, unexpected = load_model(model, str(weights), strict=False)
    legacy = [k for k in missing if k.endswith(".union_channels")]  # saved before union ids were stored
    if unexpected or len(legacy) != len(missing):
        raise ConvertedModelError(f"{weights} does not match {folder / 'config.json'} (missing {missing[:3]}, "
                                  f"unexpected {unexpected[:3]}); re-run the conversion")
    if legacy:
        _recover_union_channels(model, meta.get("model"), folder)
    model = model.to(device).eval()
    model.set_layout(layout, memory_limit_bytes)
    tokenizer = None
    if load_tokenizer:
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(folder)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, meta


@torch.no_grad()
def _recover_union_channels(model: ToMoEForCausalLM, model_name: str | None, folder: Path) -> None:
    """Find every kept union row among the dense model's rows (they are exact copies)."""
    from .models import load_dense

    if not model_name:
        raise ConvertedModelError(f"{folder} predates stored union channel ids and names no dense model; "
                                  "re-run the conversion")
    dense, _ = load_dense(model_name, log=lambda *a: None)
    adapter = adapter_for(dense)
    for l, (layer, moe) in enumerate(zip(adapter.layers(dense), model.moe_mlps)):
        dense_up = adapter.mlp_weights(adapter.mlp(layer)).up.detach().float().cpu()  # (I, D)
        row_id = {row.numpy().tobytes(): i for i, row in enumerate(dense_up)}
        ids = [row_id.get(row.numpy().tobytes(), -1) for row in moe.up.detach().float().cpu()]
        if -1 in ids:
            raise ConvertedModelError(f"{folder}: layer {l} keeps channels that {model_name} does not have; "
                                      "re-run the conversion")
        moe.union_channels = torch.tensor(ids, dtype=torch.long, device=moe.union_channels.device)


def conversion_digest(meta: dict) -> str:
    return str(meta.get("weights_sha256", ""))[:16]


# -- recipes: a conversion without the dense weights --------------------------------------------
RECIPE_FILE = "recipe.safetensors"
_RECIPE_KEYS = ("union_channels", "expert_channels", "expert_offsets", "router.weight", "router.bias")


def recipe_state(model: ToMoEForCausalLM) -> dict[str, torch.Tensor]:
    """What a conversion adds to the dense model: routers and channel index lists (about 1 MB)."""
    if getattr(model.config, "attention_layers", None):
        raise ConvertedModelError("recipes do not store pruned attention yet: share the converted folder itself")
    state = {}
    for l, m in enumerate(model.moe_mlps):
        sd = m.state_dict()
        for key in _RECIPE_KEYS:
            state[f"layers.{l}.{key}"] = sd[key].detach().cpu().contiguous()
    return state


def save_recipe(model: ToMoEForCausalLM, folder: str | Path, metadata: dict) -> Path:
    """Write a recipe folder (config.json, recipe.safetensors, tomoe.json): small enough for git."""
    from safetensors.torch import save_file

    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        model.config.to_json_file(tmp / "config.json")
        save_file(recipe_state(model), str(tmp / RECIPE_FILE))
        meta = dict(metadata)
        meta.update(format_version=FORMAT_VERSION, recipe_sha256=sha256_file(tmp / RECIPE_FILE))
        meta.pop("weights_sha256", None)
        atomic_write_json(tmp / "tomoe.json", meta)
    return folder


def materialise_from_recipe(folder: str | Path, dense) -> ToMoEForCausalLM:
    """Rebuild a converted model from a recipe and the dense model it was made from (consumes `dense`)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    meta = read_metadata(folder)
    path = folder / RECIPE_FILE
    if not path.exists() or sha256_file(path) != meta.get("recipe_sha256"):
        raise ConvertedModelError(f"recipe {path} is missing or does not match its checksum in tomoe.json")
    state = load_file(str(path))
    config = ToMoEConfig.from_json_file(str(folder / "config.json"))
    adapter = adapter_for(dense)
    layers = adapter.layers(dense)
    if len(layers) != len(config.moe_layers) or dense.config.model_type != config.base_config.get("model_type"):
        raise ConvertedModelError(f"recipe {folder} was made for another model ({config.base_config.get('model_type')}, "
                                  f"{len(config.moe_layers)} layers)")
    for l, layer in enumerate(layers):
        w = adapter.mlp_weights(adapter.mlp(layer))
        union = state[f"layers.{l}.union_channels"].long()
        masks = torch.zeros(config.num_experts, w.intermediate_size)
        offsets = state[f"layers.{l}.expert_offsets"].tolist()
        channels = state[f"layers.{l}.expert_channels"]
        for k in range(config.num_experts):
            masks[k, union[channels[offsets[k]:offsets[k + 1]]]] = 1.0
        router = torch.nn.Linear(w.hidden_size, config.num_experts)
        router.load_state_dict({"weight": state[f"layers.{l}.router.weight"], "bias": state[f"layers.{l}.router.bias"]})
        moe = MoEMLP.from_masks(w, router, masks)
        assert torch.equal(moe.union_channels.cpu(), union), f"layer {l}: union mismatch"
        adapter.set_mlp(layer, moe)
    config.base_config = dense.config.to_dict()
    return ToMoEForCausalLM(config, model=dense.eval())
