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

Two effects (`effect=`):

  total    (default, exact) the model reruns with e removed for all its tokens at once: each row
           holds the full effect, direct and through attention on later tokens. One pass per
           (window, layer, expert, replacement), each from layer l on (layers before l replay their
           unablated outputs); a pass where no token of the window uses e is skipped (exact zeros).
  direct   (fast) every token of the window loses its own expert of layer l at once, while every
           attention output stays as in the unablated pass: tokens then cannot see each other's
           change, so one pass per (window, layer, replacement) gives each token the effect of
           removing its expert along its own residual stream (path patching's direct effect; at the
           last layer it equals the total effect). Rows only for routed tokens (the others are
           unchanged by construction); E times fewer passes. Written to `ablation-direct/`.

Every window's unablated pass runs once and is kept for all layers (the first CACHED_WINDOWS windows;
later ones rerun theirs per layer); `AblationPlan.passes` counts the ablated passes.

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
EFFECTS = ("total", "direct")  # see the module docstring
ABLATION_DIR = "ablation"
ABLATION_META = "ablation.json"
PARTIAL_DIR = ".ablation.partial"
DEFAULT_MAX_TOKENS = 1024  # 30 layers x 8 experts x 2 replacements on it: ~15 min on 2 CPU cores (docs/RESULTS.md)
DIRECT_MAX_TOKENS = 3072  # E times cheaper: the shipped log's 3,000 tokens took 4 min on 2 CPU cores (docs/RESULTS.md)


def default_max_tokens(effect: str) -> int:
    return DIRECT_MAX_TOKENS if effect == "direct" else DEFAULT_MAX_TOKENS


CACHED_WINDOWS = 8  # unablated passes kept across layers (~170 MB per 512-token window of a 49k vocabulary);
# DIRECT_MAX_TOKENS fits in them


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
    effect: str = "total"

    @property
    def tokens(self) -> int:
        return sum(len(w.ids) for w in self.windows)

    @property
    def passes_per_layer(self) -> int:
        """Ablated passes of one layer (total: those where a window never uses the expert are skipped)."""
        per_window = len(self.replacements) * (len(self.experts) if self.effect == "total" else 1)
        return len(self.windows) * per_window

    @property
    def passes(self) -> int:
        """Ablated forward passes at most, besides one unablated pass per window."""
        return self.passes_per_layer * len(self.layers)

    def cost(self) -> str:
        experts = f"{len(self.experts)} experts x " if self.effect == "total" else ""
        return (f"{self.tokens} tokens x {len(self.layers)} layers x {experts}{len(self.replacements)} "
                f"replacement(s) ({', '.join(self.replacements)}), {self.effect} effect: at most {self.passes} "
                f"forward passes of up to {self.seq_len} tokens in {len(self.windows)} window(s)")

    def signature(self) -> dict:
        """What makes two plans produce the same rows (a partial run resumes only under the same one)."""
        return {"run": Path(self.run).name.removeprefix("run_id="), "layers": self.layers, "experts": self.experts, "replacements": list(self.replacements),
                "tokens": self.tokens, "seq_len": self.seq_len, "seed": self.seed, "effect": self.effect}


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
                  seed: int = 0, effect: str = "total") -> AblationPlan:
    """The windows, layers and experts of an ablation of `run` (checked before any model loads)."""
    import duckdb

    from .queries import routing_source

    _check_effect(effect)
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
                        replacements, width + len(prefix), prefix, seed, windows, effect)


def _check_effect(effect: str) -> None:
    if effect not in EFFECTS:
        raise AblationError(f"unknown effect {effect!r}; choose from {', '.join(EFFECTS)}")


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


