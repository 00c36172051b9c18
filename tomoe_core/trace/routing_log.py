"""Routing logs on disk: the Parquet format, its writer, and finding, checking and annotating runs.

A routing log is one folder per run (`tomoe_core.trace.run.trace_run` writes it; the user-facing
summary is the `python -m tomoe_core trace` entry of the README):

  cache/routing/run_id=<id>/
    part-00000.parquet ...   one row per (token, layer), `routing_schema()`: rows ordered by
                             (doc_id, position, layer), so the per-token columns come in runs of
                             L equal values and cost almost nothing; zstd, row groups of 1 M rows
                             (`write_part`, `PartWriter`); part-rRRR-NNNNN.parquet for rank RRR of
                             a multi-process trace
    documents.parquet        doc_id, title, text, tokens: the traced text, for word alignment
                             (`write_documents`)
    run.json                 model, conversion digest, budget, text source, date, versions,
                             row count, timing, size and sha256 of every file

`position` counts a document's text tokens from 0: the tokenizer's special prefix (BOS), which
the model sees before every window, has no rows; run.json records its ids as `special_prefix`.

Annotation columns (`word`, `pos`, dictionary-encoded strings, null for tokens without a word)
are added to the part files by `add_token_columns`, which `analysis.syntax.annotate_run`
calls: the expert x POS table is then a plain GROUP BY, with no join (10 M rows in well
under a second on 2 cores, where a join on (doc_id, position) took several seconds).

A run folder is built under a temporary name and renamed into place, under a file lock, so a
reader sees a complete run or none; `add_token_columns` swaps in its rebuilt run the same way.
"""
from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Sequence

import numpy as np

from ..infra.workspace import file_lock, safe_name
from ..infra.locations import cache_dir, shipped_dir
from ..moe.atomic import atomic_dir, atomic_write_json, sha256_file
from ..text.sources import Document

SCHEMA_VERSION = 1
SCHEMA_VERSION_KEY = b"tomoe.routing_schema_version"
RUN_META_FILE = "run.json"
DOCUMENTS_FILE = "documents.parquet"
PART_GLOB = "part-*.parquet"
ANNOTATION_COLUMNS = ("word", "pos")
ROW_GROUP_ROWS = 1 << 20  # DuckDB parallelises over row groups; ~1 M rows keeps both cores busy
PART_ROWS = 1 << 22  # rows buffered before a part file is written (bounds memory on long runs)


class RoutingLogError(ValueError):
    pass


def routing_schema():
    import pyarrow as pa

    fields = [
        pa.field("run_id", pa.dictionary(pa.int32(), pa.string())),  # one value per run; also the folder name
        pa.field("doc_id", pa.int32()),
        pa.field("position", pa.int32()),  # token index within its document
        pa.field("token_id", pa.int32()),
        pa.field("token", pa.dictionary(pa.int32(), pa.string())),
        pa.field("char_start", pa.int32()),  # the token's character span in the document text
        pa.field("char_end", pa.int32()),
        pa.field("layer", pa.int16()),
        pa.field("expert", pa.int16()),
        pa.field("router_prob", pa.float32()),
    ]
    return pa.schema(fields, metadata={SCHEMA_VERSION_KEY: str(SCHEMA_VERSION).encode()})


# -- finding and checking runs ------------------------------------------------------------------------
def routing_root() -> Path:
    return cache_dir() / "routing"


def routing_roots() -> list[Path]:
    """Where runs are found: the local cache/routing first, then the small log a clone ships (read-only)."""
    return [routing_root(), shipped_dir() / "routing"]


def default_run_id(model_folder: str | Path, source: str) -> str:
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S%f")[:-3]
    return safe_name(f"{Path(model_folder).name}-{Path(source).name}-{stamp}")


def run_dir(run: str | Path) -> Path:
    """The folder of a run given its id or its folder."""
    path = Path(run)
    if path.is_dir() and (path / RUN_META_FILE).exists():
        return path
    for root in routing_roots():
        if (root / f"run_id={run}").is_dir():
            return root / f"run_id={run}"
    candidate = routing_root() / f"run_id={run}"
    raise RoutingLogError(f"no routing run {str(run)!r} (looked for {path} and {candidate}); list runs with "
                          "tomoe_core.trace.routing_log.list_runs() or create one with `python -m tomoe_core trace`")


