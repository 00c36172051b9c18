"""Materialise a trained conversion into a real MoE model; save and load it.

On disk a converted model is a folder:
  config.json        ToMoEConfig: the dense model's config + every layer's union and expert widths
  model.safetensors  weights (union channels only) + routers + expert index lists; or shards
                     model-0000k-of-0000n.safetensors + model.safetensors.index.json (max_shard_size)
  tokenizer files
  tomoe.json         metadata: budget, settings, measured stats, sha256 of every weight file
No pickles, no rewritten source files. The classes live in `modeling` (also what `export` copies);
`AutoModelForCausalLM.from_pretrained(folder)` and `pipeline("text-generation", model=folder)`
work once `tomoe_core` is imported (the config and model classes are registered on import).
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_model
from transformers import AutoConfig, AutoModelForCausalLM

from ..moe.families import adapter_for
from ..moe.atomic import atomic_dir, sha256_file
from ..moe.layer import MoEMLP
from ..moe.metadata import ConversionMetadata
from ..moe.modeling import (
    FORMAT_VERSION,
    ConvertedModelError,
    ToMoEConfig,
    ToMoEForCausalLM,
    read_metadata,
    verify_weights,
)
from .expert_masks import Masks
from .masked_mlp import MaskedMLP

# Importing tomoe_core makes model type "tomoe" known to the Auto classes. The registration lives
# here, not in `modeling`, so that an exported copy of `modeling` (loaded with trust_remote_code)
# never takes the name over from these classes.
AutoConfig.register("tomoe", ToMoEConfig, exist_ok=True)
AutoModelForCausalLM.register(ToMoEConfig, ToMoEForCausalLM, exist_ok=True)


def materialise(masked, masks: Masks | list[torch.Tensor], budget: float | None = None) -> ToMoEForCausalLM:
    """Build the MoE model from a MaskedModel and its deterministic masks: MLP experts (L x (E, I)) and,
    with attention pruning, Q/K pairs and V/O experts (`Masks`, or its flat list)."""
    masks = Masks.of(masks, len(masked.mlps))
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
    for layer, m in zip(adapter.layers(base), masks.mlp):
        masked_mlp = adapter.mlp(layer)
        assert isinstance(masked_mlp, MaskedMLP)
        w = adapter.mlp_weights(masked_mlp.dense_mlp)
        moe = MoEMLP.from_masks(w, masked_mlp.router, m)
        adapter.set_mlp(layer, moe)
        specs.append({"union_size": moe.union_size, "expert_widths": moe.expert_widths, "gated": w.gated,
                      "up_bias": w.up_bias is not None, "down_bias": w.down_bias is not None})
    attention_specs = None
    if masks.attention:
        from ..moe.attention import PrunedAttention

        attention_specs = []
        for l, layer in enumerate(adapter.layers(base)):
            pruned = PrunedAttention.from_masks(adapter.attention(layer), base.config, l, maskers[l].router,
                                                masks.qk[l], masks.vo[l], adapter.model_type)
            setattr(layer, adapter.attn_attr, pruned)
            attention_specs.append(pruned.spec())
    base_cfg = base.config.to_dict()
    config = ToMoEConfig(base_config=base_cfg, num_experts=masks.mlp[0].shape[0], moe_layers=specs, budget=budget,
                         attention_layers=attention_specs)
    return ToMoEForCausalLM(config, model=base)


def save_converted(model: ToMoEForCausalLM, folder: str | Path, tokenizer=None, metadata: dict | None = None,
                   max_shard_size: int | str | None = None) -> Path:
    """Write a converted folder atomically (it replaces `folder` in one rename): config, weights
    (sharded when larger than `max_shard_size`, e.g. "200MB"), tokenizer and tomoe.json."""
    folder = Path(folder)
    shard = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    with atomic_dir(folder) as tmp:
        model.save_pretrained(tmp, tokenizer=tokenizer, metadata=dict(metadata or {}), **shard)
    if tokenizer is not None:
        model.tokenizer_source = folder
    return folder


def load_converted(folder: str | Path, device: str | torch.device = "cpu", layout: str = "auto",
                   verify: bool = True, load_tokenizer: bool = True, memory_limit_bytes: int | None = None,
                   dtype: torch.dtype | None = None):
    """Load a converted folder. Returns (model, tokenizer or None, metadata).

    layout: a layout or a use, as in `ToMoEForCausalLM.set_layout`; "auto" (the default) is the
    fastest for decoding that fits in half the device's available memory (or memory_limit_bytes).
    dtype: None keeps the saved one.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ConvertedModelError(f"converted model folder {str(folder)!r} does not exist")
    meta = read_metadata(folder)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ConvertedModelError(f"{folder} has format version {meta.get('format_version')}, this tomoe_core "
                                  f"reads version {FORMAT_VERSION}; re-run the conversion")
    if verify:
        verify_weights(folder, meta)
    if _saved_without_union_channels(folder):
        model = _load_legacy(folder, meta).to(device=device, dtype=dtype)
        model.set_layout(layout, memory_limit_bytes)
    else:
        model, info = ToMoEForCausalLM.from_pretrained(folder, device_map=str(device), dtype=dtype or "auto",
                                                       layout=layout, verify=False, memory_limit_bytes=memory_limit_bytes,
                                                       output_loading_info=True)
        missing, unexpected = sorted(info["missing_keys"]), sorted(info["unexpected_keys"])
        if missing or unexpected:  # stock loading would only warn and leave random weights
            raise ConvertedModelError(f"the weights of {folder} do not match its config.json (missing {missing[:3]}, "
                                      f"unexpected {unexpected[:3]}); re-run the conversion")
    tokenizer = None
    if load_tokenizer:
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(folder)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer, meta


