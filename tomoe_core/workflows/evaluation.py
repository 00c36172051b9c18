"""The evaluation workflow: dense vs conversion (learned / random / best fixed routing) vs static and
per-token baselines on the same held-out windows, saved as a JSON result (`python -m tomoe_core evaluate`)."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from ..convert.dense import load_dense
from ..convert.masked_model import MaskedModel
from ..convert.materialise import check_same_vocabulary, conversion_digest, dense_model_of, load_converted
from ..eval.baselines import activation_stats, baseline_variants
from ..eval.lastword import DEFAULT_ITEMS, encode_items, load_items, score_last_words
from ..eval.lastword import rule as last_word_rule
from ..eval.metrics import default_window, evaluate_variants, logits_fn
from ..infra.workspace import safe_name
from ..infra.locations import cache_dir
from ..infra.machine import machine_info
from ..moe.atomic import atomic_write_json
from ..moe.modeling import read_metadata
from ..text.sources import text_windows

logger = logging.getLogger(__name__)  # diagnostics; the CLI shows them on stderr


def run_evaluation(conversion: Path | None, model_name: str | None = None, text: str = "wiki",
                   window: int | None = None, max_windows: int | None = 16, baselines=("magnitude", "wanda-sp"),
                   budget: float | None = None, routing_modes=True, device="cpu", calibration_tokens: int = 16384,
                   progress=None, log=logger.info, last_word_items: int = DEFAULT_ITEMS) -> dict:
    """Dense vs conversion (learned / random / best fixed routing) vs static baselines, same windows; and
    every variant's last-word accuracy on `last_word_items` items of the text's held-out split (0: none)."""
    meta = read_metadata(conversion) if conversion else {}
    model_name = model_name or (dense_model_of(conversion, meta) if conversion else "smollm2-135m")
    budget = budget if budget is not None else meta.get("budget", 0.5)
    dense, tokenizer = load_dense(model_name, device=device, log=log)
    tag = safe_name(Path(model_name).name)
    window = window or default_window(dense)
    held = text_windows(tokenizer, text, "heldout", tag, window, max_windows)
    masked = MaskedModel(dense, num_experts=1)
    variants = {}
    if conversion:
        moe, _, _ = load_converted(conversion, device=device, layout="prefill", load_tokenizer=False)
        check_same_vocabulary(moe, dense, conversion, model_name)
        variants["tomoe"] = logits_fn(moe, lambda: moe.set_routing(None))
        if routing_modes:
            gen = torch.Generator()
            variants["tomoe-random"] = logits_fn(moe, lambda: (gen.manual_seed(0), moe.set_routing("random", gen)))
            best = _best_fixed_expert(moe, held[:2], device)
            variants[f"tomoe-fixed-{best}"] = logits_fn(moe, lambda: moe.set_routing(best))
    stats = None
    if baselines:
        seq = min(512, window)
        stats = activation_stats(masked, text_windows(tokenizer, text, "calibration", tag, seq,
                                                      max(1, calibration_tokens // seq)))
    for method, (fn, _ratio) in baseline_variants(masked, baselines, budget, stats, held[:1, :64]).items():
        variants[method] = fn
    dense_fn = logits_fn(masked, lambda: masked.set_masks(None))
    t0 = time.time()
    results = evaluate_variants(dense_fn, variants, held, device=device, progress=progress)
    results = {k: v.as_dict() for k, v in results.items()}
    items = load_items(text, "heldout", last_word_items) if last_word_items else []
    if last_word_items and not items:
        log(f"[evaluate] {text} (held-out split) has no sentence that ends in a word of "
            f"{last_word_rule()['min_letters']}+ letters: no last-word accuracy")
    if items:
        encoded = encode_items(tokenizer, items)
        pad_id = getattr(tokenizer, "pad_token_id", None) or 0
        for name, fn in {"dense": dense_fn, **variants}.items():
            results[name].update(score_last_words(fn, encoded, device=device, pad_id=pad_id).fields())
        masked.set_masks(None)
    out = {
        "kind": "quality", "model": model_name, "conversion": str(conversion) if conversion else None,
        "conversion_digest": conversion_digest(meta) if meta else None, "budget": budget,
        "text": f"{text} (held-out split)", "window": window, "windows": int(held.shape[0]),
        "tokens": int(held.numel()), "machine": machine_info(device), "seconds": round(time.time() - t0, 1),
        "results": results,
        "last_word": {"items": len(items), "text": f"{text} (held-out split)", **last_word_rule()} if items else None,
    }
    if meta:
        out["budget_source"] = meta.get("budget_source", "trained")
        out["derived_from"] = meta.get("derived_from")  # a rebudgeted copy: the conversion it came from
        out["layers"] = meta.get("layers")
        out["accounting"] = meta.get("accounting")
    return out


@torch.no_grad()
def _best_fixed_expert(moe, windows: torch.Tensor, device, tokens: int = 64) -> int:
    """The single expert (same index in every layer) with the lowest NLL on the first `tokens`
    tokens of a few windows, all windows in one batch: E forwards of (W, tokens). The choice needs
    the experts' ranking, not a precise perplexity: on the shipped SmolLM2 conversion 2 windows x
    64 tokens pick the same expert as 2 whole windows of 512 and as 16 windows x 64 (their
    NLL per token 4.69 against 5.13 for the runner-up), in 10 s instead of 84-109 s on 2 CPU cores."""
    ids = windows[:, :tokens].to(device)  # (W, T)
    losses = []
    for k in range(moe.config.num_experts):
        moe.set_routing(k)
        logits = moe(input_ids=ids).logits[:, :-1].float()  # (W, T-1, V)
        losses.append(float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(),
                                                              reduction="sum")))
    moe.set_routing(None)
    return int(torch.tensor(losses).argmin())


def save_result(result: dict, name: str) -> Path:
    path = cache_dir() / "results" / f"{safe_name(name)}.json"
    atomic_write_json(path, result)
    return path


def format_quality_table(result: dict) -> str:
    lines = [f"model {result['model']}, text {result['text']}, {result['windows']} windows x {result['window']} "
             f"tokens, budget {result['budget']}, machine: {result['machine']['platform']} "
             f"({result['machine']['cpu_count']} CPUs, {result['machine']['device']})",
             f"{'variant':<16}{'perplexity':>12}{'KL':>10}{'top-1 agr':>11}{'last-word acc':>15}"]
    for name, r in result["results"].items():
        last_word = f"{r['last_word_accuracy']:.3f}" if "last_word_accuracy" in r else "-"
        lines.append(f"{name:<16}{r['perplexity']:>12.2f}{r['kl_to_dense']:>10.4f}{r['top1_agreement']:>11.4f}"
                     f"{last_word:>15}")
    if result.get("last_word"):
        lines.append(f"last-word accuracy: {result['last_word']['items']} items of {result['last_word']['text']} "
                     "(every token of a sentence's last word greedy, as lm-eval's acc)")
    return "\n".join(lines)