def read_run_meta(run: str | Path) -> dict:
    path = run_dir(run) / RUN_META_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise RoutingLogError(f"{path} is unreadable ({err}); re-run the trace") from None


def list_runs(root: str | Path | None = None) -> list[dict]:
    """Metadata of every complete run under `root` (default: `routing_roots()`, a local run shadowing a
    shipped one of the same id), newest first.

    Each dict is the run's run.json plus `path` and `shipped` (True for the clone's own log). Runs
    being written (temporary folders) are skipped.
    """
    roots = [Path(root)] if root is not None else routing_roots()
    runs, seen = [], set()
    for r in roots:
        for folder in sorted(r.glob("run_id=*")) if r.is_dir() else []:
            meta_path = folder / RUN_META_FILE
            if folder.name in seen or not folder.is_dir() or not meta_path.exists():
                continue
            try:
                meta = json.loads(meta_path.read_text())
            except json.JSONDecodeError:
                continue
            seen.add(folder.name)
            runs.append({**meta, "path": str(folder), "shipped": root is None and r != routing_root()})
    return sorted(runs, key=lambda m: m.get("created_at", ""), reverse=True)


def verify_run(run: str | Path) -> None:
    """Raise RoutingLogError when a file of the run is missing or differs from its recorded checksum."""
    folder = run_dir(run)
    for name, info in read_run_meta(folder)["files"].items():
        path = folder / name
        if not path.exists() or sha256_file(path) != info["sha256"]:
            raise RoutingLogError(f"{path} is missing or modified since the trace; re-run the trace")


def file_table(folder: Path) -> dict:
    """run.json's `files`: size and sha256 of every file of the folder but run.json itself."""
    return {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(folder.iterdir()) if p.is_file() and p.name != RUN_META_FILE}


def run_files(run) -> list[Path]:
    """The files of a run, each confined to the routing folder (a symlink leading outside it is
    refused with a PathNotAllowedError): what a download of the log may contain."""
    from ..infra.paths import confined_files

    return confined_files(run_dir(run), routing_roots())


def zip_run(run) -> bytes:
    """The run's files as a zip (stored, not deflated: Parquet is compressed already)."""
    import io
    import zipfile

    files = run_files(run)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for path in files:
            zf.write(path, f"{run_dir(run).name}/{path.name}")
    return buf.getvalue()


# -- annotation columns -------------------------------------------------------------------------------
def has_columns(run, names: Sequence[str] = ANNOTATION_COLUMNS) -> bool:
    """Whether the run's part files carry these columns (the POS annotation, by default)."""
    import pyarrow.parquet as pq

    part = next(iter(sorted(run_dir(run).glob(PART_GLOB))), None)
    return part is not None and set(names) <= set(pq.read_schema(part).names)


def add_token_columns(run, doc_id: np.ndarray, position: np.ndarray, columns: dict[str, Sequence],
                      info: dict | None = None) -> Path:
    """Add per-token string columns (e.g. word, pos) to every (token, layer) row of a run.

    doc_id, position: (n,) the tokens annotated; columns: name -> (n,) strings or None. Rows
    of tokens not listed get nulls. The run is rebuilt beside itself and swapped in under its
    lock (readers see the old run or the new one); run.json gains `annotations[name] = info`
    and fresh checksums.
    """
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = run_dir(run)
    key = (np.asarray(doc_id, np.int64) << 32) | np.asarray(position, np.int64)
    order = np.argsort(key, kind="stable")
    key = key[order]
    values = {name: pa.array(np.asarray(col, dtype=object)[order], pa.string()).dictionary_encode()
              for name, col in columns.items()}
    with file_lock(folder):
        meta = read_run_meta(folder)
        with atomic_dir(folder) as tmp:
            for src in sorted(folder.iterdir()):
                if src.is_file() and not src.match(PART_GLOB) and src.name != RUN_META_FILE:
                    shutil.copy2(src, tmp / src.name)
                elif src.is_dir():  # results kept beside the log (an expert ablation) move with it
                    shutil.copytree(src, tmp / src.name)
            for part in sorted(folder.glob(PART_GLOB)):
                table = pq.read_table(part)
                rows = (table["doc_id"].to_numpy().astype(np.int64) << 32) | table["position"].to_numpy()
                at = np.minimum(np.searchsorted(key, rows), max(len(key) - 1, 0))
                found = key[at] == rows if len(key) else np.zeros(len(rows), bool)
                take = pa.array(np.where(found, at, 0), mask=~found)
                for name, col in values.items():
                    if name in table.schema.names:
                        table = table.drop_columns([name])
                    table = table.append_column(name, col.take(take).cast(pa.dictionary(pa.int32(), pa.string())))
                write_part(table.replace_schema_metadata(table.schema.metadata), tmp / part.name)
            meta.setdefault("annotations", {}).update({name: dict(info or {}) for name in columns})
            files = file_table(tmp)
            for name, entry in files.items():
                if "rows" in meta["files"].get(name, {}):
                    entry["rows"] = meta["files"][name]["rows"]
            meta["files"] = files
            atomic_write_json(tmp / RUN_META_FILE, meta)
    return folder


