"""The best fixed expert of the evaluation: one batched forward per expert, same choice as whole windows."""
from __future__ import annotations

import torch

from routing_fixtures import shared_converted
from tomoe_core.convert.materialise import load_converted
from tomoe_core.workflows.evaluation import _best_fixed_expert


def _whole_window_choice(moe, windows):
    """The former rule: every window whole, one forward per (expert, window)."""
    losses = []
    with torch.no_grad():
        for k in range(moe.config.num_experts):
            moe.set_routing(k)
            nll = 0.0
            for row in windows:
                logits = moe(input_ids=row.unsqueeze(0)).logits[0, :-1].float()
                nll += float(torch.nn.functional.cross_entropy(logits, row[1:], reduction="sum"))
            losses.append(nll)
    moe.set_routing(None)
    return int(torch.tensor(losses).argmin()), losses


def test_best_fixed_expert_is_one_batched_forward_per_expert_with_the_same_choice():
    moe, _, _ = load_converted(shared_converted(), load_tokenizer=False)
    g = torch.Generator().manual_seed(0)
    windows = torch.randint(0, moe.get_input_embeddings().num_embeddings, (3, 24), generator=g)
    calls = []
    handle = moe.register_forward_hook(lambda _m, args, kwargs_or_out: calls.append(1))
    try:
        chosen = _best_fixed_expert(moe, windows, "cpu", tokens=24)
    finally:
        handle.remove()
    assert len(calls) == moe.config.num_experts  # not experts x windows
    expected, losses = _whole_window_choice(moe, windows)
    assert chosen == expected, losses
    assert all(m.routing_override is None for m in moe.moe_mlps)  # learned routing restored
