"""Expert ablation: what each expert is causally needed for, measured by intervention.

For a routing log's text, each chosen layer l and expert e, the model is rerun with e removed
from layer l: every token the router sends to e goes to a replacement instead, either its
second-choice expert (the router's next-best logit) or, as a control, a uniformly random other
expert. Every token of the window then records the change in its next-token loss and the KL
divergence from the unablated model's next-token distribution: tokens routed to e are hit
directly, the later ones through attention.

Results go beside the log, one row per (token, layer, expert ablated, replacement):

  run_id=<id>/ablation/
    part-LLL.parquet     one file per layer: doc_id, position, layer, expert, replacement,
                         routed (the token was routed to e), replaced_by (-1 when not routed),
                         base_loss, delta_loss (null at a document's last token), kl
    ablation.json        the plan, the conversion, machine, seconds, and how many of the log's
                         expert choices the model reproduced

Layers finished survive a crash: they are written to `run_id=<id>/.ablation.partial/` first and a
rerun of the same plan resumes after them; the folder is renamed to `ablation/` when all are done.

Cost: every window is run once unablated per layer (to cache the layer outputs) and once per
(expert, replacement), each from layer l on (layers before l replay their cached outputs), so
a plan costs windows x layers x (1 + experts x replacements) forward passes of up to seq_len
tokens (`AblationPlan.passes`); a pass where no token of the window uses e is skipped (its rows
are exact zeros).

Legend: L = MoE layers, E = experts per layer, T = tokens in a window, V = vocabulary.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..moe.atomic import atomic_write_json
from .capture import capture_routing
from .routing_log import RoutingLogError, read_run_meta, run_dir

logger = logging.getLogger(__name__)

REPLACEMENTS = ("second", "random")  # the intervention, and its control
ABLATION_DIR = "ablation"
ABLATION_META = "ablation.json"
PARTIAL_DIR = ".ablation.partial"
DEFAULT_MAX_TOKENS = 1024  # 30 layers x 8 experts x 2 replacements on it: ~15 min on 2 CPU cores (docs/RESULTS.md)


class AblationError(ValueError):
    pass


@dataclass
class AblationWindow:
    doc_id: int
    start: int  # position of the first token within its document
    ids: np.ndarray  # (T,) the window's token ids
    targets: np.ndarray  # (T,) the next token in the document, -1 at its end
    experts: np.ndarray  # (L, T) the log's expert choices


@dataclass
class AblationPlan:
    run: str  # the run folder
    num_layers: int
    num_experts: int
    layers: list[int]
    experts: list[int]
    replacements: tuple[str, ...]
    seq_len: int
    prefix: tuple[int, ...]
    seed: int
    windows: list[AblationWindow] = field(repr=False)

    @property
    def tokens(self) -> int:
        return sum(len(w.ids) for w in self.windows)

    @property
    def passes(self) -> int:
        """Forward passes at most (passes where a window never uses the expert are skipped)."""
        return len(self.windows) * len(self.layers) * (1 + len(self.experts) * len(self.replacements))

    def cost(self) -> str:
        return (f"{self.tokens} tokens x {len(self.layers)} layers x {len(self.experts)} experts x "
                f"{len(self.replacements)} replacement(s) ({', '.join(self.replacements)}): at most {self.passes} "
                f"forward passes of up to {self.seq_len} tokens in {len(self.windows)} window(s)")

    def signature(self) -> dict:
        """What makes two plans produce the same rows (a partial run resumes only under the same one)."""
        return {"run": Path(self.run).name.removeprefix("run_id="), "layers": self.layers, "experts": self.experts, "replacements": list(self.replacements),
                "tokens": self.tokens, "seq_len": self.seq_len, "seed": self.seed}


def _indices(values: Sequence[int] | None, size: int, what: str, unit: str) -> list[int]:
    if values is None:
        return list(range(size))
    values = sorted(set(int(v) for v in values))
    if not values:
        raise AblationError(f"no {what} chosen")
    bad = [v for v in values if not 0 <= v < size]
    if bad:
        raise AblationError(f"{what} {bad[0]} does not exist: the model has {size} {unit} (0-{size - 1})")
    return values


def parse_indices(text: str) -> list[int]:
    """"0,5,12" or "0-3,12" -> [0, 5, 12] / [0, 1, 2, 3, 12]."""
    out = []
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        try:
            out.extend(range(int(lo), int(hi) + 1) if hi else [int(lo)])
        except ValueError:
            raise AblationError(f"{text!r}: give indices like 0,5,12 or 0-3") from None
    return out


def plan_ablation(run, layers: Sequence[int] | None = None, experts: Sequence[int] | None = None,
                  replacements: Sequence[str] = REPLACEMENTS, max_tokens: int | None = DEFAULT_MAX_TOKENS,
                  seed: int = 0) -> AblationPlan:
    """The windows, layers and experts of an ablation of `run` (checked before any model loads)."""
    import duckdb

    from .queries import routing_source

    meta = read_run_meta(run)
    num_layers, num_experts = int(meta["num_layers"]), int(meta["num_experts"])
    layers = _indices(layers, num_layers, "layer", "MoE layers")
    experts = _indices(experts, num_experts, "expert", "experts per layer")
    replacements = tuple(dict.fromkeys(replacements))
    unknown = [r for r in replacements if r not in REPLACEMENTS]
    if unknown or not replacements:
        raise AblationError(f"unknown replacement {unknown[0] if unknown else None!r}; choose from {', '.join(REPLACEMENTS)}")
    if max_tokens is not None and max_tokens < 1:
        raise AblationError(f"max_tokens must be at least 1, got {max_tokens}")
    rows = duckdb.connect().execute(
        f"SELECT doc_id, position, layer, token_id, expert FROM {routing_source(run)} ORDER BY doc_id, position, layer"
    ).fetchnumpy()
    if len(rows["layer"]) % num_layers:
        raise RoutingLogError(f"run {run}: {len(rows['layer'])} rows is not a whole number of tokens x {num_layers} layers")
    doc_id = rows["doc_id"][::num_layers].astype(np.int64)
    position = rows["position"][::num_layers].astype(np.int64)
    token_id = rows["token_id"][::num_layers].astype(np.int64)
    experts_by_token = rows["expert"].reshape(-1, num_layers).T.astype(np.int64)  # (L, n)
    prefix = tuple(int(t) for t in meta.get("special_prefix") or ())
    width = int(meta.get("seq_len", 512)) - len(prefix)
    windows, total = [], 0
    for doc in np.unique(doc_id):
        at = np.flatnonzero(doc_id == doc)
        ids, pos, exp = token_id[at], position[at], experts_by_token[:, at]
        targets = np.append(ids[1:], -1)
        targets[np.append(np.diff(pos) != 1, True)] = -1  # a gap in positions (cut log): no known next token
        for s in range(0, len(ids), width):
            take = len(ids[s:s + width])
            if max_tokens is not None:
                take = min(take, max_tokens - total)
            if take <= 0:
                break
            windows.append(AblationWindow(int(doc), int(pos[s]), ids[s:s + take], targets[s:s + take], exp[:, s:s + take]))
            total += take
    if not windows:
        raise AblationError(f"run {run} has no tokens")
    return AblationPlan(str(run_dir(run)), num_layers, num_experts, layers, experts,
                        replacements, width + len(prefix), prefix, seed, windows)


def replace_expert(expert: int, replacement: str, generator: torch.Generator | None = None) -> Callable:
    """A routing override (see `RoutedMixin.routing_override`): argmax routing, except that tokens
    routed to `expert` go to their second choice ("second") or a uniform other expert ("random")."""
    if replacement not in REPLACEMENTS:
        raise AblationError(f"unknown replacement {replacement!r}; choose from {', '.join(REPLACEMENTS)}")

    def route(logits: torch.Tensor) -> torch.Tensor:  # (N, E) -> (N,)
        chosen = logits.argmax(dim=-1)
        if replacement == "second":
            other = logits.topk(2, dim=-1).indices[..., 1]
        else:
            other = torch.randint(logits.shape[-1] - 1, chosen.shape, generator=generator).to(chosen.device)
            other = other + (other >= expert).long()
        return torch.where(chosen == expert, other, chosen)

    return route


class _Replay:
    """Layers before `start` return the outputs they produced in the unablated pass instead of
    computing them again: they do not depend on the ablated layer, so this is exact."""

    def __init__(self, layers):
        self.layers = layers
        self.outputs: list = [None] * len(layers)

    @contextlib.contextmanager
    def recording(self):
        def keep(l):
            def hook(module, args, output):
                self.outputs[l] = output
            return hook
        handles = [layer.register_forward_hook(keep(l)) for l, layer in enumerate(self.layers)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @contextlib.contextmanager
    def skipping(self, start: int):
        def replay(l):
            out = self.outputs[l]
            if l == start - 1:  # the first computed layer receives it: a fresh copy, in case it writes in place
                out = out.clone() if torch.is_tensor(out) else tuple(o.clone() if torch.is_tensor(o) else o for o in out)
            return lambda *args, **kwargs: out
        saved = [layer.__dict__.get("forward") for layer in self.layers[:start]]  # e.g. accelerate's hook
        try:
            for l in range(start):
                self.layers[l].forward = replay(l)
            yield
        finally:
            for layer, own in zip(self.layers[:start], saved):
                if own is None:
                    layer.__dict__.pop("forward", None)
                else:
                    layer.forward = own


def _window_inputs(plan: AblationPlan, window: AblationWindow, device) -> torch.Tensor:
    return torch.tensor([list(plan.prefix) + window.ids.tolist()], dtype=torch.long, device=device)  # (1, k + T)


def _log_probs(model, ids: torch.Tensor, k: int) -> torch.Tensor:
    logits = model(input_ids=ids, use_cache=False).logits[0, k:]  # (T, V)
    return F.log_softmax(logits.float(), dim=-1)


def _loss(logp: torch.Tensor, targets: np.ndarray) -> np.ndarray:
    t = torch.as_tensor(np.maximum(targets, 0), device=logp.device)
    loss = -logp.gather(-1, t.unsqueeze(-1)).squeeze(-1).cpu().numpy()
    return np.where(targets >= 0, loss, np.nan).astype(np.float32)


def _kl(base: torch.Tensor, base_p: torch.Tensor, other: torch.Tensor) -> np.ndarray:
    """KL(base || other) per position, nats. log-probs, probs, log-probs (T, V) -> (T,)"""
    return (base_p * (base - other)).sum(-1).clamp_min(0).cpu().numpy().astype(np.float32)


@torch.inference_mode()
def ablate_layer(model, plan: AblationPlan, layer: int, progress: Callable[[int], None] | None = None) -> dict:
    """Rows (columns of equal length) of every (window, expert, replacement) of one layer, and the
    number of the log's expert choices at this layer the unablated pass reproduced."""
    from ..moe.families import adapter_for

    decoder = adapter_for(model.model).layers(model.model)
    mlp = model.moe_mlps[layer]
    device = next(model.parameters()).device
    k = len(plan.prefix)
    cols: dict[str, list] = {c: [] for c in ("doc_id", "position", "expert", "replacement", "routed", "replaced_by",
                                             "base_loss", "delta_loss", "kl")}
    agree = 0
    for w_index, window in enumerate(plan.windows):
        ids = _window_inputs(plan, window, device)
        replay = _Replay(decoder)
        model.set_routing(None)
        with replay.recording(), capture_routing(model) as records:
            base = _log_probs(model, ids, k)
        chosen = records.stacked()[0][layer][k:]  # (T,) this layer's experts
        agree += int((chosen == window.experts[layer]).sum())
        base_loss = _loss(base, window.targets)
        base_p = base.exp()
        n = len(window.ids)
        if progress:
            progress(1)
        for expert in plan.experts:
            routed = chosen == expert
            for replacement in plan.replacements:
                replaced_by = np.full(n, -1, np.int16)
                if not routed.any():  # nothing changes: exact zeros, no pass
                    delta, kl = np.where(np.isnan(base_loss), np.nan, 0).astype(np.float32), np.zeros(n, np.float32)
                else:
                    gen = torch.Generator().manual_seed(((plan.seed * 1009 + layer) * 1009 + expert) * 1009 + w_index)
                    mlp.routing_override = replace_expert(expert, replacement, gen)
                    seen = []
                    hook = mlp.routing_point.register_forward_hook(lambda m, a, out: seen.append(out[0]))
                    try:
                        with replay.skipping(layer):
                            logp = _log_probs(model, ids, k)
                    finally:
                        hook.remove()
                        mlp.routing_override = None
                    new = seen[0].reshape(-1)[k:].cpu().numpy()
                    replaced_by[routed] = new[routed]
                    delta, kl = _loss(logp, window.targets) - base_loss, _kl(base, base_p, logp)
                    del logp
                if progress:
                    progress(1)
                cols["doc_id"].append(np.full(n, window.doc_id, np.int32))
                cols["position"].append(np.arange(window.start, window.start + n, dtype=np.int32))
                cols["expert"].append(np.full(n, expert, np.int16))
                cols["replacement"].append(np.full(n, replacement, object))
                cols["routed"].append(routed)
                cols["replaced_by"].append(replaced_by)
                cols["base_loss"].append(base_loss)
                cols["delta_loss"].append(delta)
                cols["kl"].append(kl)
    out = {c: np.concatenate(v) for c, v in cols.items()}
    out["layer"] = np.full(len(out["doc_id"]), layer, np.int16)
    return {"columns": out, "agree": agree}