# -- writing ------------------------------------------------------------------------------------------
def write_part(table, path: Path) -> None:
    """Write one part file: zstd, large row groups, dictionaries for the small-cardinality and
    run-length columns, byte-stream-split for the router probabilities (compresses ~20 % better)."""
    import pyarrow.parquet as pq

    dictionary = [f.name for f in table.schema if f.name != "router_prob"]
    pq.write_table(table, path, row_group_size=ROW_GROUP_ROWS, compression="zstd", use_dictionary=dictionary,
                   column_encoding={"router_prob": "BYTE_STREAM_SPLIT"})


class PartWriter:
    """Buffers row batches and writes them as part-NNNNN.parquet files of large row groups
    (part-rRRR-NNNNN.parquet for rank RRR of a multi-process trace).

    A batch is a dict of equal-length columns: those of `routing_schema()` but run_id and token,
    plus `token_index`, each row's index into `dictionary.strings` (the token strings, which may
    grow between batches: a part file gets the list as it is when the part is written).
    """

    def __init__(self, folder: Path, run_id: str, dictionary, prefix: str = "part-"):
        self.folder, self.run_id, self.dictionary, self.prefix = folder, run_id, dictionary, prefix
        self.buffer: list[dict] = []
        self.buffered = 0
        self.parts: list[tuple[str, int]] = []
        self.rows = 0

    def add(self, columns: dict[str, np.ndarray]) -> None:
        self.buffer.append(columns)
        self.buffered += len(columns["layer"])
        if self.buffered >= PART_ROWS:
            self.flush()

    def flush(self) -> None:
        import pyarrow as pa

        if not self.buffered:
            return
        cols = {k: np.concatenate([c[k] for c in self.buffer]) for k in self.buffer[0]}
        n = len(cols["layer"])
        schema = routing_schema()
        arrays = {
            "run_id": pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array([self.run_id])),
            "token": pa.DictionaryArray.from_arrays(pa.array(cols.pop("token_index")),
                                                    pa.array(self.dictionary.strings, pa.string())),
            **{k: pa.array(v) for k, v in cols.items()},
        }
        table = pa.Table.from_arrays([arrays[f.name].cast(f.type) for f in schema], schema=schema)
        name = f"{self.prefix}{len(self.parts):05d}.parquet"
        write_part(table, self.folder / name)
        self.parts.append((name, n))
        self.rows += n
        self.buffer, self.buffered = [], 0


def write_documents(folder: Path, docs: Sequence[Document], doc_tokens: Sequence[int]) -> None:
    """documents.parquet: every traced document with its token count."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"doc_id": pa.array([d.doc_id for d in docs], pa.int32()),
                      "title": pa.array([d.title for d in docs], pa.string()),
                      "text": pa.array([d.text for d in docs], pa.string()),
                      "tokens": pa.array(list(doc_tokens), pa.int32())})
    pq.write_table(table, folder / DOCUMENTS_FILE, compression="zstd")
