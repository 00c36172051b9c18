"""A small cache/ for the studio tests: a tiny dense model, a tiny conversion, a routing log,
quality and speed results, and one corrupt result file (the pages must report it, not crash).

`python tests/studio_fixture.py DIR` builds it for a manual `TOMOE_CACHE=DIR streamlit run app/main.py`.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

CONVERSION = "tiny-llama-p0.5-e4"
_SENTENCES = [
    "The old bridge crossed the river near the small town, and farmers used it every morning.",
    "In 1848, several European cities saw large protests against their governments.",
    "She quickly wrote three letters to her brother, who lived far away in the mountains.",
    "Water boils at 100 degrees Celsius at sea level, but at lower temperatures on high peaks.",
    "Why did the committee reject the proposal after such a long and careful debate?",
    "Many birds migrate south in autumn; they return when the days grow longer.",
    "The library opened a new wing with 20,000 books, two reading rooms and a quiet garden.",
    "He was not sure whether the train would arrive on time, so he called a taxi instead.",
]
PROMPTS = [" ".join(_SENTENCES[i:] + _SENTENCES[:i]) for i in range(len(_SENTENCES))]  # about 1.4 k tokens


def _quality(budget: float, tomoe_ppl: float, conversion: Path, accounting: dict, model: str) -> dict:
    def r(name, ppl, kl, agree):
        return {"name": name, "perplexity": ppl, "kl_to_dense": kl, "top1_agreement": agree, "tokens": 1022,
                "windows": 2, "window": 512, "seconds": 1.0}
    return {"kind": "quality", "model": model, "conversion": str(conversion), "budget": budget,
            "text": "wiki (held-out split)", "window": 512, "windows": 2, "tokens": 1024,
            "machine": {"platform": "test", "cpu_count": 2, "torch_threads": 2, "device": "cpu"},
            "results": {"dense": r("dense", 26.6, 0.0, 1.0), "tomoe": r("tomoe", tomoe_ppl, 0.9 - budget, budget),
                        "tomoe-random": r("tomoe-random", tomoe_ppl * 4, 2.5, 0.2),
                        "magnitude": r("magnitude", tomoe_ppl * 50, 6.0, 0.05),
                        "wanda-sp": r("wanda-sp", tomoe_ppl * 1.3, 1.2, 0.4)},
            "accounting": accounting}


def _quality_benchmark(model: str) -> dict:
    """`benchmarks.quality` schema: ToMoE and baselines at 0.3, 0.5, 0.7 on 4 x 256-token windows (last-word
    accuracy on ToMoE rows and dense, as the benchmark records it)."""
    rows = []
    for budget, ppl in ((0.3, 60.0), (0.5, 40.0), (0.7, 30.0)):
        rows.append({"budget": budget, "method": "tomoe", "kind": "tomoe", "label": "ToMoE", "conversion": CONVERSION,
                     "active_mlp_ratio": budget, "perplexity": ppl, "kl_to_dense": 0.9 - budget,
                     "top1_agreement": budget, "last_word_accuracy": budget / 2})
        for method, factor in (("magnitude", 50.0), ("wanda-sp", 1.3), ("flap", 1.2), ("teal", 0.8)):
            rows.append({"budget": budget, "method": method, "kind": "dynamic, training-free" if method == "teal" else "baseline", "label": method, "conversion": None,
                         "active_mlp_ratio": budget, "perplexity": ppl * factor, "kl_to_dense": 1.0,
                         "top1_agreement": 0.4})
    return {"kind": "quality-benchmark", "schema_version": 1, "model": model, "text": "wiki (held-out split)",
            "window": 256, "windows": 4, "tokens": 1020, "machine": {"cpu_count": 2},
            "dense": {"perplexity": 26.6, "kl_to_dense": 0.0, "top1_agreement": 1.0, "last_word_accuracy": 0.5},
            "rows": rows}


def _speed(model: str) -> dict:
    """`benchmarks.speed` schema: dense and two layouts at 0.5 and 0.7, one thread, batch 1 and 8."""
    def row(budget, layout, tps, mem, batch):
        return {"name": f"p={budget} {layout}", "threads": 1, "batch": batch, "budget": budget, "layout": layout,
                "decode_tokens_per_s": tps * (4 if batch == 8 else 1),
                # the paired median differs from the ratio of medians, as in real files
                "decode_speedup": round(tps / 100 - 0.05, 3) if layout else 1.0,
                "decode_speedup_iqr": [round(tps / 100 - 0.1, 3), round(tps / 100, 3)] if layout else [1.0, 1.0],
                "prefill_tokens_per_s": tps * 10 if batch == 1 else None,
                "prefill_speedup": round(tps / 100 - 0.02, 3) if layout and batch == 1 else (1.0 if batch == 1 else None),
                "prefill_speedup_iqr": ([round(tps / 100 - 0.04, 3), round(tps / 100, 3)] if layout else [1.0, 1.0])
                if batch == 1 else None,
                "peak_memory_mb": mem + (100 if batch == 8 else 0), "peak_memory_kind": "peak RSS"}
    rows = [row(b, lay, tps, mem, batch) for batch in (1, 8)
            for b, lay, tps, mem in ((1.0, None, 100.0, 900.0), (0.5, "indexed", 120.0, 950.0),
                                     (0.7, "indexed", 110.0, 960.0), (0.5, "packed", 130.0, 1200.0),
                                     (0.7, "packed", 115.0, 1300.0))]
    for r in rows:
        r["method"] = "tomoe" if r["layout"] else "dense"
    for method, speeds in (("teal", ((0.3, 125.0), (0.5, 112.0), (0.7, 104.0))),  # TEAL as deployed: prefill dense
                           ("wanda-sp", ((0.5, 150.0), (0.7, 112.0))), ("flap", ((0.5, 148.0), (0.7, 111.0)))):
        for batch in (1, 8):
            for budget, tps in speeds:
                r = row(budget, None, tps, 800.0, batch)
                r.update(method=method, name=f"p={budget} {method}", decode_speedup=round(tps / 100 - 0.05, 3),
                         decode_speedup_iqr=[round(tps / 100 - 0.1, 3), round(tps / 100, 3)], peak_memory_mb=None)
                if batch == 1:
                    fast = 1.0 if method == "teal" else tps / 100
                    r.update(prefill_tokens_per_s=1000.0 * fast, prefill_speedup=fast, prefill_speedup_iqr=[fast, fast])
                rows.append(r)
    return {"kind": "speed", "model": model, "dtype": "float32", "device": "cpu",
            "machine": {"cpu_model": "Fixture CPU 9000", "cpu_count": 2, "torch_threads": 1, "device": "cpu"},
            "settings": {"threads": [1], "batch_sizes": [1, 8], "budgets": [0.5, 0.7], "layouts": ["indexed", "packed"]},
            "rows": rows}


def _tiny_dense(vocab_size: int):
    """A tiny LLaMA whose MLP is a real share of its parameters (as in real models), so the budget
    slider visibly moves its costs despite the 49 k-token embedding."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model("llama", vocab_size=vocab_size, hidden_size=64, intermediate_size=1024,
                               num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=256, tie_word_embeddings=True)
    return AutoModelForCausalLM.from_config(cfg).eval()