def _table(columns: dict):
    import pyarrow as pa

    delta = columns["delta_loss"]
    return pa.table({
        "doc_id": columns["doc_id"], "position": columns["position"], "layer": columns["layer"],
        "expert": columns["expert"],
        "replacement": pa.array(columns["replacement"], pa.string()).dictionary_encode(),
        "routed": columns["routed"], "replaced_by": columns["replaced_by"],
        "base_loss": pa.array(columns["base_loss"], mask=np.isnan(columns["base_loss"])),
        "delta_loss": pa.array(delta, mask=np.isnan(delta)), "kl": columns["kl"],
    })


def ablation_dir(run) -> Path:
    return run_dir(run) / ABLATION_DIR


def has_ablation(run) -> bool:
    try:
        return (ablation_dir(run) / ABLATION_META).is_file()
    except RoutingLogError:
        return False


def read_ablation_meta(run) -> dict:
    path = ablation_dir(run) / ABLATION_META
    if not path.is_file():
        raise RoutingLogError(f"run {run} has no expert ablation; run `python -m tomoe_core ablate {run}`")
    return json.loads(path.read_text())


def run_ablation(model, plan: AblationPlan, progress: Callable[[int, int], None] | None = None,
                 info: dict | None = None) -> Path:
    """Ablate every (layer, expert, replacement) of `plan` with `model` (the log's conversion) and
    write the rows beside the log (see the module docstring). -> the ablation folder."""
    import pyarrow.parquet as pq

    from ..infra.workspace import file_lock

    if len(model.moe_mlps) != plan.num_layers or model.moe_mlps[0].num_experts != plan.num_experts:
        raise AblationError(f"the model has {len(model.moe_mlps)} MoE layers x {model.moe_mlps[0].num_experts} experts, "
                            f"the log {plan.num_layers} x {plan.num_experts}: pass the conversion that wrote the log")
    folder = run_dir(plan.run)
    partial = folder / PARTIAL_DIR
    sig_path = partial / "plan.json"
    if partial.exists() and (not sig_path.is_file() or json.loads(sig_path.read_text()) != plan.signature()):
        shutil.rmtree(partial)  # another plan's leftovers
    partial.mkdir(exist_ok=True)
    atomic_write_json(sig_path, plan.signature())
    done_state = json.loads((partial / "done.json").read_text()) if (partial / "done.json").is_file() else {}
    total = plan.passes
    per_layer = plan.passes // len(plan.layers)
    count = [per_layer * sum(1 for l in plan.layers if str(l) in done_state)]
    step = (lambda n: (count.__setitem__(0, count[0] + n), progress(count[0], total))) if progress else None
    t0 = time.time()
    for layer in plan.layers:
        if str(layer) in done_state:
            continue
        t_layer = time.time()
        result = ablate_layer(model, plan, layer, step)
        path = partial / f"part-{layer:03d}.parquet"
        pq.write_table(_table(result["columns"]), path.with_suffix(".tmp"), compression="zstd")
        path.with_suffix(".tmp").replace(path)
        done_state[str(layer)] = {"agree": result["agree"], "seconds": round(time.time() - t_layer, 2)}
        atomic_write_json(partial / "done.json", done_state)
        logger.info("layer %d ablated in %.1f s", layer, time.time() - t_layer)
    agree = sum(v["agree"] for v in done_state.values())
    meta = {**plan.signature(), "num_layers": plan.num_layers, "num_experts": plan.num_experts,
            "windows": len(plan.windows), "passes": plan.passes, "prefix": list(plan.prefix),
            "seconds": round(sum(v["seconds"] for v in done_state.values()), 1), "seconds_this_call": round(time.time() - t0, 1),
            "layer_seconds": {k: v["seconds"] for k, v in done_state.items()},
            "log_agreement": agree / (plan.tokens * len(plan.layers)),
            "loadavg_at_end": [round(x, 2) for x in os.getloadavg()], **(info or {})}
    atomic_write_json(partial / ABLATION_META, meta)
    (partial / "done.json").unlink()
    sig_path.unlink()
    final = folder / ABLATION_DIR
    with file_lock(folder):
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
    return final


@contextlib.contextmanager
def forced_expert(model, layer: int, expert: int):
    """Steering: every token goes to `expert` in MoE layer `layer` (others route as learned) inside
    the block, for prompts and generated tokens alike; the learned routing is restored after."""
    mlps = model.moe_mlps
    layer = _indices([layer], len(mlps), "layer", "MoE layers")[0]
    mlp = mlps[layer]
    expert = _indices([expert], mlp.num_experts, "expert", "experts per layer")[0]
    previous = mlp.routing_override
    mlp.routing_override = expert
    try:
        yield model
    finally:
        mlp.routing_override = previous
