"""Speed benchmark: the dense model against every MoE layout at several budgets, side by side.

    python -m benchmarks.speed                       # CPU, SmolLM2-135M, budgets 0.3 0.5 0.7, 1 thread, batch 1 and 8
    python -m benchmarks.speed --budgets 0.5 --threads 1 2
    python -m benchmarks.speed --budgets 0.5 --layouts indexed packed
    python -m benchmarks.gpu_speed                   # CUDA, bf16, batch 1 and 16 (prepared for a GPU box)
    python -m benchmarks.speed --dry-run             # tiny random model: exercises the code in seconds

Built for a shared machine. In one process, every repeat runs every variant in turn, so drifting
load hits all alike, and every ratio to dense is taken within one repeat (paired): the tables give
its median over repeats and its interquartile range [q1-q3]. The 1-minute load average is sampled
at every repeat and stored; when it exceeded the CPU count (other jobs competing for the cores
and for memory bandwidth) the run prints a WARNING: trust the ratios' ranges, not one figure.
Thread counts (--threads 1 2) run one after the other in the same process. On CPU with one
thread the clock is the thread's CPU time, so time the benchmark sits preempted by other jobs
does not count (their memory-bandwidth use still does); wall time otherwise (--clock wall forces it):
  * MLP decode:  the MLPs alone, every layer on its own captured input, one token per sequence
                 (batch B), ms per decode step summed over layers;
  * MLP prefill: the same on a T-token prompt;
  * decode:      end-to-end greedy decode with a KV cache, new tokens/s (prompt excluded);
  * prefill:     the prompt pass of generation over a T-token prompt (KV cache built, logits of
                 the last position only, as `generate` runs it), tokens/s;
  * bound:       what prefill could reach if the MLPs cost exactly the weights the tokens' experts
                 read (Amdahl over the MLPs' share of the dense prefill): a layout's ceiling;
  * memory:      resident MLP weight bytes (union weights + the layout's copies and tables),
                 relative to the dense MLP; and the peak memory of a fresh process that loads only
                 that variant and runs the prefill and the decode (CPU: peak RSS after loading, via
                 /proc/self/clear_refs, so it includes the Python/torch runtime; CUDA: max allocated),
                 measured once per variant and batch size, with the first thread count.
Variants: per budget one conversion. The trained conversion from cache/conversions is used
where its budget matches ("trained"); else a budget-conditioned conversion whose range holds the
budget, materialised at it ("trained, conditioned"); other budgets get "untrained" masks (cluster
init, thresholded to the budget, no training): right for speed, meaningless for quality.
Greedy tokens of every layout are checked equal to the shared layout of the same conversion.

Writes cache/results/speed_benchmark[-cuda].json:
  {kind: "speed", machine, contention: {loadavg (at the end), loadavg_samples (1-minute, one per
   repeat), loadavg_max, high (bool), other_jobs}, model, dtype, device, settings,
   rows: [{name, threads, batch, budget (1.0 for dense), source, layout (null for dense),
           gather_backend (indexed only), core_fraction, union_fraction (of the dense
           intermediate size, mean over layers), mlp_bytes, mlp_bytes_vs_dense, mlp_decode_ms,
           mlp_decode_vs_dense, mlp_prefill_ms, mlp_prefill_vs_dense, decode_tokens_per_s,
           decode_speedup, prefill_tokens_per_s, prefill_speedup (prefill fields: batch 1 only,
           else null), active_mlp_fraction (share of the dense MLP weights the prefill prompt's
           tokens read through their chosen experts), mlp_share_of_dense_prefill, prefill_bound
           (the prefill speed-up if the MLPs took exactly active_mlp_fraction of their dense time,
           the rest unchanged: 1 / (1 - share + share * active)), <each ratio>_iqr: [q1, q3] of the
           paired ratios, peak_memory_mb, peak_rss_vs_dense, peak_memory_kind, same_tokens_as_shared,
           repeats: raw timings, loadavg: per repeat}]}
Medians (ms, tokens/s) are over repeats; ratios are medians of per-repeat ratios.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from tomoe_core.convert.folder import Conversion, ConversionError, list_conversions
from tomoe_core.convert.materialise import load_converted, materialise, save_converted
from tomoe_core.moe.modeling import read_metadata
from tomoe_core.infra.locations import cache_dir
from tomoe_core.text.sources import cached_stream
from tomoe_core.moe.families import adapter_for
from tomoe_core.moe.atomic import atomic_write_json
from tomoe_core.infra.workspace import safe_name
from tomoe_core.infra.machine import machine_info
from tomoe_core.convert.masked_model import MaskedModel
from tomoe_core.convert.folder import conversions_dir
from tomoe_core.workflows.rebudget import materialise_at
from tomoe_core.moe.gather_kernels import backend as gather_backend
from tomoe_core.moe.layer import LAYOUTS, MoEMLP
from tomoe_core.convert.config import ConversionConfig


# -- building the variants ---------------------------------------------------------------------------
def untrained_conversion(dense, budget: float, num_experts: int, calibration_ids: torch.Tensor):
    """A MoE with cluster-initialised routers and masks thresholded to `budget`, no training."""
    masked = MaskedModel(copy.deepcopy(dense), num_experts)
    masked.cluster_init(calibration_ids, budget, prior_scale=ConversionConfig().prior_scale)
    masks = masked.deterministic_masks(masked.calibrate_shift(budget))
    return materialise(masked, masks, budget)


def cached_untrained_conversion(model_name: str, dense, budget: float, num_experts: int,
                                calibration_ids: torch.Tensor, log=print) -> Path:
    """Saved under cache/speed/ (never cache/conversions: the quality benchmark must not take it for a conversion)."""
    folder = cache_dir() / "speed" / safe_name(f"untrained-{Path(model_name).name}-p{budget:g}-e{num_experts}")
    if not (folder / "tomoe.json").exists():
        log(f"[speed] building untrained masks at p={budget:g} (cluster init, no training) -> {folder}")
        save_converted(untrained_conversion(dense, budget, num_experts, calibration_ids), folder,
                       metadata={"kind": "untrained-speed-masks", "model": model_name, "budget": budget,
                                 "num_experts": num_experts, "note": "for speed only; quality is meaningless"})
    return folder


def trained_conversions(model_name: str, names: list[str] | None = None) -> dict[float, Path]:
    """Saved conversions of this model, by budget: the named ones (folder names under cache/conversions or
    paths), else every one there, the newest folder winning a tie."""
    found = {}
    root = conversions_dir()
    if names:
        conversions = []
        for folder in (Path(n) if Path(n).is_dir() else root / n for n in names):
            try:
                conversions.append(Conversion.open(folder))
            except ConversionError as err:
                raise SystemExit(f"error: {err}") from None
    else:
        conversions = sorted(list_conversions(root, model_name, require_weights=False)[0],
                             key=lambda c: c.path.stat().st_mtime)
    for conversion in conversions:
        model = conversion.meta.get("model")
        if names and model != model_name:
            raise SystemExit(f"error: {conversion.path} was converted from {model!r}, not {model_name!r}: "
                             "pass --model to match")
        if model == model_name and conversion.budget is not None:
            key = round(float(conversion.budget), 4)
            if names and key in found:
                raise SystemExit(f"error: {found[key].name} and {conversion.name} are both at budget {key:g}: "
                                 "name one conversion per budget")
            found[key] = conversion.path
    return found


def mlp_bytes(mlps) -> int:
    total = 0
    for m in mlps:
        if isinstance(m, MoEMLP):
            total += m.weight_bytes() - m.router.weight.nbytes - m.router.bias.nbytes
        else:
            total += sum(p.nbytes for p in m.parameters())
    return total


def layer_mlps(model) -> list:
    base = getattr(model, "model", model) if hasattr(model, "moe_mlps") else model
    adapter = adapter_for(base)
    return [adapter.mlp(layer) for layer in adapter.layers(base)]


# -- measurements -------------------------------------------------------------------------------------
CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}
_clock = time.perf_counter  # set by run(): "thread" CPU time ignores time the benchmark is preempted


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def capture_mlp_inputs(dense, ids: torch.Tensor) -> list[torch.Tensor]:
    """Every layer's MLP input on `ids`.  -> L x (B, T, D)"""
    inputs = []
    handles = [m.register_forward_pre_hook(lambda mod, args: inputs.append(args[0].detach().clone()))
               for m in layer_mlps(dense)]
    try:
        dense(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    return inputs


def active_mlp_fraction(model, ids: torch.Tensor, intermediate: list[int]) -> float:
    """Share of the dense MLP weights the tokens of `ids` read: the mean width of each token's chosen
    expert over the dense intermediate size, averaged over layers weighted by that size (1.0 for dense)."""
    mlps = layer_mlps(model)
    if not any(isinstance(m, MoEMLP) for m in mlps):
        return 1.0
    read = 0.0
    for m, x, size in zip(mlps, capture_mlp_inputs(model, ids), intermediate):
        if isinstance(m, MoEMLP):
            flat = x.reshape(-1, x.shape[-1])
            widths = torch.tensor(m.expert_widths, dtype=torch.float64)
            read += float(widths[m.choose_experts(m.router(flat)).cpu()].mean())
        else:
            read += size
    return read / sum(intermediate)


def prefill_bound(mlp_share: float | None, active: float) -> float | None:
    """Amdahl: the prefill speed-up if the MLPs took `active` of their dense time and the rest
    (attention, norms, embeddings) stayed; mlp_share = the MLPs' part of the dense prefill."""
    return None if mlp_share is None else 1.0 / (1.0 - mlp_share + mlp_share * active)


def time_mlps(mlps, steps: list[list[torch.Tensor]], device) -> float:
    """Seconds per step; steps[s][l] is layer l's input at step s."""
    for l, m in enumerate(mlps):  # warm-up
        m(steps[0][l])
    _sync(device)
    t0 = _clock()
    for step in steps:
        for m, x in zip(mlps, step):
            m(x)
    _sync(device)
    return (_clock() - t0) / len(steps)


def greedy_decode(model, prompt: torch.Tensor, new_tokens: int, device) -> tuple[float, list]:
    """Greedy decode with a KV cache. -> (new tokens per second, the tokens)"""
    out = model(input_ids=prompt, use_cache=True)
    cache, token = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
    tokens = [token]
    _sync(device)
    t0 = _clock()
    for _ in range(new_tokens - 1):
        out = model(input_ids=token, cache=cache, use_cache=True)
        cache, token = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(token)
    _sync(device)
    seconds = _clock() - t0
    return (new_tokens - 1) * prompt.shape[0] / seconds, torch.cat(tokens, 1).tolist()


def prefill(model, ids: torch.Tensor):
    """The prompt pass `generate` runs: the KV cache built, logits of the last position only (a prompt's
    other logits are never used; computing them would time the vocabulary projection 512 times)."""
    return model(input_ids=ids, use_cache=True, logits_to_keep=1)


def time_prefill(model, ids: torch.Tensor, device) -> float:
    prefill(model, ids[:, :8])  # warm-up
    _sync(device)
    t0 = _clock()
    prefill(model, ids)
    _sync(device)
    return ids.numel() / (_clock() - t0)


def loadavg_1min() -> float:
    return round(os.getloadavg()[0], 2)


def contention(samples: list[float]) -> dict:
    """Load average and other heavy Python jobs while the benchmark ran (figures are only as clean as this).

    samples: the 1-minute load average at every repeat; `high` when its median exceeded the CPU
    count, i.e. other jobs kept the cores (and the memory bus) busy for much of the run."""
    try:
        ps = subprocess.run(["ps", "-eo", "pid,pcpu,args", "--sort=-pcpu"], capture_output=True, text=True,
                            timeout=5).stdout.splitlines()[1:]
    except (OSError, subprocess.SubprocessError):
        ps = []
    me = os.getpid()
    jobs = [line.strip()[:120] for line in ps if "python" in line and int(line.split()[0]) != me
            and float(line.split()[1]) > 20]
    high = bool(samples) and statistics.median(samples) > (os.cpu_count() or 1)
    return {"loadavg": [round(x, 2) for x in os.getloadavg()], "loadavg_samples": samples,
            "loadavg_max": max(samples) if samples else None, "high": high, "other_jobs": jobs}


def paired_ratios(values: list[float], dense: list[float]) -> tuple[float, list[float]]:
    """Median and [q1, q3] of the per-repeat ratios values[r] / dense[r]."""
    ratios = [v / d for v, d in zip(values, dense)]
    if len(ratios) == 1:
        return ratios[0], [ratios[0], ratios[0]]
    q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return statistics.median(ratios), [q1, q3]


# -- the run -----------------------------------------------------------------------------------------------
def tiny_dense(vocab: int = 512):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=256, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    return LlamaForCausalLM(cfg).eval()


def conditioned_covering(folders, budget: float) -> Path | None:
    """The first budget-conditioned conversion (with its hypernetwork) whose range holds `budget`."""
    for folder in folders:
        conversion = Conversion(folder, read_metadata(folder))
        if conversion.is_conditioned and (conversion.budget_range[0] - 1e-9 <= budget
                                          <= conversion.budget_range[1] + 1e-9):
            return folder
    return None


def build_variants(args, dense, calibration_ids, log) -> list[dict]:
    trained = {} if args.dry_run else trained_conversions(args.model, args.conversions)
    variants = [{"name": "dense", "budget": 1.0, "source": "dense", "layout": None, "model": dense, "folder": None}]
    for budget in args.budgets:
        key = round(budget, 4)
        folder, conditioned, materialised = None, None, False
        if not (args.dry_run or args.untrained_only) and key not in trained:
            conditioned = conditioned_covering(list(trained.values()), budget)
        if key in trained and not args.untrained_only:
            log(f"[speed] budget {budget}: trained conversion {trained[key]}")
            folder, source = trained[key], f"trained ({trained[key].name})"
            moe, _, _ = load_converted(folder, device=args.device, layout="shared", load_tokenizer=False)
        elif conditioned is not None:
            log(f"[speed] budget {budget}: budget-conditioned conversion {conditioned}, materialised at {budget:g}")
            folder, source, materialised = conditioned, f"trained, conditioned ({conditioned.name})", True
            moe, _, _ = materialise_at(conditioned, budget, device=args.device, layout="shared",
                                       dense=copy.deepcopy(dense).float(), log=lambda *a: None)
        elif args.dry_run:
            moe, source = untrained_conversion(dense, budget, args.experts, calibration_ids), "untrained masks"
        else:
            folder = cached_untrained_conversion(args.model, dense, budget, args.experts, calibration_ids, log)
            moe, _, _ = load_converted(folder, device=args.device, layout="shared", load_tokenizer=False)
            source = "untrained masks"
        moe = moe.to(device=args.device, dtype=args.torch_dtype).eval()
        for layout in args.layouts:
            variants.append({"name": f"p={budget:g} {layout}", "budget": budget, "source": source, "layout": layout,
                             "model": moe, "folder": folder, "materialise": materialised})
    return variants


# -- peak memory, one fresh process per variant ---------------------------------------------------------
def _vm_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
    except (OSError, StopIteration):
        return None


def calibration_ids(tokenizer, model: str, device) -> torch.Tensor:
    """The baselines' calibration text: 4 x 512 tokens of the calibration split.  -> (4, 512)"""
    tag = safe_name(Path(model).name)
    return cached_stream(tokenizer, "wiki", "calibration", None, tag)[: 4 * 512].view(4, 512).to(device)


def memory_probe(spec: dict) -> dict:
    """Load one variant in this (fresh) process, reset the peak RSS, run prefill + decode, report peaks.

    The reset (Linux /proc/self/clear_refs) keeps loading transients (a converted model is built
    from a full dense skeleton) out of the figure; without it the peak includes them.
    """
    device = torch.device(spec["device"])
    if device.type == "cpu":
        torch.set_num_threads(spec["threads"])
    dtype = getattr(torch, spec["dtype"])
    if spec["folder"] and spec.get("materialise"):  # a budget-conditioned conversion at another budget
        model, _, _ = materialise_at(Path(spec["folder"]), spec["budget"], device=str(device), layout=spec["layout"],
                                     log=lambda *a: None)
        model = model.to(dtype=dtype)
    elif spec["folder"]:
        model, _, _ = load_converted(spec["folder"], device=device, layout=spec["layout"], load_tokenizer=False)
        model = model.to(dtype=dtype)
    elif spec.get("method"):  # a baseline, built here as the timed run builds it, its dense MLPs dropped
        from benchmarks.speed_baselines import baseline_variants
        from tomoe_core.convert.dense import load_dense

        dense, tokenizer = load_dense(spec["model"], device=device, dtype=dtype, log=lambda *a: None)
        (variant,) = baseline_variants(dense, [spec["budget"]], [spec["method"]],
                                       calibration_ids(tokenizer, spec["model"], device), log=lambda *a: None)
        variant["install"]()
        model = variant["model"]
        del dense, variant
    else:
        from tomoe_core.convert.dense import load_dense

        model, _ = load_dense(spec["model"], device=device, dtype=dtype, log=lambda *a: None)
    import ctypes
    import gc

    gc.collect()
    try:  # hand freed heap pages (weights dropped while building) back, so the reset below starts from what is used
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    reset = True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        reset = False
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss_before = _vm_kib("VmRSS")
    ids = torch.randint(3, 1000, (spec["batch"], spec["prefill_tokens"]), device=device)
    with torch.no_grad():
        prefill(model, ids)
        greedy_decode(model, ids[:, : spec["prompt_tokens"]], spec["new_tokens"], device)
    out = {"peak_rss_bytes": (_vm_kib("VmHWM") or 0) * 1024, "rss_before_bytes": (rss_before or 0) * 1024,
           "peak_reset_after_load": reset}
    if device.type == "cuda":
        out["peak_cuda_bytes"] = torch.cuda.max_memory_allocated()
    return out


def run_memory_probe(v: dict, args, batch: int, threads: int) -> dict | None:
    spec = {"folder": str(v["folder"]) if v["folder"] else None, "materialise": v.get("materialise", False),
            "budget": v["budget"], "model": args.model, "layout": v["layout"] or "shared", "method": v.get("method"),
            "device": args.device, "dtype": args.dtype, "threads": threads, "batch": batch,
            "prefill_tokens": args.prefill_tokens, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.speed", "--memory-probe", json.dumps(spec)],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent, timeout=900)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        print(f"[speed] memory probe of {v['name']} failed: {proc.stderr[-500:]}", file=sys.stderr)
        return None
    return json.loads(lines[-1])


def peak_fields(probe: dict | None, device: torch.device) -> dict:
    peak = (probe or {}).get("peak_cuda_bytes" if device.type == "cuda" else "peak_rss_bytes")
    return {"peak_memory_mb": peak / 2**20 if peak else None,
            "peak_memory_kind": None if not peak else ("CUDA max allocated, fresh process" if device.type == "cuda"
                                                      else "peak RSS of a fresh process during prefill + decode")}


def relative_peaks(rows: list[dict]) -> None:
    """Each row's peak_rss_vs_dense: its peak over dense's at the same threads and batch."""
    dense_peaks = {(r["threads"], r["batch"]): r["peak_memory_mb"] for r in rows if r["method"] == "dense"}
    for r in rows:
        dense_peak = dense_peaks.get((r["threads"], r["batch"]))
        r["peak_rss_vs_dense"] = r["peak_memory_mb"] / dense_peak if r["peak_memory_mb"] and dense_peak else None


def memory_only(args, log=print) -> dict:
    """Probe the peak memory of every row of an existing speed file again (same variants, rebuilt from its
    settings) and replace its memory figures; the timings are kept. For a file measured before a
    method's memory was probed, without repeating an hour of timing."""
    from benchmarks.speed_baselines import baseline_variants
    from tomoe_core.convert.dense import load_dense

    path = args.output or cache_dir() / "results" / "speed_benchmark.json"
    result = json.loads(Path(path).read_text())
    settings = result["settings"]
    if result.get("device", "cpu") != args.device or settings.get("dry_run"):
        raise ValueError(f"{path} was measured on {result.get('device')}: probe it with --device {result.get('device')}")
    args.budgets, args.layouts, args.baselines = settings["budgets"], settings["layouts"], settings["baselines"]
    args.experts, args.model = settings["experts"], result["model"]
    named = sorted({m.group(1) for r in result["rows"] if r["method"] == "tomoe"
                    for m in [re.search(r"\(([^()]+)\)$", r["source"] or "")] if m})
    args.conversions = settings.get("conversions") or named or None
    for key in ("prompt_tokens", "new_tokens", "prefill_tokens"):
        setattr(args, key, settings[key])
    device = torch.device(args.device)
    dense, tokenizer = load_dense(args.model, device=device, dtype=args.torch_dtype, log=log)
    calibration = calibration_ids(tokenizer, args.model, device)
    variants = {v["name"]: v for v in build_variants(args, dense, calibration, log)
                + baseline_variants(dense, args.budgets, args.baselines, calibration, log)}
    firsts: dict = {}
    for r in result["rows"]:  # once per variant and batch, at the first thread count (as the timed run)
        firsts.setdefault((r["name"], r["batch"]), r["threads"] or 1)
    probes = {}
    for i, ((name, batch), threads) in enumerate(firsts.items()):
        if name not in variants:
            raise ValueError(f"{path} has a row {name!r} that its settings do not rebuild")
        probes[name, batch] = run_memory_probe(variants[name], args, batch, threads)
        log(f"[speed] memory {i + 1}/{len(firsts)}: {name}, batch {batch}: "
            f"{peak_fields(probes[name, batch], device)['peak_memory_mb'] or float('nan'):.0f} MiB")
    for r in result["rows"]:
        r.update(peak_fields(probes[r["name"], r["batch"]], device))
    relative_peaks(result["rows"])
    settings["memory_probed"] = {"command": "python -m benchmarks.speed --memory-only" + (f" --output {path}" if args.output else ""),
                                 "at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                 "machine": machine_info(str(device))}
    atomic_write_json(path, result)
    return result


def choose_clock(args, threads: int) -> str:
    """Thread CPU time on CPU with one thread (all of torch's work runs in this thread, so time
    spent preempted by other jobs does not count; memory-bandwidth contention still does);
    wall time otherwise (GPU, several threads)."""
    if args.clock != "auto":
        return args.clock
    return "thread" if torch.device(args.device).type == "cpu" and threads == 1 else "wall"


CLOCK_NAMES = {"wall": "wall time", "thread": "thread CPU time (one thread; preemption excluded)"}
TIMED = ("mlp_decode", "mlp_prefill", "decode", "prefill")


def measure(args, variants, text, dense, device, threads: int, batch: int, loads: list[float], log) -> dict:
    """Interleaved repeats of every variant at one thread count and batch size. -> raw results by name"""
    prompt = text[: batch * args.prompt_tokens].view(batch, args.prompt_tokens).to(device)
    long_prompt = text[: args.prefill_tokens].view(1, -1).to(device)
    inputs = capture_mlp_inputs(dense, text[: batch * args.mlp_steps].view(batch, args.mlp_steps).to(device))
    decode_steps = [[x[:, s:s + 1] for x in inputs] for s in range(args.mlp_steps)]  # steps x L x (B, 1, D)
    prefill_steps = [capture_mlp_inputs(dense, long_prompt)]
    results = {v["name"]: {**{k: [] for k in TIMED}, "tokens": None, "loadavg": []} for v in variants}
    for r in range(args.repeats):
        for v in variants:
            model = v["model"]
            if v["layout"] is not None:
                model.set_layout(v["layout"])
            if v.get("install"):  # a baseline: its MLPs into the shared host model
                v["install"]()
            res = results[v["name"]]
            mlps = layer_mlps(model)
            res["mlp_decode"].append(time_mlps(mlps, decode_steps, device))
            if batch == 1:
                res["mlp_prefill"].append(time_mlps(mlps, prefill_steps, device))
                res["prefill"].append(time_prefill(model, long_prompt, device))
            speed, tokens = greedy_decode(model, prompt, args.new_tokens, device)
            res["decode"].append(speed)
            res["tokens"] = tokens
            res["loadavg"].append(loadavg_1min())
        loads.append(loadavg_1min())
        total = len(args.threads) * len(args.batch_sizes) * args.repeats  # the last counter is the job's progress
        log(f"[speed] threads {threads}, batch {batch}: repeat {r + 1} of {args.repeats} done, loadavg {loads[-1]} "
            f"({len(loads) - 1}/{total} repeats)")
    return results


@torch.no_grad()
def run(args, log=print) -> dict:
    global _clock
    device = torch.device(args.device)
    for threads in args.threads:
        if args.clock == "thread" and (device.type != "cpu" or threads != 1):
            raise ValueError("--clock thread measures one CPU thread: use it with --device cpu --threads 1")
    if device.type == "cpu":
        torch.set_num_threads(args.threads[0])
    if args.dry_run:
        dense = tiny_dense().to(device=device, dtype=args.torch_dtype)
        calibration = torch.randint(3, 512, (2, 64))
        text = torch.randint(3, 512, (args.prompt_tokens * max(args.batch_sizes) * 4 + args.prefill_tokens,))
        model_name = "tiny random llama (dry run)"
    else:
        from tomoe_core.convert.dense import load_dense

        dense, tokenizer = load_dense(args.model, device=device, dtype=args.torch_dtype, log=log)
        calibration = calibration_ids(tokenizer, args.model, device)
        text = cached_stream(tokenizer, "wiki", "heldout", None, safe_name(Path(args.model).name))
        model_name = args.model
    variants = build_variants(args, dense, calibration, log)
    from benchmarks.speed_baselines import PREFILL_MODE, baseline_variants

    variants += baseline_variants(dense, args.budgets, args.baselines, calibration, log)
    dense_mlp_bytes = mlp_bytes(layer_mlps(dense))
    inter = [adapter_for(dense).mlp_weights(x).intermediate_size for x in layer_mlps(dense)]
    rows, loads, clocks, probes = [], [loadavg_1min()], {}, {}
    long_prompt = text[: args.prefill_tokens].view(1, -1).to(device)
    fractions = {}  # routing on the prefill prompt, once per model: the layout does not change the choice
    for v in variants:
        if id(v["model"]) not in fractions and "active" not in v:
            fractions[id(v["model"])] = active_mlp_fraction(v["model"], long_prompt, inter)
    active = {v["name"]: v["active"] if "active" in v else fractions[id(v["model"])] for v in variants}
    for threads in args.threads:
        if device.type == "cpu":
            torch.set_num_threads(threads)
        clock = choose_clock(args, threads)
        clocks[threads] = CLOCK_NAMES[clock]
        _clock = CLOCKS[clock]
        for batch in args.batch_sizes:
            results = measure(args, variants, text, dense, device, threads, batch, loads, log)
            d = results["dense"]
            for v in variants:
                name, model = v["name"], v["model"]
                if v["layout"] is not None:
                    model.set_layout(v["layout"])
                if v.get("install"):
                    v["install"]()
                res = results[name]
                med = {k: statistics.median(res[k]) if res[k] else None for k in TIMED}
                dense_med = {k: statistics.median(d[k]) if d[k] else None for k in ("mlp_prefill", "prefill")}
                mlp_share = (dense_med["mlp_prefill"] * dense_med["prefill"] / args.prefill_tokens
                             if dense_med["prefill"] else None)  # MLP seconds / prefill seconds
                ratio = {k: paired_ratios(res[k], d[k]) if res[k] else (None, None) for k in TIMED}
                moe_mlps = [x for x in layer_mlps(model) if isinstance(x, MoEMLP)]
                shared_tokens = results.get(f"p={v['budget']:g} shared", {}).get("tokens")
                bytes_now = mlp_bytes(layer_mlps(model))
                if (name, batch) not in probes:  # once per variant and batch: with the first thread count
                    probes[name, batch] = (None if args.dry_run or args.no_memory
                                           else run_memory_probe(v, args, batch, threads))
                rows.append({
                    "name": name, "threads": threads if device.type == "cpu" else None, "batch": batch,
                    "budget": v["budget"], "source": v["source"], "layout": v["layout"],
                    "method": v.get("method") or ("tomoe" if v["layout"] else "dense"),
                    "gather_backend": gather_backend(moe_mlps[0].up) if v["layout"] == "indexed" else None,
                    "core_fraction": (statistics.mean(x.core_size() / i for x, i in zip(moe_mlps, inter))
                                      if moe_mlps else None),
                    "union_fraction": statistics.mean(x.union_size / i for x, i in zip(moe_mlps, inter)) if moe_mlps else None,
                    "mlp_bytes": bytes_now, "mlp_bytes_vs_dense": bytes_now / dense_mlp_bytes,
                    "mlp_decode_ms": med["mlp_decode"] * 1e3, "mlp_decode_vs_dense": ratio["mlp_decode"][0],
                    "mlp_decode_vs_dense_iqr": ratio["mlp_decode"][1],
                    "mlp_prefill_ms": med["mlp_prefill"] * 1e3 if med["mlp_prefill"] else None,
                    "mlp_prefill_vs_dense": ratio["mlp_prefill"][0], "mlp_prefill_vs_dense_iqr": ratio["mlp_prefill"][1],
                    "decode_tokens_per_s": med["decode"], "decode_speedup": ratio["decode"][0],
                    "decode_speedup_iqr": ratio["decode"][1],
                    "prefill_tokens_per_s": med["prefill"], "prefill_speedup": ratio["prefill"][0],
                    "prefill_speedup_iqr": ratio["prefill"][1],
                    "active_mlp_fraction": active[name],
                    "mlp_share_of_dense_prefill": mlp_share,
                    "prefill_bound": prefill_bound(mlp_share, active[name]),
                    **peak_fields(probes[name, batch], device),
                    "same_tokens_as_shared": None if v["layout"] is None or shared_tokens is None
                    else res["tokens"] == shared_tokens,
                    "repeats": {k: res[k] for k in TIMED}, "loadavg": res["loadavg"],
                })
    relative_peaks(rows)
    return {
        "kind": "speed", "machine": machine_info(str(device)), "contention": contention(loads), "model": model_name,
        "dtype": str(args.torch_dtype).replace("torch.", ""), "device": str(device),
        "settings": {"threads": args.threads if device.type == "cpu" else None, "repeats": args.repeats,
                     "clock": clocks, "batch_sizes": args.batch_sizes, "prompt_tokens": args.prompt_tokens,
                     "new_tokens": args.new_tokens, "prefill_tokens": args.prefill_tokens,
                     "mlp_decode_steps": args.mlp_steps, "experts": args.experts, "budgets": args.budgets,
                     "conversions": args.conversions,
                     "layouts": args.layouts, "baselines": args.baselines,
                     "baseline_prefill": {m: PREFILL_MODE[m] for m in args.baselines}, "dry_run": args.dry_run},
        "rows": rows,
    }


def _ratio(x: float | None, iqr: list | None) -> str:
    if x is None:
        return "-"
    return f"{x:.3f} [{iqr[0]:.2f}-{iqr[1]:.2f}]" if iqr else f"{x:.3f}"


def format_table(result: dict) -> str:
    s, c = result["settings"], result["contention"]
    threads = s["threads"] if isinstance(s["threads"], list) else [s["threads"]]
    clock = s.get("clock", "wall time")
    lines = [f"model {result['model']} | {result['device']} {result['dtype']} | threads {threads} | "
             f"clock: {clock if isinstance(clock, str) else ', '.join(f'{t} thr: {n}' for t, n in clock.items())} | "
             f"{s['repeats']} interleaved repeats: medians, ratios = median [IQR] of per-repeat ratios to dense | "
             f"decode: {s['prompt_tokens']}-token prompt + {s['new_tokens']} new | prefill: {s['prefill_tokens']} tokens",
             f"machine: {result['machine']['platform']}, {result['machine']['cpu_count']} CPUs"
             + (f", {result['machine']['gpu']}" if "gpu" in result["machine"] else ""),
             f"contention: 1-min loadavg per repeat {c.get('loadavg_samples')} (max {c.get('loadavg_max')}), "
             f"at the end {c['loadavg']}; other jobs: {c['other_jobs'] or 'none'}"]
    if c.get("high"):
        lines.append(f"WARNING: high contention (median 1-min load average above the {result['machine']['cpu_count']} "
                     "CPUs): other jobs shared the cores and memory bandwidth; read the IQRs, rerun when quieter")
    for t in threads:
        for batch in s["batch_sizes"]:
            rows = [r for r in result["rows"] if r["batch"] == batch and r.get("threads", t) in (t, None)]
            if not rows:
                continue
            lines.append(f"\nthreads {t}, batch {batch}")
            lines.append(f"{'variant':<22}{'core/union':>11}{'MLP dec ms':>11}{'x dense [IQR]':>21}"
                         f"{'MLP pre ms':>11}{'x dense [IQR]':>21}{'dec tok/s':>10}{'speedup [IQR]':>21}"
                         f"{'pre tok/s':>10}{'speedup [IQR]':>21}{'bound':>7}{'MLP MB':>8}{'x dense':>8}{'peak MB':>9}"
                         f"{'x dense':>8}{'same':>6}")
            for r in rows:
                cu = f"{r['core_fraction']:.2f}/{r['union_fraction']:.2f}" if r["core_fraction"] is not None else "-"
                fmt = lambda x, f: "-" if x is None else format(x, f)  # noqa: E731
                lines.append(
                    f"{r['name']:<22}{cu:>11}{r['mlp_decode_ms']:>11.2f}"
                    f"{_ratio(r['mlp_decode_vs_dense'], r.get('mlp_decode_vs_dense_iqr')):>21}"
                    f"{fmt(r['mlp_prefill_ms'], '.1f'):>11}{_ratio(r['mlp_prefill_vs_dense'], r.get('mlp_prefill_vs_dense_iqr')):>21}"
                    f"{r['decode_tokens_per_s']:>10.1f}{_ratio(r['decode_speedup'], r.get('decode_speedup_iqr')):>21}"
                    f"{fmt(r['prefill_tokens_per_s'], '.0f'):>10}{_ratio(r['prefill_speedup'], r.get('prefill_speedup_iqr')):>21}"
                    f"{fmt(r.get('prefill_bound'), '.2f'):>7}"
                    f"{r['mlp_bytes'] / 2**20:>8.0f}{r['mlp_bytes_vs_dense']:>8.2f}{fmt(r['peak_memory_mb'], '.0f'):>9}"
                    f"{fmt(r.get('peak_rss_vs_dense'), '.2f'):>8}"
                    f"{'' if r['same_tokens_as_shared'] is None else ('yes' if r['same_tokens_as_shared'] else 'NO'):>6}")
    sources = sorted({r["source"] for r in result["rows"] if r["layout"]})
    lines.append(f"\nsources: {'; '.join(sources)}; indexed backend: "
                 f"{sorted({r['gather_backend'] for r in result['rows'] if r.get('gather_backend')})}")
    return "\n".join(lines)


def build_parser(description: str = __doc__) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.speed", description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--budgets", type=float, nargs="+", default=None,
                   help="budgets to time (default: 0.3 0.5 0.7, or the budgets of --conversions)")
    p.add_argument("--experts", type=int, default=8, help="experts per layer of untrained conversions")
    p.add_argument("--conversions", nargs="+", default=None, metavar="NAME",
                   help="trained conversions to time, each at its own budget (default: the newest one per "
                        "budget under cache/conversions)")
    p.add_argument("--untrained-only", action="store_true", help="ignore trained conversions in cache/conversions")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--threads", type=int, nargs="+", default=[1],
                   help="CPU thread counts, measured one after the other in this run (default: 1)")
    p.add_argument("--clock", choices=("auto", "wall", "thread"), default="auto",
                   help="auto: thread CPU time on CPU with one thread, else wall time (default: %(default)s)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], help="decode batch sizes (default: 1 8)")
    p.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS),
                   help="MoE layouts to time (default: all); greedy tokens are compared with shared's when it runs")
    p.add_argument("--baselines", nargs="*", choices=("teal", "wanda-sp", "flap"), default=["teal", "wanda-sp", "flap"],
                   help="other methods timed at the same budgets in the same interleaved run: TEAL-style as deployed "
                        "(sparse decode, dense prompt pass) and static pruning as sliced, smaller MLPs (default: "
                        "all; none: --baselines)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--prefill-tokens", type=int, default=512)
    p.add_argument("--mlp-steps", type=int, default=16, help="decode steps of the MLP-only timing")
    p.add_argument("--dry-run", action="store_true", help="tiny random model, a few seconds: checks the code runs")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes (one fresh process each)")
    p.add_argument("--memory-only", action="store_true",
                   help="probe the peak memory of every row of the --output file again and write it there; "
                        "its timings are kept (minutes, not the hour of a full run)")
    p.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)  # internal: JSON spec of one variant
    p.add_argument("--output", type=Path, default=None)
    return p


