"""Paths a studio user types are confined to the project's cache and data folders.

Every text box of the studio that takes a path (a dense model folder, a text source, an output
name, a run id, a log to download) goes through `confine` or one of the helpers built on it,
here in the engine rather than in a page, so that the rule is one function and testable. A path
is resolved as the operating system would open it (relative paths against the repository root,
which is the studio's and its jobs' working folder; every `..` and every symlink followed) and
must then lie inside one of the allowed roots:

  cache folder   TOMOE_CACHE or <repo>/cache   models, conversions, routing logs, results
  data folder    TOMOE_DATA or <repo>/data     the user's own text files

The command line is not confined: whoever runs it already has the shell.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

from ..text.sources import DEFAULT_CORPUS
from .locations import REPO_ROOT, cache_dir

CONVERT_PATH_OPTIONS = ("--model", "--text", "--output")  # `convert` options that name files or folders


class PathNotAllowedError(ValueError):
    pass


def data_dir() -> Path:
    root = os.environ.get("TOMOE_DATA")
    return Path(root) if root else REPO_ROOT / "data"


def allowed_roots() -> list[Path]:
    return [cache_dir(), data_dir()]


def _describe(roots: Sequence[Path]) -> str:
    return ", ".join(f"`{Path(r).resolve()}`" for r in roots)


def confine(text: str | os.PathLike, what: str, roots: Sequence[Path] | None = None, allow_root: bool = True) -> Path:
    """The resolved path of `text`, or PathNotAllowedError naming `what` and the allowed folders.

    allow_root=False also refuses a root itself (for names of things made inside a folder).
    """
    roots = list(roots) if roots is not None else allowed_roots()
    raw = str(text).strip()
    if not raw:
        raise PathNotAllowedError(f"{what}: the path is empty; give a path inside {_describe(roots)}")
    if "\x00" in raw:
        raise PathNotAllowedError(f"{what}: the path contains a NUL character")
    path = Path(raw)
    resolved = (path if path.is_absolute() else REPO_ROOT / path).resolve()  # follows symlinks and `..`
    for root in roots:
        root = Path(root).resolve()
        if resolved.is_relative_to(root) and (allow_root or resolved != root):
            return resolved
    hint = "" if str(resolved) == os.path.normpath(REPO_ROOT / path) else f" (it resolves to `{resolved}`)"
    inside = "a file or folder inside" if allow_root else "a name inside"
    raise PathNotAllowedError(f"{what} {raw!r} is outside the folders the studio may use{hint}: give {inside} "
                              f"{_describe(roots)} (copy your file there, or set TOMOE_DATA to its folder "
                              "before starting the studio)")


def confine_text_source(text: str, what: str = "Text source") -> str:
    """'wiki' and 'hf:NAME' pass as they are; a file or folder must be inside the allowed roots."""
    text = text.strip()
    if text == DEFAULT_CORPUS or text.startswith("hf:"):
        return text
    return str(confine(text, what))


def confine_model(text: str, what: str = "Dense model") -> str:
    """A built-in model name passes; a checkpoint folder or .gguf file must be inside the allowed roots."""
    from ..convert.dense import BUILTIN_MODELS

    text = text.strip()
    if text in BUILTIN_MODELS:
        return text
    return str(confine(text, what))


def confine_child(name: str, parent: Path, what: str) -> Path:
    """`parent / name` for a name the user typed (an output name, a run id): one plain component."""
    name = name.strip()
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        raise PathNotAllowedError(f"{what} {name!r} is not a plain name: use letters, digits, '.', '_' or '-' "
                                  f"(it is created inside `{Path(parent).resolve()}`)")
    return confine(Path(parent) / name, what, roots=[parent], allow_root=False)


def routing_run_id(name: str, what: str = "Run id") -> str:
    """A routing run id: letters, digits, '.', '_' and '-' only (surrounding spaces dropped), one plain
    component of the routing folder (not '.', '..' or empty). A name with other characters is refused
    with the plain name it could be (`workspace.safe_name`), never silently changed into it.
    -> the id; PathNotAllowedError otherwise."""
    from .workspace import safe_name

    raw = str(name).strip()
    plain = safe_name(raw) if raw else ""
    if raw and plain != raw:
        raise PathNotAllowedError(f"{what} {raw!r} is not a plain name: use letters, digits, '.', '_' or '-', "
                                  f"for example {plain!r}")
    confine_child(plain, cache_dir() / "routing", what)
    return plain


def check_extra_options(tokens: Iterable[str], path_options: Sequence[str], what: str = "Extra options") -> list[str]:
    """Refuse options that take paths (and argparse's abbreviations of them) in a free-text box:
    their own fields confine them."""
    tokens = list(tokens)
    for token in tokens:
        if not token.startswith("--") or len(token) <= 2:
            continue
        name = token.split("=", 1)[0]
        for option in path_options:
            if option.startswith(name) and len(name) > 3:  # argparse accepts unique prefixes
                raise PathNotAllowedError(f"{what}: {token!r} sets a path ({option}); use its own field, "
                                          "which keeps paths inside the project's folders")
    return tokens


def confined_files(folder: Path, roots: Sequence[Path]) -> list[Path]:
    """The plain files of `folder` (itself confined to `roots`); a file that is a symlink to
    somewhere outside is refused, not followed."""
    confine(folder, f"Folder {Path(folder).name}", roots)
    files = [p for p in sorted(Path(folder).iterdir()) if p.is_file()]
    for path in files:
        confine(path, f"File {path.name} of {Path(folder).name}", roots)
    return files
