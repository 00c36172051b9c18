"""Quality on the user's own text: the upload checks (named errors before any job) and the benchmark's
--text option."""
from __future__ import annotations

import pytest

from tomoe_core.text.reading import TextSourceError, check_text_bytes


def test_upload_checks_name_what_is_wrong():
    assert check_text_bytes("Hello, world.".encode(), "a.txt") == "Hello, world."
    with pytest.raises(TextSourceError, match="a.txt is a binary file"):
        check_text_bytes(b"\x89PNG\r\n\x1a\n\x00\x00", "a.txt")
    with pytest.raises(TextSourceError, match="b.txt is not UTF-8 text"):
        check_text_bytes("caf\u00e9".encode("latin-1"), "b.txt")
    with pytest.raises(TextSourceError, match="c.txt is empty"):
        check_text_bytes(b"  \n\n ", "c.txt")


def test_upload_shorter_than_one_window_is_refused_with_its_token_count():
    from app.own_text_panel import check_upload

    with pytest.raises(TextSourceError, match=r"short.txt has \d+ tokens, fewer than one evaluation window of 512"):
        check_upload(b"Only a few words here.", "short.txt", "smollm2-135m")
    text, windows = check_upload(("The cat sat on the mat. " * 400).encode(), "long.txt", "smollm2-135m")
    assert windows >= 2 and text.startswith("The cat")


def test_quality_benchmark_reads_a_text_file(tmp_path):
    from benchmarks.quality import build_parser

    args = build_parser().parse_args(["--text", str(tmp_path / "mine.txt")])
    assert args.text.endswith("mine.txt")
    assert build_parser().parse_args([]).text == "wiki"
