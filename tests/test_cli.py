"""The command line's shape: `convert --help` in groups, one option per ConversionConfig setting, and the
settings module importable without torch."""
from __future__ import annotations

import subprocess
import sys
from dataclasses import fields
from pathlib import Path

from tomoe_core.cli import build_parser, config_options
from tomoe_core.convert.config import GROUPS, ConversionConfig

ROOT = Path(__file__).resolve().parent.parent
RUN_OPTIONS = {"help", "output", "evaluate", "anchor_windows"}  # of the run, not settings of the conversion


def _convert_parser():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return sub.choices["convert"]


def test_convert_help_lists_the_groups_essentials_first():
    text = _convert_parser().format_help()
    positions = [text.index(f"\n{title}:\n") for title in GROUPS]
    assert list(GROUPS) == ["essentials", "training recipe", "advanced / research"]
    assert positions == sorted(positions)
    essentials = text[positions[0]:positions[1]]
    for flag in ("--model", "--text", "--budget", "--budget-range", "--experts", "--steps", "--output", "--device"):
        assert f"  {flag} " in essentials
    advanced = text[positions[2]:]
    for flag in ("--train-gap", "--prior-scale", "--mask-noise", "--noise-anneal", "--regularise", "--lam"):
        assert f"  {flag} " in advanced and f"  {flag} " not in essentials


def test_every_setting_has_exactly_one_option_or_is_marked_internal():
    actions = _convert_parser()._actions
    for f in fields(ConversionConfig):
        owned = [a for a in actions if a.dest == f.name]
        if "internal" in f.metadata:
            assert not owned and "cli" not in f.metadata and f.metadata["internal"], f.name
        else:
            assert "cli" in f.metadata, f"{f.name}: declare it with config.option(...) or config.internal(...)"
            assert len(owned) == 1, f.name
            assert owned[0].default == f.default, f.name  # the defaults live with the field
    settings = {f.name for f in fields(ConversionConfig)}
    assert {a.dest for a in actions} - settings == RUN_OPTIONS


def test_options_parse_into_the_config_they_name():
    args = build_parser().parse_args(["convert", "-e", "4", "-p", "0.6", "--budget-range", "0.3", "1.0",
                                      "--no-init-balance", "--prune-attention", "--mask-noise", "0.2"])
    values = {name: getattr(args, name) for name, *_ in config_options()}
    assert values["num_experts"] == 4 and values["budget"] == 0.6 and values["budget_range"] == [0.3, 1.0]
    assert values["init_balance"] is False and values["prune_attention"] is True and values["mask_noise"] == 0.2
    defaults = {name: getattr(build_parser().parse_args(["convert"]), name) for name, *_ in config_options()}
    assert ConversionConfig(**defaults) == ConversionConfig()


def test_config_module_imports_without_torch():
    # tomoe_core/__init__ loads the engine, so the package is stood in for: what is checked is that config.py
    # and everything it imports stay torch-free
    code = ("import sys, types; sys.modules['torch'] = None; "
            f"pkg = types.ModuleType('tomoe_core'); pkg.__path__ = [{str(ROOT / 'tomoe_core')!r}]; "
            "sys.modules['tomoe_core'] = pkg; "
            "from tomoe_core.convert.config import ConversionConfig; cfg = ConversionConfig(budget_range=(0.3, 1.0)); "
            "assert cfg.budget_sampling == 'log' and cfg.train_gap == 0.0; "
            "assert not any(m == 'torch' or m.startswith('torch.') for m in sys.modules if sys.modules[m]); "
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_the_package_names_conversion_config_where_it_lives():
    from tomoe_core import ConversionConfig as from_package

    assert from_package is ConversionConfig
