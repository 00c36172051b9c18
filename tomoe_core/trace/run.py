"""Running a trace: a converted model over a text source -> a routing log (`tomoe_core.trace.routing_log`).

`trace_run(...)` tokenizes the text, cuts every document into windows, runs them through the
model under `capture_routing` (`tomoe_core.trace.capture`) and writes the rows, documents.parquet and
run.json into a new run folder; the folder layout and the Parquet format are documented (and
written) in `tomoe_core.trace.routing_log`. The run folder is built under a temporary name and renamed
into place, under a file lock, so a reader sees a complete run or none. Under torchrun every rank
traces its own shard of the text into the same temporary folder (`trace_run`).

Every sequence the model sees starts the way its tokenizer starts a text (`data.special_prefix`:
BOS for Gemma, Llama, Mistral; nothing for SmolLM2, GPT-2, Qwen). The prefix tokens have no rows:
`position` counts a document's text tokens from 0, and run.json records `special_prefix`.

Legend: L = MoE layers, B = sequences in a batch, T = tokens per sequence, N = B * T.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from ..infra.workspace import file_lock
from ..infra.paths import routing_run_id
from ..infra.ranks import dist_info
from ..moe.atomic import atomic_dir, atomic_write_json
from ..text.reading import TextSourceError
from ..text.sources import DEFAULT_CORPUS, Document, load_documents, special_prefix
from .capture import capture_routing, routing_points
from .routing_log import (
    RUN_META_FILE,
    SCHEMA_VERSION,
    PartWriter,
    RoutingLogError,
    default_run_id,
    file_table,
    routing_root,
    write_documents,
)


# -- windows and batches ------------------------------------------------------------------------------
@dataclass
class _Window:
    doc_id: int
    start: int  # position of the first token within its document
    ids: np.ndarray  # (T,) int32
    offsets: np.ndarray  # (T, 2) int32 character spans


def _tokenize(tokenizer, docs: Sequence[Document], max_tokens: int | None) -> tuple[list, list[int]]:
    """-> per document (ids (n,), offsets (n, 2)), cut so that the total is at most max_tokens."""
    encoded, total = [], 0
    for doc in docs:
        enc = tokenizer(doc.text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        ids = np.asarray(enc["input_ids"], dtype=np.int32)
        offsets = np.asarray(enc["offset_mapping"], dtype=np.int32).reshape(-1, 2)
        if max_tokens is not None:
            ids, offsets = ids[: max_tokens - total], offsets[: max_tokens - total]
        encoded.append((ids, offsets))
        total += len(ids)
        if max_tokens is not None and total >= max_tokens:
            break
    return encoded, [len(ids) for ids, _ in encoded]


def _windows(encoded, seq_len: int) -> list[_Window]:
    """Non-overlapping windows of at most seq_len tokens, never across documents."""
    out = []
    for doc_id, (ids, offsets) in enumerate(encoded):
        for start in range(0, len(ids), seq_len):
            out.append(_Window(doc_id, start, ids[start:start + seq_len], offsets[start:start + seq_len]))
    return out


def _batches(windows: list[_Window], batch_size: int) -> Iterator[list[_Window]]:
    for i in range(0, len(windows), batch_size):
        yield windows[i:i + batch_size]


def _pad(batch: list[_Window], pad_id: int, device, prefix: Sequence[int] = ()
         ) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """`prefix` + each window, right-padded (causal attention: pads after a token cannot change it).
    -> ids, attention mask (B, T), valid (B, T): the window's own tokens, which get rows."""
    k = len(prefix)
    length = k + max(len(w.ids) for w in batch)
    ids = np.full((len(batch), length), pad_id, dtype=np.int64)
    valid = np.zeros((len(batch), length), dtype=bool)
    ids[:, :k] = prefix
    for b, w in enumerate(batch):
        ids[b, k: k + len(w.ids)] = w.ids
        valid[b, k: k + len(w.ids)] = True
    attend = valid.copy()
    attend[:, :k] = True
    mask = torch.from_numpy(attend.astype(np.int64))
    return torch.from_numpy(ids).to(device), mask.to(device), valid


