"""Paths typed into the studio stay inside the cache and data folders (tomoe_core.infra.paths)."""
from __future__ import annotations

import os

import pytest

from tomoe_core.infra import paths
from tomoe_core.infra.paths import PathNotAllowedError


@pytest.fixture
def roots(tmp_path, monkeypatch):
    cache, data, outside = tmp_path / "cache", tmp_path / "data", tmp_path / "outside"
    for folder in (cache, data, outside):
        folder.mkdir()
    (outside / "secret.txt").write_text("not yours")
    (data / "notes.txt").write_text("Some text.")
    monkeypatch.setenv("TOMOE_CACHE", str(cache))
    monkeypatch.setenv("TOMOE_DATA", str(data))
    return cache, data, outside


def test_allowed_paths_resolve(roots):
    cache, data, _ = roots
    assert paths.confine(data / "notes.txt", "Text") == (data / "notes.txt").resolve()
    assert paths.confine(data / "sub" / ".." / "notes.txt", "Text") == (data / "notes.txt").resolve()
    assert paths.confine(cache, "Folder") == cache.resolve()  # a root itself is a folder the user may name
    assert paths.confine_text_source("wiki") == "wiki" and paths.confine_text_source("hf:wikitext") == "hf:wikitext"
    assert paths.confine_text_source(f" {data / 'notes.txt'} ") == str((data / "notes.txt").resolve())
    assert paths.confine_model("smollm2-135m") == "smollm2-135m"
    assert paths.confine_child("my-run", cache / "conversions", "Output name") == (cache / "conversions" / "my-run").resolve()


def test_dot_dot_escape_is_refused_naming_the_allowed_folders(roots):
    cache, data, outside = roots
    with pytest.raises(PathNotAllowedError) as err:
        paths.confine(f"{data}/../outside/secret.txt", "Text source")
    message = str(err.value)
    assert "Text source" in message and "outside the folders the studio may use" in message
    assert str(cache.resolve()) in message and str(data.resolve()) in message
    with pytest.raises(PathNotAllowedError, match="outside the folders"):
        paths.confine("../../etc/passwd", "Text source")  # relative to the repository root
    with pytest.raises(PathNotAllowedError, match="not a plain name"):
        paths.confine_child("..", cache / "conversions", "Output name")
    with pytest.raises(PathNotAllowedError, match="not a plain name"):
        paths.confine_child("../x", cache / "conversions", "Output name")


def test_absolute_path_outside_is_refused(roots):
    _, _, outside = roots
    with pytest.raises(PathNotAllowedError, match="Dense model '/etc' is outside"):
        paths.confine_model("/etc")
    with pytest.raises(PathNotAllowedError, match="Calibration text"):
        paths.confine_text_source(str(outside / "secret.txt"), "Calibration text")
    with pytest.raises(PathNotAllowedError, match="empty"):
        paths.confine("  ", "Text source")


def test_symlink_pointing_outside_is_refused(roots):
    _, data, outside = roots
    os.symlink(outside / "secret.txt", data / "link.txt")
    os.symlink(outside, data / "linked-folder")
    with pytest.raises(PathNotAllowedError, match="resolves to"):
        paths.confine_text_source(str(data / "link.txt"))
    with pytest.raises(PathNotAllowedError, match="resolves to"):
        paths.confine(data / "linked-folder" / "secret.txt", "Text source")
    os.symlink(data / "notes.txt", data / "inside-link.txt")  # a link that stays inside is fine
    assert paths.confine(data / "inside-link.txt", "Text") == (data / "notes.txt").resolve()


def test_extra_options_may_not_set_paths():
    ok = paths.check_extra_options(["--tokens-per-step", "256", "--seq-len", "128"], paths.CONVERT_PATH_OPTIONS)
    assert ok == ["--tokens-per-step", "256", "--seq-len", "128"]
    for tokens in (["--output", "/tmp/x"], ["--output=/tmp/x"], ["--out", "/tmp/x"], ["--te", "/etc/passwd"],
                   ["--model", "/opt/model"]):
        with pytest.raises(PathNotAllowedError, match="sets a path .*use its own field"):
            paths.check_extra_options(tokens, paths.CONVERT_PATH_OPTIONS, "Extra convert options")


def test_download_of_a_log_refuses_a_symlink_leading_outside(roots):
    from tomoe_core.trace import routing_log
    from tomoe_core.moe.atomic import atomic_write_json

    cache, _, outside = roots
    run = cache / "routing" / "run_id=r"
    run.mkdir(parents=True)
    (run / "part-00000.parquet").write_bytes(b"x")
    atomic_write_json(run / "run.json", {"run_id": "r", "files": {}})
    assert [p.name for p in routing_log.run_files("r")] == ["part-00000.parquet", "run.json"]
    assert len(routing_log.zip_run("r")) > 0
    os.symlink(outside / "secret.txt", run / "documents.parquet")
    with pytest.raises(PathNotAllowedError, match="File documents.parquet of run_id=r .*outside"):
        routing_log.zip_run("r")


def test_runs_page_refuses_paths_outside_with_a_message(cache_env):
    """The studio's Runs page: every path box goes through tomoe_core.infra.paths; nothing is started."""
    from test_app import run_page
    from tomoe_core.infra import jobs

    before = {j.id for j in jobs.list_jobs()}

    def start_conversion(**boxes):
        at = run_page("runs")
        for label, value in boxes.items():
            [t for t in at.text_input if t.label == label][0].input(value)
        [b for b in at.button if b.label == "Start conversion"][0].click().run()
        assert not at.exception
        return " ".join(e.value for e in at.error)

    assert "Calibration text '/etc/passwd' is outside the folders" in start_conversion(**{"Calibration text": "/etc/passwd"})
    assert "Dense model '../../etc' is outside" in start_conversion(**{"Dense model": "../../etc"})
    assert "Output name '..' is not a plain name" in start_conversion(**{"Output name": ".."})
    assert "sets a path (--output)" in start_conversion(**{"Extra convert options": "--steps 2 --output /tmp/elsewhere"})

    at = run_page("runs")
    [s for s in at.selectbox if s.label == "Text"][0].set_value("a .txt or .conllu file, or a folder")
    [t for t in at.text_area if t.label.startswith("Prompts")][0].input("/etc")
    [b for b in at.button if b.label == "Start trace"][0].click().run()
    assert not at.exception
    assert any("Text file or folder '/etc' is outside the folders" in e.value for e in at.error)
    assert {j.id for j in jobs.list_jobs()} == before
