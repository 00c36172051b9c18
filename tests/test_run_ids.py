"""Run ids follow the plain-name rule of output names; trace-size estimates for the Runs page."""
from __future__ import annotations

import pytest

from analysis.trace_estimate import (DEFAULT_ACTIVE_PARAMS, DEFAULT_LOAD_S, DEFAULT_TOKENS_PER_S,
                                     DEFAULT_TOTAL_PARAMS, START_S, TraceSpeed, trace_speed)
from tomoe_core.infra import paths
from tomoe_core.infra.paths import PathNotAllowedError


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TOMOE_CACHE", str(tmp_path))
    return tmp_path


@pytest.mark.parametrize("bad", ["..", ".", "", "   ", " .. "])
def test_run_ids_that_are_not_plain_names_are_refused(cache, bad):
    with pytest.raises(PathNotAllowedError, match="Run id .* not a plain name"):
        paths.routing_run_id(bad)


def test_run_ids_are_plain_names_or_refused_with_the_name_they_could_be(cache):
    """A run id is never changed silently ("../x" used to become ".._x" and a trace started)."""
    assert paths.routing_run_id("wiki-3k_v1.2") == "wiki-3k_v1.2"
    assert paths.routing_run_id(" my-run ") == "my-run"
    for bad, plain in (("../x", ".._x"), ("a/b", "a_b"), ("x y", "x_y"), ("a/../b", "a_.._b")):
        with pytest.raises(PathNotAllowedError, match=f"Run id '{bad}' is not a plain name.*for example '{plain}'"):
            paths.routing_run_id(bad)


def test_trace_cli_refuses_a_run_id_of_dotdot(capsys):
    from tomoe_core.cli import build_parser

    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["trace", "conv", "--run-id", ".."])
    assert "not a plain name" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["trace", "conv", "--run-id", "a b"])
    assert "for example 'a_b'" in capsys.readouterr().err
    assert parser.parse_args(["trace", "conv", "--run-id", "a_b"]).run_id == "a_b"


def _run(conversion, tokens_per_s, load_s, layers=30, device="cpu", world=1, tokens=3000):
    return {"conversion": f"/x/{conversion}", "num_layers": layers, "world_size": world, "tokens": tokens,
            "machine": {"device": device}, "timing": {"tokens_per_s": tokens_per_s, "load_s": load_s}}


def test_trace_speed_uses_the_latest_traces_of_the_conversion():
    runs = [_run("a", 30, 1, tokens=127), _run("a", 100, 10), _run("b", 500, 2), _run("a", 120, 6), _run("a", 80, 8),
            _run("a", 1, 1), _run("a", 1000, 1, device="cuda"), _run("a", 900, 1, world=2)]
    speed = trace_speed(runs, "/elsewhere/a")
    # median of the 3 latest CPU traces; the 127-token one is left out
    assert (speed.tokens_per_s, speed.load_s) == (100, 8) and "this conversion" in speed.basis
    other = trace_speed(runs, "c", num_layers=30)
    assert other.tokens_per_s == 120 and "30-layer" in other.basis  # median of the 3 latest 30-layer traces
    assert trace_speed([], "a").tokens_per_s == DEFAULT_TOKENS_PER_S
    shipped = {**_run("a", 5000, 1), "shipped": True}  # the clone's own log was traced on another machine
    assert trace_speed([shipped], "a").tokens_per_s == DEFAULT_TOKENS_PER_S
    # no trace here: the default scales with the conversion's size (twice the active parameters, half the speed)
    big = trace_speed([], "a", accounting={"active_total": 2 * DEFAULT_ACTIVE_PARAMS, "dense_total": 3 * DEFAULT_TOTAL_PARAMS})
    assert big.tokens_per_s == pytest.approx(DEFAULT_TOKENS_PER_S / 2) and big.load_s == pytest.approx(3 * DEFAULT_LOAD_S)
    assert "190 M active" in big.basis


def test_default_trace_size_finishes_in_about_a_minute():
    speed = TraceSpeed(110.0, 8.0, "test")
    tokens = speed.tokens_for(60)
    assert tokens % 500 == 0 and 50 <= speed.seconds(tokens) <= 60 < speed.seconds(tokens + 500)
    assert speed.seconds(0) == START_S + 8.0
    assert TraceSpeed(1.0, 100.0, "slow").tokens_for(60) == 500  # never below one step


def test_the_trace_api_refuses_a_run_id_of_dotdot_before_loading_anything(cache):
    from tomoe_core.trace.run import trace_run

    with pytest.raises(PathNotAllowedError, match="not a plain name"):
        trace_run("no-such-conversion", run_id="..")
    assert not (cache / "routing").exists() or not any((cache / "routing").iterdir())
