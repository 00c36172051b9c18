"""Reading a text source's files: the error every text source raises, and UTF-8 with a named fix. Torch-free."""
from __future__ import annotations

from pathlib import Path


class TextSourceError(ValueError):
    """A text source that cannot be read (missing, not UTF-8, malformed, empty); the message names it."""


def read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise TextSourceError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start}); "
                              f"convert it, e.g. `iconv -t UTF-8 {path}`") from None


def check_text_bytes(data: bytes, name: str) -> str:
    """An uploaded text file's contents as text, or a TextSourceError naming what is wrong with it
    (binary, not UTF-8, empty), before any job starts."""
    if b"\x00" in data[:65536]:
        raise TextSourceError(f"{name} is a binary file, not text: upload a plain .txt file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise TextSourceError(f"{name} is not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8") from None
    if not text.strip():
        raise TextSourceError(f"{name} is empty")
    return text
