"""Crash-safe file output and checksums: every artefact is written to a temporary name, then renamed.

A reader therefore sees the old state or the new one, never half a file. Folders are built beside
their destination and swapped in with `os.replace`/`rename`. Also: dropping the resident pages of a
memory-mapped weights file once a layout has its own copy (`release_file_pages`). Part of the runtime
(`save_pretrained` writes tomoe.json with it); `infra.workspace` has the engine's other file helpers."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; artefacts are shared like any file
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode("utf-8"))


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike):
    """Yield a temporary folder beside `final`; on success it replaces `final` in one rename."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()

import ctypes
import mmap
import sys

_MADV_DONTNEED = 4


def _libc():
    """The C library already loaded into this process (symbols of the process itself)."""
    return ctypes.CDLL(None)


def file_mapping_of(start: int, end: int) -> str | None:
    """The file privately mapped over [start, end) in this process, per /proc/self/maps; else None."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                lo, hi = (int(v, 16) for v in fields[0].split("-"))
                if lo <= start and end <= hi:
                    path = fields[5].strip() if len(fields) == 6 else ""
                    return path if fields[1].endswith("p") and path.startswith("/") else None
    except (OSError, ValueError):
        pass
    return None


def release_file_pages(t) -> None:
    """Drop the resident pages of a weights file under tensor `t` (CPU, Linux), once a layout has made its own copy.

    A converted model's weights are memory-mapped from its safetensors file; the mapped original of a
    matrix a layout re-stores would otherwise stay resident beside the copy (about 1/3 of the MLP
    weights for the indexed layout). Only pages of a private file mapping are dropped (MADV_DONTNEED):
    a later read of them faults the file's contents back in, so nothing is lost; anonymous memory
    (a model built in memory) is left alone and is freed with its last tensor as usual.
    """
    if t.device.type != "cpu" or not sys.platform.startswith("linux"):
        return
    page = mmap.PAGESIZE
    start = (t.data_ptr() + page - 1) // page * page
    end = (t.data_ptr() + t.numel() * t.element_size()) // page * page  # the tensor's own extent (contiguous)
    if not t.is_contiguous() or end <= start or file_mapping_of(start, end) is None:
        return
    try:
        _libc().madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), ctypes.c_int(_MADV_DONTNEED))
    except (OSError, AttributeError):
        pass