def token_strings(tokenizer, token_ids: Sequence[int]) -> list[str]:
    """Readable text of each token id (a leading space stays a space, not 'Ġ')."""
    return [tokenizer.decode([int(t)]) for t in token_ids]


class _TokenDictionary:
    """token_id -> index into a growing list of token strings (the Parquet dictionary)."""

    def __init__(self, tokenizer, vocab_size: int):
        self.tokenizer = tokenizer
        self.index = np.full(max(vocab_size, 1), -1, dtype=np.int32)
        self.strings: list[str] = []

    def encode(self, token_ids: np.ndarray) -> np.ndarray:
        if token_ids.size and int(token_ids.max()) >= len(self.index):
            self.index = np.concatenate([self.index, np.full(int(token_ids.max()) + 1 - len(self.index), -1, np.int32)])
        new = np.unique(token_ids[self.index[token_ids] < 0])
        if len(new):
            self.index[new] = np.arange(len(self.strings), len(self.strings) + len(new), dtype=np.int32)
            self.strings.extend(token_strings(self.tokenizer, new.tolist()))
        return self.index[token_ids]


def _batch_rows(batch: list[_Window], valid: np.ndarray, experts: np.ndarray, probs: np.ndarray,
                token_index: Callable[[np.ndarray], np.ndarray]) -> dict[str, np.ndarray]:
    """Rows of one batch, token-major: experts/probs (L, B*T) -> columns of n_valid * L rows."""
    num_layers = experts.shape[0]
    flat_valid = valid.ravel()  # (B*T,)
    token_ids = np.concatenate([w.ids for w in batch])
    offsets = np.concatenate([w.offsets for w in batch])
    doc_ids = np.concatenate([np.full(len(w.ids), w.doc_id, np.int32) for w in batch])
    positions = np.concatenate([np.arange(w.start, w.start + len(w.ids), dtype=np.int32) for w in batch])
    n = len(token_ids)
    return {
        "doc_id": np.repeat(doc_ids, num_layers), "position": np.repeat(positions, num_layers),
        "token_id": np.repeat(token_ids, num_layers), "token_index": np.repeat(token_index(token_ids), num_layers),
        "char_start": np.repeat(offsets[:, 0], num_layers), "char_end": np.repeat(offsets[:, 1], num_layers),
        "layer": np.tile(np.arange(num_layers, dtype=np.int16), n),
        "expert": experts[:, flat_valid].T.ravel(), "router_prob": probs[:, flat_valid].T.ravel(),
    }


# -- one process --------------------------------------------------------------------------------------
@dataclass
class TracePlan:
    """A loaded model and the batches a trace will run (`plan_trace`); `run_plan` runs them."""
    model: object
    tokenizer: object
    meta: dict
    docs: list[Document]
    doc_tokens: list[int]
    windows: list[_Window]
    batch_size: int
    device: str
    prefix: tuple[int, ...] = ()  # the tokenizer's special prefix (BOS), before every window
    num_layers: int = field(init=False)

    def __post_init__(self):
        self.num_layers = len(routing_points(self.model))

    def batches(self):
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        for batch in _batches(self.windows, self.batch_size):
            ids, mask, valid = _pad(batch, pad, self.device, self.prefix)
            yield batch, ids, mask, valid


