"""Greedy continuations of a few fixed prompts by the dense model and by a conversion at every budget.

    python -m benchmarks.continuations                                   # the shipped default, p = 0.3 ... 0.9
    python -m benchmarks.continuations --conversion cache/conversions/NAME --budgets 0.5 0.7

So that the studio can show what quality means at each budget without running a model: the Budget
explorer reads the file and shows, beside the cards, the dense text and the converted model's text
at the budget on the slider (the nearest precomputed one, labelled). A budget-conditioned conversion
is materialised at every budget of its range; a single-budget one only at its own.

Writes cache/results/continuations.json:
  {kind: "continuations", model, conversion, conversion_digest, new_tokens, machine, command, seconds,
   prompts: [str], dense: [text per prompt],
   budgets: {"0.5": [{text, first_divergence (generated token index or null), mean_kl}, ... per prompt]}}
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch

from tomoe_core.convert.folder import Conversion
from tomoe_core.convert.materialise import conversion_digest, load_converted
from tomoe_core.moe.modeling import read_metadata
from tomoe_core.infra.locations import cache_dir
from tomoe_core.eval.metrics import compare_generation
from tomoe_core.moe.atomic import atomic_write_json
from tomoe_core.infra.machine import machine_info
from tomoe_core.convert.dense import load_dense
from tomoe_core.convert.folder import conversions_dir
from tomoe_core.workflows.rebudget import materialise_at

PROMPTS = (
    "The history of the Roman Empire begins",
    "Photosynthesis is the process by which",
    "The city of Paris is known for",
    "In mathematics, a prime number is",
    "The first computers were",
)
DEFAULT_BUDGETS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
DEFAULT_CONVERSION = "smollm2-135m-any-budget"


def continuations(conversion: Path, budgets, prompts=PROMPTS, new_tokens: int = 30, log=print) -> dict:
    t0 = time.time()
    meta = read_metadata(conversion)
    dense, tokenizer = load_dense(meta["model"], log=log)
    conditioned = Conversion(conversion, meta).is_conditioned
    if not conditioned:
        budgets = [float(meta["budget"])]
    out = {"kind": "continuations", "model": meta["model"], "conversion": conversion.name,
           "conversion_digest": conversion_digest(meta), "new_tokens": new_tokens, "prompts": list(prompts),
           "dense": [], "budgets": {}}
    for budget in budgets:
        if conditioned:
            moe, _, _ = materialise_at(conversion, budget, layout="memory", log=log)
        else:
            moe = load_converted(conversion, layout="memory", load_tokenizer=False)[0]
        rows = []
        for prompt in prompts:
            with torch.no_grad():
                res = compare_generation(dense, moe, tokenizer, prompt, new_tokens)
            if len(out["dense"]) < len(prompts):
                out["dense"].append(res["dense_text"])
            kl = res["moe_token_kl"]
            rows.append({"text": res["moe_text"], "first_divergence": res["first_divergence"],
                         "mean_kl": round(sum(kl) / max(len(kl), 1), 4)})
        out["budgets"][f"{budget:g}"] = rows
        log(f"[continuations] p = {budget:g}: {rows[0]['text'][:60]!r}...")
        del moe
    out["seconds"] = round(time.time() - t0, 1)
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--conversion", type=Path, default=conversions_dir() / DEFAULT_CONVERSION)
    p.add_argument("--budgets", type=float, nargs="+", default=list(DEFAULT_BUDGETS))
    p.add_argument("--new-tokens", type=int, default=30)
    p.add_argument("--output", type=Path, default=cache_dir() / "results" / "continuations.json")
    args = p.parse_args(argv)
    if not (args.conversion / "tomoe.json").exists():
        p.error(f"{args.conversion} is not a converted model (no tomoe.json); the shipped default is materialised "
                "by `python -c 'from tomoe_core.workflows.shipping import ensure_shipped_conversions as e; e()'`")
    result = continuations(args.conversion, args.budgets, new_tokens=args.new_tokens)
    result.update(machine=machine_info("cpu"),
                  command="python -m benchmarks.continuations " + " ".join(shlex.quote(a) for a in argv))
    atomic_write_json(args.output, result)
    print(f"written {args.output} ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
