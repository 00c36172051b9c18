"""The Hugging Face classes of a converted model: `ToMoEConfig` and `ToMoEForCausalLM`.

`ToMoEForCausalLM` is a `PreTrainedModel` with `GenerationMixin`: the stock `from_pretrained`
(dtype, device_map, sharded safetensors), `save_pretrained` (max_shard_size), `generate` and
`pipeline("text-generation")` work on it. On top of the stock behaviour it verifies the weight
checksums in tomoe.json when loading, and `save_pretrained` writes tomoe.json (the metadata the
model was loaded or converted with) and the tokenizer beside the weights.

`python -m tomoe_core export --hub-ready` copies this folder (tomoe_core/moe/) beside an exported
model for `trust_remote_code=True`: keep its imports to the standard library, torch, transformers
and the modules of this folder (tests/test_imports.py checks it).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel

from .families import adapter_for
from .atomic import _umask, sha256_file
from .layer import COPY_FREE_LAYOUTS, LAYOUT_PREFERENCE, LAYOUTS, MoEMLP
from .metadata import METADATA_FILE, ConversionMetadata, ConvertedModelError

FORMAT_VERSION = 1
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


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
        context = self.base_config.get("max_position_embeddings", self.base_config.get("n_positions"))
        if context is not None:  # where stock tools (lm-eval's max_length) look for the context length
            kwargs.setdefault("max_position_embeddings", context)
        super().__init__(**kwargs)

    def base(self) -> PretrainedConfig:
        cfg = dict(self.base_config)
        return AutoConfig.for_model(cfg.pop("model_type"), **cfg)


class ToMoEForCausalLM(PreTrainedModel, GenerationMixin):
    """A dense HF causal LM whose MLPs are `MoEMLP`s. Forward and generate delegate to it.

    `tomoe_metadata`: the tomoe.json it was loaded with (None for a fresh conversion);
    `tokenizer_source`: the folder its tokenizer was saved in, if any. `save_pretrained` keeps both.
    """

    config_class = ToMoEConfig
    base_model_prefix = "tomoe"
    main_input_name = "input_ids"
    _supports_sdpa = True  # attention is the dense model's own; it follows the dense model's support

    def __init__(self, config: ToMoEConfig, model: PreTrainedModel | None = None):
        super().__init__(config)
        if model is None:
            # from_pretrained builds the model under the requested dtype: the dense body follows it
            model = AutoModelForCausalLM.from_config(config.base(), dtype=torch.get_default_dtype())
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
        else:  # materialised from trained weights: nothing in it may be re-initialised by post_init
            for module in model.modules():
                module._is_hf_initialized = True
        self.model = model.eval()
        self.tomoe_metadata: dict | None = None
        self.tokenizer_source: Path | None = None
        self.post_init()

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

        `layout` is a layout ("indexed", "shared", "packed", "core+extras"; see `MoEMLP`) or a use:
        "decode" (= "auto": token-by-token generation), "prefill" (long prompts, scoring text)
        or "memory" (no copies). A use picks the fastest layout for it whose extra memory fits
        `memory_limit_bytes` (default: half of the memory now available on the model's device);
        a layout without weight copies (COPY_FREE_LAYOUTS) always fits.
        """
        if layout in LAYOUT_PREFERENCE:
            limit = available_memory_bytes(self.device) // 2 if memory_limit_bytes is None else memory_limit_bytes
            mlps = self.moe_mlps
            for candidate in LAYOUT_PREFERENCE[layout]:
                if sum(m.layout_extra_bytes(candidate) for m in mlps) <= limit or candidate in COPY_FREE_LAYOUTS:
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
    def generation_config(self, value):  # PreTrainedModel.__init__ and from_pretrained assign one
        if value is not None and "model" in self._modules:
            self.model.generation_config = value

    # -- loading and saving -----------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, layout: str = "auto", verify: bool = True,
                        memory_limit_bytes: int | None = None, **kwargs):
        """The stock `PreTrainedModel.from_pretrained` (dtype, device_map, shards, hub ids), plus:
        a local folder's weight files are checked against the checksums in its tomoe.json first
        (`verify=False` skips it), and the MoE layout is chosen for `layout` (see `set_layout`)."""
        folder = Path(pretrained_model_name_or_path)
        meta = None
        if (folder / METADATA_FILE).is_file():
            meta = read_metadata(folder)
            if verify:
                verify_weights(folder, meta)
        loaded = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # output_loading_info=True
        model.tomoe_metadata = meta
        model.tokenizer_source = folder if any((folder / f).is_file() for f in TOKENIZER_FILES) else None
        for attention in model.pruned_attention:  # stock loading assigns tensors without load_state_dict hooks
            attention.refresh()
        model.set_layout(layout, memory_limit_bytes)
        return loaded

    def save_pretrained(self, save_directory, tokenizer=None, metadata: dict | None = None, **kwargs):
        """The stock `save_pretrained` (max_shard_size, safe_serialization, ...), plus the tokenizer
        (given, or the one the model was loaded with) and tomoe.json (`metadata`, or the metadata the
        model was loaded with) carrying the sha256 of every weight file. tomoe.json is written last."""
        folder = Path(save_directory)
        super().save_pretrained(folder, **kwargs)
        if tokenizer is None and self.tokenizer_source is not None and self.tokenizer_source.resolve() != folder.resolve():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_source)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        meta = {k: v for k, v in (metadata if metadata is not None else self.tomoe_metadata or {}).items()
                if k not in ("weights_sha256", "weight_files", "saved_at")}
        files = {p.name: sha256_file(p) for p in sorted(folder.glob("*.safetensors"))}
        for name in files:  # transformers writes weights 0600 (a temporary file renamed); share them like the rest
            os.chmod(folder / name, 0o666 & ~_umask())
        meta.update(format_version=FORMAT_VERSION, saved_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    weights_sha256=_weights_digest(files))
        if list(files) != ["model.safetensors"]:  # shards: each one's checksum (one file: weights_sha256 is its)
            meta["weight_files"] = files
        ConversionMetadata(meta).write(folder)
        self.tomoe_metadata = meta


def _weights_digest(files: dict[str, str]) -> str:
    """One file: its sha256 (what every conversion saved before sharding); shards: sha256 of their list."""
    if list(files) == ["model.safetensors"]:
        return files["model.safetensors"]
    import hashlib

    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def read_metadata(folder: str | Path) -> dict:
    """The fields of a converted folder's tomoe.json (`ConversionMetadata.read`)."""
    return ConversionMetadata.read(folder).fields


def verify_weights(folder: str | Path, meta: dict) -> None:
    """Check every weight file of a converted folder against tomoe.json (one file or shards)."""
    folder = Path(folder)
    files = meta.get("weight_files") or {"model.safetensors": meta.get("weights_sha256")}
    for name, digest in files.items():
        path = folder / name
        if not path.exists():
            raise ConvertedModelError(f"{path} is missing; the conversion folder is incomplete")
        if sha256_file(path) != digest:
            raise ConvertedModelError(f"{path} does not match the checksum in tomoe.json (truncated or modified); "
                                      "re-run the conversion")


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