def main(argv=None, description: str = __doc__, defaults: dict | None = None) -> int:
    parser = build_parser(description)
    if defaults:
        parser.set_defaults(**defaults)
    args = parser.parse_args(argv)
    if args.memory_probe:
        print(json.dumps(memory_probe(json.loads(args.memory_probe))))
        return 0
    args.torch_dtype = getattr(torch, args.dtype)
    if args.memory_only:
        print(format_table(memory_only(args)))
        return 0
    if args.conversions and (args.dry_run or args.untrained_only):
        parser.error("--conversions times trained conversions; it cannot be combined with --dry-run or --untrained-only")
    if args.budgets is None:
        named = trained_conversions(args.model, args.conversions) if args.conversions else {}
        extra = {0.3, 0.5, 0.7} if any(conditioned_covering([f], b) for f in named.values() for b in (0.3, 0.7)) else set()
        args.budgets = sorted(set(named) | extra) if args.conversions else [0.3, 0.5, 0.7]
    if args.dry_run:
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            args.device = "cpu"
        args.repeats, args.new_tokens, args.prefill_tokens, args.mlp_steps = 2, 6, 64, 4
        args.prompt_tokens = 8
    elif args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no GPU (install a CUDA build of torch, or use --dry-run)")
    result = run(args)
    print(format_table(result))
    suffix = "" if args.device == "cpu" else f"-{safe_name(args.device)}"
    path = args.output or cache_dir() / "results" / f"speed_benchmark{suffix}{'-dry-run' if args.dry_run else ''}.json"
    atomic_write_json(path, result)
    print(f"result written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