def plan_trace(model_folder: str | Path, source: str = DEFAULT_CORPUS, split: str = "heldout",
               prompts: Sequence[str] | None = None, max_tokens: int | None = None, seq_len: int = 512,
               batch_size: int = 4, device: str = "cpu", layout: str = "shared") -> TracePlan:
    from ..convert.materialise import load_converted

    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"seq_len ({seq_len}) and batch_size ({batch_size}) must be at least 1")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
    if prompts:
        docs = [Document(i, f"prompt {i}", p) for i, p in enumerate(prompts) if p and p.strip()]
        if not docs:
            raise TextSourceError("all prompts are empty: pass some text")
    else:
        docs = load_documents(source, split)  # a bad text source is refused before the model loads
    model, tokenizer, meta = load_converted(model_folder, device=device, layout=layout)
    encoded, doc_tokens = _tokenize(tokenizer, docs, max_tokens)
    if sum(doc_tokens) == 0:
        raise TextSourceError(f"text source {source!r} produced no tokens")
    docs = docs[: len(encoded)]
    prefix = tuple(special_prefix(tokenizer))
    if seq_len <= len(prefix):
        raise ValueError(f"seq_len ({seq_len}) leaves no room for text after the tokenizer's {len(prefix)} prefix tokens")
    return TracePlan(model, tokenizer, meta, docs, doc_tokens, _windows(encoded, seq_len - len(prefix)), batch_size,
                     device, prefix)


def _library_versions() -> dict:
    import duckdb  # recorded because tomoe_core.trace.queries reads the log with it
    import pyarrow
    import transformers

    from ..moe.modeling import FORMAT_VERSION

    return {"torch": torch.__version__, "transformers": transformers.__version__, "pyarrow": pyarrow.__version__,
            "duckdb": duckdb.__version__, "numpy": np.__version__, "tomoe_format": FORMAT_VERSION,
            "routing_schema": SCHEMA_VERSION}

@torch.inference_mode()
def run_plan(plan: TracePlan, folder: Path, run_id: str, progress: Callable[[int, int], None] | None = None,
             compare_untraced: bool = False, part_prefix: str = "part-") -> dict:
    """Trace every batch of `plan` into `folder`. -> counts and seconds spent.

    compare_untraced: also run every batch without hooks, right before or after the traced
    run of the same batch (alternating), so that background load hits both sides alike.
    The traced side is forward with hooks + host copy (`forward_s`), building rows
    (`record_s`) and writing Parquet (`write_s`).
    """
    dictionary = _TokenDictionary(plan.tokenizer, len(plan.tokenizer))
    writer = PartWriter(folder, run_id, dictionary, part_prefix)
    total = sum(len(w.ids) for w in plan.windows)  # this rank's share under torchrun
    sync = torch.cuda.synchronize if str(plan.device).startswith("cuda") else (lambda: None)
    done, forward_s, record_s, untraced_s = 0, 0.0, 0.0, 0.0
    for i, (batch, ids, mask, valid) in enumerate(plan.batches()):
        sides = ((False, True) if i % 2 == 0 else (True, False)) if compare_untraced else (True,)
        for traced in sides:
            sync()
            t0 = time.perf_counter()
            if not traced:
                plan.model(input_ids=ids, attention_mask=mask)
                sync()
                untraced_s += time.perf_counter() - t0
                continue
            with capture_routing(plan.model) as records:
                plan.model(input_ids=ids, attention_mask=mask)
            experts, probs = records.stacked()  # (L, B*T): the one host copy of this batch
            t1 = time.perf_counter()
            writer.add(_batch_rows(batch, valid, experts, probs, dictionary.encode))
            forward_s, record_s = forward_s + t1 - t0, record_s + time.perf_counter() - t1
        done += int(valid.sum())
        if progress is not None:
            progress(done, total)
    t3 = time.perf_counter()
    writer.flush()
    write_s = time.perf_counter() - t3
    return {"rows": writer.rows, "tokens": done, "parts": writer.parts, "forward_s": forward_s,
            "record_s": record_s, "write_s": write_s, "traced_s": forward_s + record_s + write_s,
            "untraced_s": untraced_s if compare_untraced else None}


