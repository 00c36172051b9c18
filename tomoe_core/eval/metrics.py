"""Quality measurements: perplexity, KL to dense, top-1 agreement, greedy generation side by side.

Perplexity is over non-overlapping windows (each window predicts its own tokens 2..T from
their prefix inside the window; no context crosses a window boundary). All variants see the
same windows, and the dense logits of a window are computed once and shared.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F

LogitsFn = Callable[[torch.Tensor], torch.Tensor]  # (1, T) ids -> (1, T, V) logits


@dataclass
class QualityResult:
    name: str
    perplexity: float
    kl_to_dense: float
    top1_agreement: float
    tokens: int
    windows: int
    window: int
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


def default_window(model) -> int:
    cfg = getattr(model, "config", None)
    base = cfg.base() if hasattr(cfg, "base") else cfg
    ctx = getattr(base, "max_position_embeddings", None) or getattr(base, "n_positions", None) or 2048
    return min(2048, int(ctx))


@torch.no_grad()
def evaluate_variants(dense: LogitsFn, variants: dict[str, LogitsFn], windows: torch.Tensor,
                      device: str | torch.device = "cpu", progress=None) -> dict[str, QualityResult]:
    """Evaluate the dense model and every variant on the same windows. windows: (n, T) ids."""
    names = ["dense", *variants]
    nll = dict.fromkeys(names, 0.0)
    kl = dict.fromkeys(names, 0.0)
    agree = dict.fromkeys(names, 0)
    secs = dict.fromkeys(names, 0.0)
    count = 0
    n, length = windows.shape
    for i, row in enumerate(windows):
        ids = row.unsqueeze(0).to(device)
        targets = ids[0, 1:]
        t0 = time.time()
        logp_dense = F.log_softmax(dense(ids)[0, :-1].float(), -1)  # (T-1, V)
        secs["dense"] += time.time() - t0
        top_dense = logp_dense.argmax(-1)
        nll["dense"] += float(-logp_dense.gather(1, targets[:, None]).sum())
        agree["dense"] += targets.numel()
        for name, fn in variants.items():
            t0 = time.time()
            logp = F.log_softmax(fn(ids)[0, :-1].float(), -1)
            secs[name] += time.time() - t0
            nll[name] += float(-logp.gather(1, targets[:, None]).sum())
            kl[name] += float((logp_dense.exp() * (logp_dense - logp)).sum())
            agree[name] += int((logp.argmax(-1) == top_dense).sum())
        count += targets.numel()
        if progress is not None:
            progress(i + 1, n)
    return {name: QualityResult(name=name, perplexity=math.exp(nll[name] / count), kl_to_dense=kl[name] / count,
                                top1_agreement=agree[name] / count, tokens=count, windows=n, window=length,
                                seconds=secs[name])
            for name in names}


def logits_fn(model, setup: Callable[[], None] | None = None) -> LogitsFn:
    """Wrap a model (and the state it needs, e.g. a routing mode) as ids -> logits."""
    def run(ids: torch.Tensor) -> torch.Tensor:
        if setup is not None:
            setup()
        return model(input_ids=ids).logits
    return run


# -- generation side by side ---------------------------------------------------------------------
@torch.no_grad()
def greedy(model, tokenizer, prompt: str, max_new_tokens: int = 40, device="cpu") -> list[int]:
    ids = encode_prompt(tokenizer, prompt, model).to(device)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


class PromptError(ValueError):
    pass


def context_length(model) -> int:
    cfg = model.config
    base = cfg.base() if hasattr(cfg, "base") else cfg
    return int(getattr(base, "max_position_embeddings", None) or getattr(base, "n_positions", 2048))


def encode_prompt(tokenizer, prompt: str, model, max_new_tokens: int = 0) -> torch.Tensor:
    if not prompt or not prompt.strip():
        raise PromptError("the prompt is empty: type some text to continue")
    from ..text.sources import encode_text

    ids = torch.tensor([encode_text(tokenizer, prompt)])  # (1, T): the tokenizer's BOS (if any), then the prompt
    limit = context_length(model)
    if ids.shape[1] + max_new_tokens > limit:
        raise PromptError(f"the prompt has {ids.shape[1]} tokens; with {max_new_tokens} new tokens it exceeds the "
                          f"model's context of {limit}: shorten it")
    return ids


@torch.no_grad()
def compare_generation(dense_model, moe_model, tokenizer, prompt: str, max_new_tokens: int = 40,
                       device="cpu") -> dict:
    """Greedy continuations of both models, where they diverge, and per-token KL along the MoE's text.

    Returns dense_tokens/moe_tokens (strings), first_divergence (index or None), and for the
    MoE continuation the KL(dense || moe) of the distribution that produced each token.
    """
    prompt_ids = encode_prompt(tokenizer, prompt, moe_model, max_new_tokens)
    dense_new = greedy(dense_model, tokenizer, prompt, max_new_tokens, device)
    moe_new = greedy(moe_model, tokenizer, prompt, max_new_tokens, device)
    full = torch.tensor([prompt_ids[0].tolist() + moe_new], device=device)
    p = prompt_ids.shape[1]
    logp_d = F.log_softmax(dense_model(input_ids=full).logits[0].float(), -1)
    logp_m = F.log_softmax(moe_model(input_ids=full).logits[0].float(), -1)
    kl = (logp_d.exp() * (logp_d - logp_m)).sum(-1)[p - 1:-1]  # distribution that produced each new token
    divergence = next((i for i, (a, b) in enumerate(zip(dense_new, moe_new)) if a != b), None)
    if divergence is None and len(dense_new) != len(moe_new):
        divergence = min(len(dense_new), len(moe_new))
    return {
        "prompt_tokens": p,
        "dense_ids": dense_new, "moe_ids": moe_new,
        "dense_tokens": [tokenizer.decode([t]) for t in dense_new],
        "moe_tokens": [tokenizer.decode([t]) for t in moe_new],
        "dense_text": tokenizer.decode(dense_new), "moe_text": tokenizer.decode(moe_new),
        "first_divergence": divergence, "moe_token_kl": kl.tolist(),
    }
