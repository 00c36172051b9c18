"""Hub-ready export: a converted folder that loads without tomoe_core (`trust_remote_code=True`).

A converted folder needs `import tomoe_core` (which registers model type "tomoe"); no code runs
from the folder itself. An export adds what stock tools need to load it in a process that cannot
import tomoe_core (the Hugging Face hub, lm-evaluation-harness, a colleague's notebook):
`auto_map` in config.json, and the exported runtime copied beside the weights at export time: exactly
the files of `tomoe_core/moe/`, which imports nothing else from the package (tests/test_imports.py
keeps it so). The copy is the code of the tomoe_core that exported it, never a second hand-maintained
version.
"""
from __future__ import annotations

import ast
import shutil
import sys
from pathlib import Path

import torch

from ..convert.materialise import load_converted
from ..moe import modeling
from ..moe.atomic import atomic_dir
from ..moe.metadata import ConvertedModelError

# what the exported code may import: the standard library and packages every transformers install has
ALLOWED_IMPORTS = {"torch", "transformers", "filelock"}


def export_hub_ready(conversion: str | Path, output: str | Path, dtype: torch.dtype | None = None,
                     max_shard_size: int | str | None = None) -> Path:
    """Write `output`: the conversion's weights, tokenizer and tomoe.json, config.json with `auto_map`,
    and the modelling code. Returns `output` (written atomically: it replaces an existing folder)."""
    conversion, output = Path(conversion), Path(output)
    if output.resolve() == conversion.resolve():
        raise ConvertedModelError(f"export output {output} is the conversion itself; choose another folder")
    model, tokenizer, meta = load_converted(conversion, layout="memory", dtype=dtype)
    config = model.config
    # a dense model dequantised from GGUF keeps quantization_config; stock loaders would act on it
    config.base_config = {k: v for k, v in config.base_config.items() if k != "quantization_config"}
    module = modeling.ToMoEForCausalLM.__module__.rsplit(".", 1)[-1]
    config.auto_map = {"AutoConfig": f"{module}.{modeling.ToMoEConfig.__name__}",
                       "AutoModelForCausalLM": f"{module}.{modeling.ToMoEForCausalLM.__name__}"}
    shard = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    with atomic_dir(output) as tmp:
        model.save_pretrained(tmp, tokenizer=tokenizer, metadata={**meta, "exported_from": str(conversion)}, **shard)
        code = [Path(shutil.copyfile(path, tmp / path.name)) for path in runtime_files()]
        _check_self_contained(code)
    return output


def runtime_files() -> list[Path]:
    """The exported runtime: the Python files of tomoe_core/moe/ (the folder `modeling` lives in)."""
    return sorted(Path(modeling.__file__).parent.glob("*.py"))


def _check_self_contained(files: list) -> None:
    """The copied code must not import tomoe_core (or anything else a bare transformers install lacks)."""
    stdlib = set(sys.stdlib_module_names)
    for path in map(Path, files):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            for name in names:
                top = name.split(".")[0]
                assert top in ALLOWED_IMPORTS or top in stdlib or top == "__future__", \
                    f"exported {path.name} imports {name}: the exported code must stay self-contained"