def build(cache: Path, with_routing: bool = True) -> Path:
    from tomoe_core import MaskedModel, materialise, save_converted
    from tomoe_core.convert.accounting import account
    from tomoe_core.moe.atomic import atomic_write_json
    from tomoe_core.convert.dense import load_tokenizer

    cache = Path(cache)
    tokenizer = load_tokenizer()
    dense = _tiny_dense(len(tokenizer))
    dense_dir = cache / "models" / "tiny-dense"
    dense.save_pretrained(dense_dir)
    tokenizer.save_pretrained(dense_dir)
    mm = MaskedModel(_tiny_dense(len(tokenizer)), num_experts=4)
    g = torch.Generator().manual_seed(0)
    masks = [(torch.rand(4, size, generator=g) < 0.5).float() for size in mm.intermediate_sizes]
    moe = materialise(mm, masks, 0.5)
    acc = account(moe).as_dict()
    folder = cache / "conversions" / CONVERSION
    meta = {"kind": "tomoe-conversion", "model": str(dense_dir), "budget": 0.5, "num_experts": 4,
            "settings": {"steps": 2, "budget": 0.5, "num_experts": 4}, "tokens_seen": 1024, "train_seconds": 3.0,
            "layers": [{"expert_widths": (m.sum(1) / m.shape[1]).tolist(), "union": 1.0} for m in masks],
            "accounting": acc, "command": "tests/studio_fixture.py"}
    save_converted(moe, folder, tokenizer, meta)
    results = cache / "results"
    atomic_write_json(results / "eval-tiny-p0.5.json", _quality(0.5, 40.0, folder, acc, str(dense_dir)))
    atomic_write_json(results / "eval-tiny-p0.7.json", _quality(0.7, 30.0, folder, None, str(dense_dir)))
    atomic_write_json(results / "quality_benchmark.json", _quality_benchmark(str(dense_dir)))
    atomic_write_json(results / "speed_benchmark.json", _speed(str(dense_dir)))
    (results / "eval-corrupt.json").write_text('{"kind": "quality", "results": {')  # a half-written file
    if with_routing:
        from tomoe_core.trace.run import trace_run
        trace_run(folder, prompts=PROMPTS, seq_len=128, batch_size=4, run_id="tiny-prompts", root=cache / "routing")
    return folder


def use_studio_cache(cache: Path, monkeypatch, tmp_path: Path) -> Path:
    """Point the studio and the engine at a fixture cache with no shipped recipes (the repository's
    would pull in the real model)."""
    monkeypatch.setenv("TOMOE_CACHE", str(cache))
    empty = tmp_path / "shipped"
    empty.mkdir()
    monkeypatch.setenv("TOMOE_SHIPPED", str(empty))
    return cache


if __name__ == "__main__":
    print(build(Path(sys.argv[1])))

