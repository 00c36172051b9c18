"""ToMoE against TEAL-style per-token sparsity at equal active MLP weights: what each costs to run.

    python -m benchmarks.teal_speed                      # the shipped conversion at p = 0.5, 1 thread
    python -m benchmarks.teal_speed --budget 0.7 --repeats 7

Quality says TEAL-style thresholding beats ToMoE at p >= 0.4 on SmolLM2-135M; this measures the
other side. Both run the MLPs of every layer, one copy of the weights each, on the inputs the dense
model gives its MLPs (the same tokens for all), and time:
  * MLP decode, batch 1 and batch 8 (one new token per sequence), ms per step summed over layers;
  * MLP prefill of a 512-token prompt, ms summed over layers.
Variants:
  * dense: the model's own MLPs;
  * ToMoE: the shipped budget-conditioned conversion materialised at --budget, its default CPU layout
    (`indexed`: union weights once, every token reads its expert's rows; a batch is grouped by expert);
  * TEAL-style: the thresholds `benchmarks.quality` uses (calibrated on the calibration split), run as
    gather-GEMVs that read only the kept weights: gate and up stored transposed as one (D, 2I) matrix
    and down as (I, D), so every kept input entry reads one contiguous row, and
    `torch.nn.functional.embedding_bag` with per-sample weights sums a_i * W[i, :] over the kept
    entries of every token in one call (no copy of the selected rows). Its output is checked against
    the reference implementation in `tomoe_core.eval.baselines` before timing.
Repeats interleave the variants; ratios to dense are paired within a repeat (median and [q1, q3]).
One thread, thread CPU time (time preempted by other processes does not count). Writes
cache/results/teal_speed.json and prints a table.
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
from torch import nn

from benchmarks import speed
from tomoe_core.eval.baselines import DYNAMIC_CALIBRATION_TOKENS, DynamicSparsity
from tomoe_core.infra.locations import cache_dir
from tomoe_core.text.sources import cached_stream, text_windows
from tomoe_core.moe.atomic import atomic_write_json
from tomoe_core.infra.machine import machine_info
from tomoe_core.convert.masked_model import MaskedModel
from tomoe_core.convert.dense import load_dense
from tomoe_core.convert.folder import conversions_dir
from tomoe_core.workflows.rebudget import materialise_at


class TealGatherMLP(nn.Module):
    """TEAL-style sparsity of one gated MLP as gather-GEMVs over the kept input entries.  (..., D) -> (..., D)"""

    def __init__(self, weights, thresholds: dict[str, float]):
        super().__init__()
        if weights.gate is None or any(b is not None for b in (weights.gate_bias, weights.up_bias, weights.down_bias)):
            raise ValueError("the gather kernel here covers gated MLPs without biases (llama family)")
        self.act, self.I = weights.act, weights.intermediate_size
        # buffers, so that .to(device, dtype) moves them with the module
        self.register_buffer("gate_up_t", torch.cat([weights.gate.t(), weights.up.t()], dim=1).contiguous())  # (D, 2I)
        self.register_buffer("down_t", weights.down.t().contiguous())  # (I, D)
        self.tx, self.th = float(thresholds["x"]), float(thresholds["h"])

    @staticmethod
    def _gather_gemv(values: torch.Tensor, table: torch.Tensor, threshold: float) -> torch.Tensor:
        """sum over the entries of each row of `values` with |v| > threshold of v * table[index].  (N, K) -> (N, M)"""
        rows, cols = (values.abs() > threshold).nonzero(as_tuple=True)
        offsets = torch.zeros(values.shape[0], dtype=torch.long, device=values.device)
        counts = torch.bincount(rows, minlength=values.shape[0])
        offsets[1:] = counts.cumsum(0)[:-1]
        return F.embedding_bag(cols, table, offsets, mode="sum", per_sample_weights=values[rows, cols])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        gate, up = self._gather_gemv(flat, self.gate_up_t, self.tx).split(self.I, dim=-1)
        h = self.act(gate) * up
        return self._gather_gemv(h, self.down_t, self.th).reshape(shape)


def teal_mlps(dense, budget: float, tokenizer, tag: str) -> tuple[list[TealGatherMLP], DynamicSparsity]:
    masked = MaskedModel(dense, num_experts=1)
    reference = DynamicSparsity(masked, "teal", budget)
    calib = text_windows(tokenizer, "wiki", "calibration", tag, 512, DYNAMIC_CALIBRATION_TOKENS // 512)
    reference.calibrate(calib)
    return [TealGatherMLP(m.weights, m.thresholds) for m in reference.mlps], reference


def run(args, log=print) -> dict:
    torch.set_num_threads(1)
    speed._clock = speed.CLOCKS["thread"]
    dense, tokenizer = load_dense(args.model, log=lambda *a: None)
    tag = Path(args.model).name
    text = cached_stream(tokenizer, "wiki", "heldout", None, tag)
    moe, _, _ = materialise_at(args.conversion, args.budget, layout="indexed", log=lambda *a: None)
    teal, reference = teal_mlps(dense, args.budget, tokenizer, tag)
    dense_mlps = speed.layer_mlps(dense)  # the dense model is wrapped, not changed, by the reference
    variants = {"dense": dense_mlps, "ToMoE": speed.layer_mlps(moe), "TEAL-style": teal}
    prefill_ids = text[: args.prefill_tokens].view(1, -1)
    workloads = {"prefill": [speed.capture_mlp_inputs(dense, prefill_ids)]}
    for batch in (1, 8):
        ids = text[args.prefill_tokens: args.prefill_tokens + batch * args.steps].view(batch, args.steps)
        inputs = speed.capture_mlp_inputs(dense, ids)
        workloads[f"decode, batch {batch}"] = [[x[:, s:s + 1] for x in inputs] for s in range(args.steps)]
    errors = []
    with torch.no_grad():  # the gather kernel computes what the reference computes (up to summation order:
        for mlp, ref, x in zip(teal, reference.mlps, workloads["prefill"][0]):  # it can flip an h at the threshold)
            errors.append(float((mlp(x) - ref(x)).abs().max() / ref(x).abs().max()))
        if max(errors) > 1e-2:
            raise AssertionError(f"TEAL gather kernel differs from the reference by {max(errors):.2e}")
        reference.reset_counts()
        for mlp, x in zip(reference.mlps, workloads["prefill"][0]):
            mlp(x)
        teal_ratio = reference.active_ratio
    raw = {w: {v: [] for v in variants} for w in workloads}
    loads = []
    with torch.no_grad():
        for r in range(args.repeats):
            for w, steps in workloads.items():
                for v, mlps in variants.items():
                    raw[w][v].append(speed.time_mlps(mlps, steps, "cpu") * 1e3)
            loads.append(os.getloadavg()[0])
            log(f"[teal-speed] repeat {r + 1}/{args.repeats}, loadavg {loads[-1]:.2f}")
    rows = []
    for w in workloads:
        for v in variants:
            ratio, iqr = speed.paired_ratios(raw[w][v], raw[w]["dense"])
            rows.append({"workload": w, "variant": v, "ms": statistics.median(raw[w][v]), "vs_dense": ratio,
                         "vs_dense_iqr": iqr, "repeats_ms": raw[w][v]})
    return {"kind": "teal-speed", "model": args.model, "conversion": args.conversion.name, "budget": args.budget,
            "teal_active_mlp_ratio_prefill": teal_ratio, "max_relative_error_vs_reference": max(errors), "threads": 1, "clock": "thread CPU time",
            "steps": args.steps, "prefill_tokens": args.prefill_tokens, "repeats": args.repeats,
            "loadavg": loads, "contention": speed.contention(loads), "machine": machine_info("cpu"), "rows": rows,
            "command": "python -m benchmarks.teal_speed " + " ".join(sys.argv[1:])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--conversion", type=Path, default=conversions_dir() / "smollm2-135m-any-budget")
    p.add_argument("--budget", type=float, default=0.5)
    p.add_argument("--steps", type=int, default=16, help="decode steps timed per repeat")
    p.add_argument("--prefill-tokens", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--output", type=Path, default=cache_dir() / "results" / "teal_speed.json")
    args = p.parse_args(argv)
    t0 = time.time()
    result = run(args)
    atomic_write_json(args.output, result)
    print(f"p = {args.budget:g}, TEAL-style active MLP ratio on the prefill tokens {result['teal_active_mlp_ratio_prefill']:.3f}; "
          f"1 thread; load average {min(result['loadavg']):.2f}-{max(result['loadavg']):.2f}")
    print(f"{'workload':<18}{'variant':<12}{'ms (median)':>12}{'x dense':>9}  IQR")
    for r in result["rows"]:
        print(f"{r['workload']:<18}{r['variant']:<12}{r['ms']:>12.2f}{r['vs_dense']:>9.3f}  "
              f"[{r['vs_dense_iqr'][0]:.3f}-{r['vs_dense_iqr'][1]:.3f}]")
    print(f"written {args.output} ({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
