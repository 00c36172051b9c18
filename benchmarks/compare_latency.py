"""How long the studio's Compare page takes to answer: dense and converted model generate side by side.

    python -m benchmarks.compare_latency                          # the shipped default, 30 tokens, 3 repeats
    python -m benchmarks.compare_latency --budget 0.7             # materialised at another budget first

Does what a press of "Generate side by side" does once the models are loaded (the studio caches
them): `compare_generation` (both greedy continuations and the per-token KL) plus the routing of the
converted model's tokens, with the thread count the studio uses (`--threads fair`). Reports the
median and range over repeats and the contention it ran under (`benchmarks.speed.contention`: load
average and the other busy Python processes), so a run beside a background job says so. Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from analysis import compare_view
from benchmarks.speed import contention
from tomoe_core.convert.materialise import load_converted
from tomoe_core.moe.modeling import read_metadata
from tomoe_core.eval.metrics import compare_generation
from tomoe_core.infra.jobs import fair_thread_count
from tomoe_core.convert.dense import load_dense
from tomoe_core.convert.folder import conversions_dir
from tomoe_core.workflows.rebudget import materialise_at

PROMPT = "The history of the Roman Empire begins"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--conversion", type=Path, default=conversions_dir() / "smollm2-135m-any-budget")
    p.add_argument("--budget", type=float, default=None, help="materialise a budget-conditioned conversion here")
    p.add_argument("--new-tokens", type=int, default=30)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", default="fair",
                   help="torch threads: 'fair' (what the studio uses: the CPUs other work leaves free), "
                        "'default' (torch's) or a number")
    args = p.parse_args(argv)
    if args.threads == "fair":
        torch.set_num_threads(fair_thread_count())
    elif args.threads != "default":
        torch.set_num_threads(int(args.threads))
    meta = read_metadata(args.conversion)
    dense, tokenizer = load_dense(meta["model"], log=lambda *a: None)
    if args.budget is not None:
        moe, _, _ = materialise_at(args.conversion, args.budget, layout="memory", log=lambda *a: None)
    else:
        moe = load_converted(args.conversion, load_tokenizer=False)[0]
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        with torch.no_grad():
            res = compare_generation(dense, moe, tokenizer, PROMPT, args.new_tokens)
            compare_view.generated_routing(moe, tokenizer, PROMPT, res["moe_ids"])
        times.append(time.perf_counter() - t0)
    print(json.dumps({"conversion": args.conversion.name, "budget": args.budget or meta["budget"],
                      "new_tokens": args.new_tokens, "torch_threads": torch.get_num_threads(),
                      "seconds_median": round(statistics.median(times), 2),
                      "seconds_range": [round(min(times), 2), round(max(times), 2)],
                      "contention": contention([os.getloadavg()[0]])}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