def _saved_without_union_channels(folder: Path) -> bool:
    """Conversions saved before union channel ids were stored (one model.safetensors, no `union_channels`)."""
    weights = folder / "model.safetensors"
    if not weights.exists():
        return False
    with safe_open(str(weights), "pt") as f:
        return not any(k.endswith(".union_channels") for k in f.keys())


def _load_legacy(folder: Path, meta: dict) -> ToMoEForCausalLM:
    weights = folder / "model.safetensors"
    model = ToMoEForCausalLM(ToMoEConfig.from_json_file(str(folder / "config.json")))
    missing, unexpected = load_model(model, str(weights), strict=False)
    legacy = [k for k in missing if k.endswith(".union_channels")]
    if unexpected or len(legacy) != len(missing):
        raise ConvertedModelError(f"{weights} does not match {folder / 'config.json'} (missing {missing[:3]}, "
                                  f"unexpected {unexpected[:3]}); re-run the conversion")
    _recover_union_channels(model, meta.get("model"), folder)
    model.tomoe_metadata = meta
    return model


@torch.no_grad()
def _recover_union_channels(model: ToMoEForCausalLM, model_name: str | None, folder: Path) -> None:
    """Find every kept union row among the dense model's rows (they are exact copies)."""
    from .dense import load_dense

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


def dense_model_of(conversion: str | Path, meta: dict) -> str:
    """The dense model a conversion was made from, as tomoe.json names it."""
    return ConversionMetadata(meta).dense_model(conversion)


def check_same_vocabulary(moe: ToMoEForCausalLM, dense, conversion: str | Path, model_name: str) -> None:
    """A conversion only compares with the dense model it was made from: at least their vocabularies agree."""
    ours, theirs = moe.get_input_embeddings().weight.shape[0], dense.get_input_embeddings().weight.shape[0]
    if ours != theirs:
        raise ConvertedModelError(f"{conversion} has a vocabulary of {ours} tokens but the dense model {model_name} has "
                                  f"{theirs}: it was not converted from {model_name}; pass the model it was converted "
                                  "from with --model")


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
        ConversionMetadata(meta).write(tmp)
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