# -- several processes (torchrun) ---------------------------------------------------------------------
def shard_windows(windows: list[_Window], rank: int, world: int) -> list[_Window]:
    """Rank `rank`'s contiguous share of the windows, holding about 1/world of the tokens.

    A window belongs to the rank whose share of the token count holds its first token. The
    shards in rank order are the windows in document order, so the ranks' part files read in
    name order give the rows of a single-process trace in the same order.
    """
    lengths = np.array([len(w.ids) for w in windows], dtype=np.int64)
    total = int(lengths.sum())
    if total == 0:
        return []
    first_token = np.cumsum(lengths) - lengths  # (n_windows,)
    owner = np.minimum(first_token * world // total, world - 1)
    return [w for w, r in zip(windows, owner) if r == rank]


def _join_ranks() -> tuple[int, int, bool]:
    """(rank, world size, whether this call started the process group).

    Launched by torchrun (WORLD_SIZE > 1), the ranks coordinate over gloo whatever the device:
    only a folder name, small per-rank summaries and barriers travel between them.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return (*dist_info(), False)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, False
    dist.init_process_group("gloo")
    return (*dist_info(), True)


def _from_rank0(obj, world: int):
    if world == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _from_every_rank(obj, world: int) -> list:
    if world == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def trace_run(model_folder: str | Path, source: str = DEFAULT_CORPUS, split: str = "heldout",
              prompts: Sequence[str] | None = None, max_tokens: int | None = None, seq_len: int = 512,
              batch_size: int = 4, device: str = "cpu", layout: str = "shared", run_id: str | None = None,
              root: str | Path | None = None, overwrite: bool = False,
              progress: Callable[[int, int], None] | None = None, command: str | None = None,
              compare_untraced: bool = False) -> Path:
    """Run a converted model over a text source and write its routing log. -> the run folder.

    source: "wiki" (the default corpus, `split` "heldout" or "calibration"), a .txt file or a
    folder of .txt files; `prompts` (a list of texts) replaces the source when given. Each
    document is cut into non-overlapping windows of `seq_len` tokens, the tokenizer's prefix (BOS)
    included (a window's first tokens see no earlier context), `batch_size` windows per forward. `progress(tokens_done, total)`
    is called after every batch. `compare_untraced` runs every batch a second time without
    hooks, side by side, and records the tracing overhead in run.json (timing.overhead_pct).

    Under `torchrun --nproc_per_node N` (WORLD_SIZE > 1) every rank traces its own contiguous
    shard of the windows (`shard_windows`) into the same run: rank 0 takes the run's lock and
    creates the temporary folder, every rank writes its part-rRRR-*.parquet files into it, and
    once all ranks have finished rank 0 writes documents.parquet and run.json (rows and sha256
    of every rank's files) and renames the folder into place. Readers therefore see the whole
    multi-rank run or none, exactly as for one process. The ranks must share the cache folder
    (one machine, or a shared file system); `progress` is called on rank 0 only, for its shard.
    """
    t_start = time.perf_counter()
    source_name = "prompts" if prompts else str(source)
    run_id = routing_run_id(run_id) if run_id else default_run_id(model_folder, source_name)
    root = Path(root) if root is not None else routing_root()
    final = root / f"run_id={run_id}"
    rank, world, own_group = _join_ranks()
    if world > 1 and device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    try:
        with contextlib.ExitStack() as rank0_holds:  # rank 0: the run's lock, then its temporary folder
            tmp, refusal = None, None
            if rank == 0:
                rank0_holds.enter_context(file_lock(final))
                if final.exists() and not overwrite:
                    refusal = f"routing run {run_id!r} exists at {final}; choose another run id or overwrite it"
                else:
                    tmp = rank0_holds.enter_context(atomic_dir(final))
            tmp, refusal = _from_rank0((tmp, refusal), world)
            if refusal:
                raise RoutingLogError(refusal)
            tmp = Path(tmp)
            if not tmp.is_dir():
                raise RoutingLogError(f"rank {rank} cannot see the run's temporary folder {tmp}: the processes of a "
                                      "multi-process trace must share the cache folder (one machine, or TOMOE_CACHE "
                                      "on a shared file system)")
            plan = plan_trace(model_folder, source, split, prompts, max_tokens, seq_len, batch_size, device, layout)
            t_loaded = time.perf_counter()
            if world > 1:
                plan.windows = shard_windows(plan.windows, rank, world)
            stats = run_plan(plan, tmp, run_id, progress if rank == 0 else None, compare_untraced,
                             part_prefix=f"part-r{rank:03d}-" if world > 1 else "part-")
            ranks = _from_every_rank({**stats, "rank": rank}, world)
            if rank == 0:
                write_documents(tmp, plan.docs, plan.doc_tokens)
                _write_run_meta(tmp, plan, ranks, t_start=t_start, t_loaded=t_loaded, run_id=run_id,
                                model_folder=model_folder, source_name=source_name,
                                split=None if prompts else split, max_tokens=max_tokens, seq_len=seq_len,
                                batch_size=batch_size, layout=layout, device=device, command=command)
        # rank 0 has renamed the folder into place and released the lock
        if world > 1:
            import torch.distributed as dist

            dist.barrier()  # the other ranks return once the run is readable
        return final
    finally:
        if own_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def _write_run_meta(tmp: Path, plan: TracePlan, ranks: list[dict], *, t_start: float, t_loaded: float, run_id: str,
                    model_folder, source_name: str, split: str | None, max_tokens: int | None, seq_len: int,
                    batch_size: int, layout: str, device: str, command: str | None) -> None:
    """run.json of a run whose parts (from one rank or several) are all in `tmp`."""
    from ..convert.materialise import conversion_digest
    from ..infra.machine import machine_info

    wall = time.perf_counter() - t_loaded
    rows, tokens = sum(r["rows"] for r in ranks), sum(r["tokens"] for r in ranks)
    parts = [part for r in ranks for part in r["parts"]]
    files = file_table(tmp)
    assert {name for name, _ in parts} <= set(files), "a rank's part file is missing from the run folder"
    for name, part_rows in parts:
        files[name]["rows"] = part_rows
    part_bytes = sum(files[name]["bytes"] for name, _ in parts)

    def slowest(key):  # ranks run side by side: the run takes as long as its slowest rank
        return max(r[key] for r in ranks)

    traced_s = slowest("traced_s")
    timing = {"wall_s": round(wall, 3), "load_s": round(t_loaded - t_start, 3), "traced_s": round(traced_s, 3),
              "forward_s": round(slowest("forward_s"), 3), "record_s": round(slowest("record_s"), 3),
              "write_s": round(slowest("write_s"), 3),
              "tokens_per_s": round(tokens / max(traced_s, 1e-9), 1),
              "rows_per_s": round(rows / max(traced_s, 1e-9), 1)}
    if ranks[0]["untraced_s"] is not None:
        untraced_s = slowest("untraced_s")
        timing.update(untraced_s=round(untraced_s, 3),
                      overhead_pct=round(100 * (traced_s / max(untraced_s, 1e-9) - 1), 2))
    meta = {
        "schema_version": SCHEMA_VERSION, "run_id": run_id,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": plan.meta.get("model"), "conversion": str(Path(model_folder).resolve()),
        "conversion_digest": conversion_digest(plan.meta), "budget": plan.meta.get("budget"),
        "num_experts": int(plan.meta.get("num_experts") or plan.model.config.num_experts),
        "num_layers": plan.num_layers, "layout": layout,
        "text": {"source": source_name, "split": split, "documents": len(plan.docs), "max_tokens": max_tokens},
        "seq_len": seq_len, "special_prefix": list(plan.prefix), "batch_size": batch_size, "rows": rows,
        "tokens": tokens,
        "bytes_per_row": round(part_bytes / max(rows, 1), 3),
        "timing": timing, "world_size": len(ranks),
        "files": files, "versions": _library_versions(), "machine": machine_info(device),
        "command": command,
    }
    if len(ranks) > 1:
        meta["ranks"] = [{"rank": r["rank"], "tokens": r["tokens"], "rows": r["rows"], "traced_s": round(r["traced_s"], 3),
                          "parts": [name for name, _ in r["parts"]]} for r in ranks]
    atomic_write_json(tmp / RUN_META_FILE, meta)
