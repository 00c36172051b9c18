"""Where the batch-1 decode time of a MoE MLP goes: the profile behind the speed benchmark's MLP ratio.

    python -m benchmarks.mlp_profile                      # trained p=0.5 conversion, indexed layout, 1 thread
    python -m benchmarks.mlp_profile --layout packed --steps 32 --repeats 9
    python -m benchmarks.mlp_profile --prefill 512        # one 512-token prompt instead of decode steps

One process, one thread, thread CPU time, every variant timed in turn in every repeat (medians
and ratios to dense). For one decode step (every layer's MLP on its own captured input, one
token) it separates:
  * dense:          the dense model's MLP modules;
  * moe:            the materialised MoE layers (router + expert choice + expert matmuls);
  * moe-fixed:      the same with every token sent to expert 0 (routing cost without its choice);
  * expert-matmuls: only the chosen experts' three matmuls (the floor for this layout; for the
                    indexed layout its two gather kernels and the activation);
  * router:         only the routers and the argmax;
  * half-dense:     the dense weights' first p * I channels, as plain matmuls (what p of the
                    dense MLP costs with no MoE machinery at all).
and prints a torch.profiler table of the MoE step, so a missed target shows its cause.
With --prefill T, a step is every layer's MLP on one T-token prompt (the prefill's MLP work); the
decode-only variants (moe-fixed, expert-matmuls) are left out.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.speed import capture_mlp_inputs, layer_mlps, trained_conversions
from tomoe_core.convert.materialise import load_converted
from tomoe_core.text.sources import cached_stream
from tomoe_core.infra.workspace import safe_name
from tomoe_core.convert.dense import load_dense


def _timer(fn, steps) -> float:
    fn(steps[0])  # warm-up
    t0 = time.thread_time()
    for step in steps:
        fn(step)
    return (time.thread_time() - t0) / len(steps) * 1e3  # ms per decode step


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.mlp_profile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--budget", type=float, default=0.5, help="trained conversion of this budget (default: 0.5)")
    p.add_argument("--conversion", type=Path, default=None, help="conversion folder (default: by --budget)")
    p.add_argument("--layout", default="indexed")
    p.add_argument("--steps", type=int, default=16, help="decode steps (tokens) per timing (default: 16)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--prefill", type=int, default=None, metavar="T",
                   help="profile the MLPs on one T-token prompt (prefill) instead of --steps decode steps")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(1)
    dense, tokenizer = load_dense(args.model, log=lambda *a: None)
    folder = args.conversion or trained_conversions(args.model).get(round(args.budget, 4))
    if folder is None:
        p.error(f"no trained conversion of {args.model} at p={args.budget:g} in cache/conversions")
    moe, _, meta = load_converted(folder, layout=args.layout, load_tokenizer=False)
    text = cached_stream(tokenizer, "wiki", "heldout", None, safe_name(Path(args.model).name))
    if args.prefill:
        steps = [capture_mlp_inputs(dense, text[: args.prefill].view(1, -1))]  # one step: L x (1, T, D)
    else:
        inputs = capture_mlp_inputs(dense, text[: args.steps].view(1, -1))
        steps = [[x[:, s:s + 1].contiguous() for x in inputs] for s in range(args.steps)]
    dense_mlps, moe_mlps = layer_mlps(dense), moe.moe_mlps
    width = round(args.budget * dense_mlps[0].up_proj.weight.shape[0])
    half = [(m.gate_proj.weight[:width].clone(), m.up_proj.weight[:width].clone(),
             m.down_proj.weight[:, :width].clone()) for m in dense_mlps]
    chosen_of = {} if args.prefill else {  # the experts run_matmuls replays (decode only): (1,) each
        id(step[0]): [m.choose_experts(m.router(x.view(1, -1))) for m, x in zip(moe_mlps, step)] for step in steps}

    def run_dense(step):
        for m, x in zip(dense_mlps, step):
            m(x)

    def run_moe(step):
        for m, x in zip(moe_mlps, step):
            m(x)

    def run_fixed(step):
        for m, x in zip(moe_mlps, step):
            m.routing_override = 0
            m(x)
            m.routing_override = None

    def run_matmuls(step):
        for m, x, k in zip(moe_mlps, step, chosen_of[id(step[0])]):
            if m.layout == "indexed":
                m._indexed_forward(x.view(1, -1), k)
            else:
                m._block_forward(m._expert_block(int(k)), x.view(1, -1))

    def run_router(step):
        for m, x in zip(moe_mlps, step):
            m.choose_experts(m.router(x.view(-1, x.shape[-1]))).tolist()

    def run_half(step):
        for (g, u, d), x in zip(half, step):
            F.linear(F.silu(F.linear(x, g)) * F.linear(x, u), d)

    variants = {"dense": run_dense, "moe": run_moe, "moe-fixed": run_fixed, "expert-matmuls": run_matmuls,
                "router": run_router, "half-dense": run_half}
    if args.prefill:
        del variants["moe-fixed"], variants["expert-matmuls"]
    times = {k: [] for k in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            times[name].append(_timer(fn, steps))
    dense_ms = statistics.median(times["dense"])
    print(f"{args.model} | conversion {Path(folder).name} (p={meta['budget']}) | layout {moe.layout} | "
          f"loadavg {[round(x, 2) for x in os.getloadavg()]} | "
          + (f"one {args.prefill}-token prompt" if args.prefill else f"{args.steps} decode steps")
          + f" x {len(moe_mlps)} layers | 1 thread, thread CPU time, {args.repeats} repeats")
    print(f"{'variant':<16}{'ms/step':>10}{'x dense':>9}   (paired ratio range)")
    for name, ts in times.items():
        ratios = [t / d for t, d in zip(ts, times["dense"])]
        print(f"{name:<16}{statistics.median(ts):>10.2f}{statistics.median(ts) / dense_ms:>9.3f}   "
              f"({min(ratios):.3f}-{max(ratios):.3f})")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for step in steps:
            run_moe(step)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