def replace_every_expert(replacement: str, generators: Sequence[torch.Generator] | None = None) -> Callable:
    """A routing override: every token goes to its replacement for its argmax expert (the direct effect):
    the tokens of expert e get what `replace_expert(e, replacement, generators[e])` gives them, so both
    effects give a token the same replacement (the same random draw too)."""
    def route(logits: torch.Tensor) -> torch.Tensor:  # (N, E) -> (N,)
        chosen = logits.argmax(dim=-1)
        out = chosen
        for e in range(logits.shape[-1]):
            one = replace_expert(e, replacement, generators[e] if generators is not None else None)
            out = torch.where(chosen == e, one(logits), out)
        return out

    if replacement not in REPLACEMENTS:
        raise AblationError(f"unknown replacement {replacement!r}; choose from {', '.join(REPLACEMENTS)}")
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
    def skipping(self, start: int, clone_all: bool = False):
        def replay(l):
            out = self.outputs[l]
            if clone_all or l == start - 1:  # a computed layer receives it: a fresh copy, in case it writes in place
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


@dataclass
class _Base:
    """One window's unablated pass, kept for every layer: its layer (and, for the direct effect,
    attention) outputs to replay, next-token log-probs and losses, and the experts it chose."""
    replay: _Replay
    attention: _Replay | None
    logp: torch.Tensor  # (T, V)
    loss: np.ndarray  # (T,)
    chosen: np.ndarray  # (L, T)


def _base_pass(model, plan: AblationPlan, window: AblationWindow, decoder, attentions) -> _Base:
    ids = _window_inputs(plan, window, next(model.parameters()).device)
    replay = _Replay(decoder)
    attention = _Replay(attentions) if attentions is not None else None
    model.set_routing(None)
    with replay.recording(), attention.recording() if attention else contextlib.nullcontext(), \
            capture_routing(model) as records:
        logp = _log_probs(model, ids, len(plan.prefix))
    return _Base(replay, attention, logp, _loss(logp, window.targets), records.stacked()[0][:, len(plan.prefix):])


def _ablated_pass(model, plan: AblationPlan, window: AblationWindow, base: _Base, layer: int, route: Callable):
    """log-probs (T, V) with layer `layer` routed by `route` (layers before it replayed; for the direct
    effect every attention output replayed too), and the experts that layer then used (T,)."""
    mlp = model.moe_mlps[layer]
    seen, hook = [], None
    frozen = base.attention.skipping(len(base.attention.layers), clone_all=True) if base.attention else contextlib.nullcontext()
    try:
        mlp.routing_override = route
        hook = mlp.routing_point.register_forward_hook(lambda m, a, out: seen.append(out[0]))
        with base.replay.skipping(layer), frozen:
            logp = _log_probs(model, _window_inputs(plan, window, base.logp.device), len(plan.prefix))
    finally:
        if hook is not None:
            hook.remove()
        mlp.routing_override = None
    return logp, seen[0].reshape(-1)[len(plan.prefix):].cpu().numpy()


def _generator(plan: AblationPlan, layer: int, expert: int, window: int) -> torch.Generator:
    """The random replacement's draws for one (layer, expert, window): the same in both effects."""
    return torch.Generator().manual_seed(((plan.seed * 1009 + layer) * 1009 + expert) * 1009 + window)


COLUMNS = ("doc_id", "position", "expert", "replacement", "routed", "replaced_by", "base_loss", "delta_loss", "kl")


@torch.inference_mode()
def ablate_layer(model, plan: AblationPlan, layer: int, progress: Callable[[int], None] | None = None,
                 bases: dict | None = None) -> dict:
    """Rows (columns of equal length) of one layer: total effect, every token of every (window, expert,
    replacement); direct effect, the tokens routed to each expert. Also the number of the log's expert
    choices at this layer the unablated pass reproduced. `bases` keeps the first CACHED_WINDOWS
    windows' unablated passes between calls (layers); later windows rerun theirs per layer."""
    from ..moe.families import adapter_for

    adapter = adapter_for(model.model)
    decoder = adapter.layers(model.model)
    attentions = [adapter.attention(x) for x in decoder] if plan.effect == "direct" else None
    cols: dict[str, list] = {c: [] for c in COLUMNS}

    def add(window, keep, expert, replacement, routed, replaced_by, base_loss, delta, kl):
        n = int(keep.sum())
        values = (np.full(n, window.doc_id, np.int32), np.arange(window.start, window.start + len(window.ids),
                                                                 dtype=np.int32)[keep],
                  np.full(n, expert, np.int16), np.full(n, replacement, object), routed[keep], replaced_by[keep],
                  base_loss[keep], delta[keep], kl[keep])
        for c, v in zip(COLUMNS, values):
            cols[c].append(v)

    agree = 0
    for w_index, window in enumerate(plan.windows):
        base = (bases or {}).get(w_index) or _base_pass(model, plan, window, decoder, attentions)
        if bases is not None and w_index < CACHED_WINDOWS:
            bases[w_index] = base
        chosen = base.chosen[layer]  # (T,) this layer's experts
        agree += int((chosen == window.experts[layer]).sum())
        base_p = base.logp.exp()
        n = len(window.ids)
        everyone = np.ones(n, bool)
        for replacement in plan.replacements if plan.effect == "direct" else ():
            gens = [_generator(plan, layer, e, w_index) for e in range(plan.num_experts)]
            logp, new = _ablated_pass(model, plan, window, base, layer, replace_every_expert(replacement, gens))
            delta, kl = _loss(logp, window.targets) - base.loss, _kl(base.logp, base_p, logp)
            del logp
            for expert in plan.experts:
                routed = chosen == expert
                add(window, routed, expert, replacement, routed, new.astype(np.int16), base.loss, delta, kl)
            if progress:
                progress(1)
        for expert in plan.experts if plan.effect == "total" else ():
            routed = chosen == expert
            for replacement in plan.replacements:
                replaced_by = np.full(n, -1, np.int16)
                if not routed.any():  # nothing changes: exact zeros, no pass
                    delta, kl = np.where(np.isnan(base.loss), np.nan, 0).astype(np.float32), np.zeros(n, np.float32)
                else:
                    logp, new = _ablated_pass(model, plan, window, base, layer,
                                              replace_expert(expert, replacement, _generator(plan, layer, expert, w_index)))
                    replaced_by[routed] = new[routed]
                    delta, kl = _loss(logp, window.targets) - base.loss, _kl(base.logp, base_p, logp)
                    del logp
                if progress:
                    progress(1)
                add(window, everyone, expert, replacement, routed, replaced_by, base.loss, delta, kl)
    out = {c: np.concatenate(v) if v else np.array([]) for c, v in cols.items()}
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


def _suffix(effect: str) -> str:
    _check_effect(effect)
    return "" if effect == "total" else f"-{effect}"


def ablation_dir(run, effect: str = "total") -> Path:
    return run_dir(run) / (ABLATION_DIR + _suffix(effect))


def has_ablation(run, effect: str = "total") -> bool:
    try:
        return (ablation_dir(run, effect) / ABLATION_META).is_file()
    except RoutingLogError:
        return False


def read_ablation_meta(run, effect: str = "total") -> dict:
    path = ablation_dir(run, effect) / ABLATION_META
    if not path.is_file():
        flag = "" if effect == "total" else f" --effect {effect}"
        raise RoutingLogError(f"run {run} has no expert ablation ({effect} effect); run "
                              f"`python -m tomoe_core ablate {run}{flag}`")
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
    partial = folder / (PARTIAL_DIR + _suffix(plan.effect))
    sig_path = partial / "plan.json"
    if partial.exists() and (not sig_path.is_file() or json.loads(sig_path.read_text()) != plan.signature()):
        shutil.rmtree(partial)  # another plan's leftovers
    partial.mkdir(exist_ok=True)
    atomic_write_json(sig_path, plan.signature())
    done_state = json.loads((partial / "done.json").read_text()) if (partial / "done.json").is_file() else {}
    total = plan.passes
    count = [plan.passes_per_layer * sum(1 for l in plan.layers if str(l) in done_state)]
    step = (lambda n: (count.__setitem__(0, count[0] + n), progress(count[0], total))) if progress else None
    t0 = time.time()
    bases: dict = {}
    for layer in plan.layers:
        if str(layer) in done_state:
            continue
        t_layer = time.time()
        result = ablate_layer(model, plan, layer, step, bases)
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
    final = ablation_dir(plan.run, plan.effect)
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
