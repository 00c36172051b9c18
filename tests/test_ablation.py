"""Expert ablation (tomoe_core.trace.ablation): exactness of the replayed layers in every family,
the replacement rules, the rows beside a routing log, resuming, and refusing bad indices."""
from __future__ import annotations

import json

import duckdb
import pytest
import torch

from routing_fixtures import converted, routing_cache, tokenizer, traced_run  # noqa: F401
from tiny_models import FAMILIES, tiny_ids, tiny_model
from tomoe_core.convert.materialise import load_converted
from tomoe_core.trace import ablation
from tomoe_core.trace.ablation import AblationError, _Replay, plan_ablation, replace_expert, run_ablation


def _tiny_moe(family: str, num_experts: int = 4, seed: int = 0):
    from tomoe_core import MaskedModel, materialise

    mm = MaskedModel(tiny_model(family, seed=seed), num_experts=num_experts)
    g = torch.Generator().manual_seed(seed)
    masks = [(torch.rand(num_experts, size, generator=g) < 0.5).float() for size in mm.intermediate_sizes]
    for m in masks:
        m[:, 0] = 1
    moe = materialise(mm, masks, budget=0.5)
    moe.eval()
    return moe


def _decoder_layers(moe):
    from tomoe_core.moe.families import adapter_for

    return adapter_for(moe.model).layers(moe.model)


def _base_and_router_logits(moe, mlp, ids):
    """The model's logits on `ids` and the router logits of `mlp` on the way."""
    seen = {}
    hook = mlp.router.register_forward_hook(lambda m, a, out: seen.__setitem__("logits", out.detach().clone()))
    try:
        logits = moe(input_ids=ids, use_cache=False).logits
    finally:
        hook.remove()
    return logits, seen["logits"]


@pytest.mark.parametrize("family", FAMILIES)
@torch.inference_mode()
def test_replayed_layers_give_the_full_forward(family):
    """Layers before the ablated one replay their outputs instead of running: same logits as a
    full forward under the same intervention, in every family."""
    moe = _tiny_moe(family)
    ids = tiny_ids(1, 16)
    replay = _Replay(_decoder_layers(moe))
    with replay.recording():
        base = moe(input_ids=ids, use_cache=False).logits
    last = len(moe.moe_mlps) - 1
    mlp = moe.moe_mlps[last]
    experts = mlp.router(torch.zeros(1, mlp.router.in_features)).shape[-1]
    moe.moe_mlps[last].routing_override = replace_expert(0, "second")
    try:
        full = moe(input_ids=ids, use_cache=False).logits
        with replay.skipping(last):
            replayed = moe(input_ids=ids, use_cache=False).logits
    finally:
        mlp.routing_override = None
    torch.testing.assert_close(replayed, full, rtol=1e-5, atol=1e-5)
    assert experts == 4
    with replay.skipping(last):  # the replayed layers are restored afterwards
        pass
    torch.testing.assert_close(moe(input_ids=ids, use_cache=False).logits, base, rtol=1e-5, atol=1e-5)


@torch.inference_mode()
def test_second_choice_equals_an_explicit_forced_routing():
    moe = _tiny_moe("llama")
    ids = tiny_ids(1, 16, seed=3)
    mlp = moe.moe_mlps[0]
    base, logits = _base_and_router_logits(moe, mlp, ids)  # (1, T, V), (N, E)
    chosen = logits.argmax(-1)
    expert = int(chosen.mode().values)
    explicit = torch.where(chosen == expert, logits.topk(2, dim=-1).indices[:, 1], chosen)
    assert (explicit != chosen).any()
    mlp.routing_override = lambda lg: explicit
    forced = moe(input_ids=ids, use_cache=False).logits
    mlp.routing_override = replace_expert(expert, "second")
    ablated = moe(input_ids=ids, use_cache=False).logits
    mlp.routing_override = None
    torch.testing.assert_close(ablated, forced)
    assert not torch.allclose(ablated, base)


def test_random_replacement_never_keeps_the_ablated_expert():
    logits = torch.randn(4000, 8)
    chosen = logits.argmax(-1)
    gen = torch.Generator().manual_seed(0)
    new = replace_expert(3, "random", gen)(logits)
    assert (new != 3).all()
    assert torch.equal(new[chosen != 3], chosen[chosen != 3])
    counts = torch.bincount(new[chosen == 3], minlength=8)
    assert counts[3] == 0 and (counts[torch.arange(8) != 3] > 0).all()  # every other expert drawn


@torch.inference_mode()
def test_ablating_an_expert_no_token_uses_changes_nothing():
    moe = _tiny_moe("llama")
    ids = tiny_ids(1, 16, seed=1)
    mlp = moe.moe_mlps[1]
    base, logits = _base_and_router_logits(moe, mlp, ids)
    used = set(logits.argmax(-1).tolist())
    unused = next(e for e in range(4) if e not in used) if len(used) < 4 else None
    if unused is None:  # make one unused: a very negative router bias
        mlp.router.bias = torch.nn.Parameter(torch.zeros(4)) if mlp.router.bias is None else mlp.router.bias
        mlp.router.bias.data[3] = -1e4
        base = moe(input_ids=ids, use_cache=False).logits
        unused = 3
    for replacement in ablation.REPLACEMENTS:
        mlp.routing_override = replace_expert(unused, replacement, torch.Generator().manual_seed(0))
        out = moe(input_ids=ids, use_cache=False).logits
        mlp.routing_override = None
        assert torch.equal(out, base)


# -- beside a routing log --------------------------------------------------------------------------
def test_plan_refuses_bad_layer_expert_and_replacement(traced_run):
    with pytest.raises(AblationError, match=r"layer 2 does not exist: the model has 2 MoE layers \(0-1\)"):
        plan_ablation(traced_run, layers=[0, 2])
    with pytest.raises(AblationError, match=r"expert 7 does not exist: the model has 4 experts per layer \(0-3\)"):
        plan_ablation(traced_run, experts=[7])
    with pytest.raises(AblationError, match="unknown replacement 'third'"):
        plan_ablation(traced_run, replacements=["third"])
    with pytest.raises(AblationError, match="max_tokens"):
        plan_ablation(traced_run, max_tokens=0)


def test_cli_refuses_a_bad_layer_before_loading(traced_run, capsys, monkeypatch):
    from tomoe_core import cli
    from tomoe_core.workflows import ablation as job

    monkeypatch.setattr(job, "load_run_model", lambda *a, **k: pytest.fail("loaded a model for a bad plan"))
    assert cli.main(["ablate", str(traced_run), "--layers", "5"]) == 2
    assert "layer 5 does not exist" in capsys.readouterr().err
    assert cli.main(["ablate", str(traced_run), "--experts", "0-9"]) == 2
    assert "expert 4 does not exist" in capsys.readouterr().err


def test_plan_rebuilds_the_logs_windows(traced_run):
    from tomoe_core.trace.routing_log import read_run_meta

    plan = plan_ablation(traced_run)
    meta = read_run_meta(traced_run)
    assert plan.tokens == meta["tokens"]
    assert all(len(w.ids) <= meta["seq_len"] for w in plan.windows)
    assert plan.passes == len(plan.windows) * 2 * 4 * 2  # layers x experts x replacements, per window
    short = plan_ablation(traced_run, max_tokens=20, layers=[1], experts=[0, 2], replacements=["second"])
    assert short.tokens == 20 and short.passes == len(short.windows) * 2
    direct = plan_ablation(traced_run, effect="direct")
    assert direct.passes == len(plan.windows) * 2 * 2  # one pass per layer and replacement: all experts at once
    assert "direct effect" in direct.cost() and "experts x" not in direct.cost()
    with pytest.raises(AblationError, match="unknown effect 'both'"):
        plan_ablation(traced_run, effect="both")
    for w in plan.windows:  # targets: the next token of the document, -1 at its end
        assert (w.targets[:-1] == w.ids[1:]).all() or w.targets[-1] == -1


def test_run_ablation_writes_rows_and_resumes(traced_run, converted, monkeypatch):
    model, _, _ = load_converted(converted, layout="prefill", load_tokenizer=False)
    plan = plan_ablation(traced_run)
    real = ablation.ablate_layer
    calls = []

    def crash_on_second_layer(model, plan, layer, *args):
        calls.append(layer)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(model, plan, layer, *args)

    monkeypatch.setattr(ablation, "ablate_layer", crash_on_second_layer)
    with pytest.raises(KeyboardInterrupt):
        run_ablation(model, plan)
    assert not (traced_run / ablation.ABLATION_DIR).exists()
    assert (traced_run / ablation.PARTIAL_DIR / "part-000.parquet").is_file()
    calls.clear()
    monkeypatch.setattr(ablation, "ablate_layer", lambda *a, **k: (calls.append(a[2]), real(*a, **k))[1])
    seen = []
    folder = run_ablation(model, plan, progress=lambda done, total: seen.append((done, total)))
    assert calls == [1]  # layer 0 was kept from the interrupted run
    assert seen[-1] == (plan.passes, plan.passes)  # counted from the finished layer's passes on
    assert seen[0][0] == plan.passes // 2 + 1
    meta = json.loads((folder / ablation.ABLATION_META).read_text())
    assert meta["log_agreement"] == 1.0
    assert not (traced_run / ablation.PARTIAL_DIR).exists()
    df = duckdb.sql(f"SELECT * FROM read_parquet('{folder}/part-*.parquet')").df()
    assert len(df) == plan.tokens * 2 * 4 * 2
    assert set(df["replacement"]) == {"second", "random"}
    routed = df[df["routed"]]
    assert (routed["replaced_by"] >= 0).all() and (routed["replaced_by"] != routed["expert"]).all()
    assert (df.loc[~df["routed"], "replaced_by"] == -1).all()
    assert routed["kl"].max() > 0
    # the last layer has no later layer to carry the change to other tokens
    last = df[(df["layer"] == 1) & ~df["routed"]]
    assert last["kl"].abs().max() < 1e-6
    # the random control's rows differ from the second choice's
    second = routed[routed["replacement"] == "second"].set_index(["doc_id", "position", "layer", "expert"])
    rand = routed[routed["replacement"] == "random"].set_index(["doc_id", "position", "layer", "expert"])
    assert (second["replaced_by"] != rand.loc[second.index, "replaced_by"]).any()


def test_direct_effect_is_the_total_effect_at_the_last_layer_and_covers_each_routed_token_once(traced_run, converted):
    """At the last layer a removed expert reaches no other token, so the fast direct effect (every token
    loses its expert at once, attention frozen) must equal the exact rerun there, token for token."""
    model, _, _ = load_converted(converted, layout="prefill", load_tokenizer=False)
    last = len(model.moe_mlps) - 1
    total = run_ablation(model, plan_ablation(traced_run, layers=[last], replacements=["second", "random"]))
    direct_plan = plan_ablation(traced_run, replacements=["second", "random"], effect="direct")
    direct = run_ablation(model, direct_plan)
    assert direct.name == "ablation-direct" and total.name == "ablation"
    assert json.loads((direct / ablation.ABLATION_META).read_text())["effect"] == "direct"
    t = duckdb.sql(f"SELECT * FROM read_parquet('{total}/part-*.parquet') WHERE routed").df()
    d = duckdb.sql(f"SELECT * FROM read_parquet('{direct}/part-*.parquet')").df()
    assert d["routed"].all()  # only routed tokens: the others are unchanged by construction
    per = d.groupby(["layer", "replacement"]).size()
    assert (per == direct_plan.tokens).all()  # each token once per layer and replacement, under its own expert
    assert (d["replaced_by"] != d["expert"]).all()
    key = ["doc_id", "position", "expert", "replacement"]  # the random control draws the same replacements too
    both = t.merge(d[d["layer"] == last], on=key, suffixes=("_t", "_d"))
    assert len(both) == len(t) > 0 and set(both["replacement"]) == {"second", "random"}
    assert (both["replaced_by_t"] == both["replaced_by_d"]).all()
    assert both["delta_loss_t"].fillna(0).sub(both["delta_loss_d"].fillna(0)).abs().max() < 1e-4
    assert both["kl_t"].sub(both["kl_d"]).abs().max() < 1e-4
    early = d[(d["layer"] == 0) & (d["replacement"] == "second")]
    assert early["kl"].max() > 0  # an earlier layer's swap does change the prediction


def test_cli_ablate_direct_effect(traced_run, converted, capsys):
    from tomoe_core import cli

    assert cli.main(["ablate", str(traced_run), "--conversion", str(converted), "--effect", "direct", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "direct effect" in out and (traced_run / "ablation-direct" / ablation.ABLATION_META).is_file()


@torch.inference_mode()
def test_forced_expert_steers_one_layer_and_restores_it():
    from tomoe_core.trace.ablation import forced_expert

    moe = _tiny_moe("qwen2")
    ids = tiny_ids(1, 16, seed=2)
    base = moe(input_ids=ids, use_cache=False).logits
    seen = []
    hook = moe.moe_mlps[1].routing_point.register_forward_hook(lambda m, a, out: seen.append(out[0].clone()))
    with forced_expert(moe, 1, 2):
        steered = moe(input_ids=ids, use_cache=False).logits
        generated = moe.generate(ids, max_new_tokens=3, do_sample=False)
    hook.remove()
    assert all((s == 2).all() for s in seen) and len(seen) >= 2  # prompt pass and every decode step
    assert moe.moe_mlps[0].routing_override is None and moe.moe_mlps[1].routing_override is None
    assert not torch.allclose(steered, base)
    torch.testing.assert_close(moe(input_ids=ids, use_cache=False).logits, base)
    assert generated.shape[1] == 19
    with pytest.raises(AblationError, match=r"layer 2 does not exist: the model has 2 MoE layers \(0-1\)"):
        with forced_expert(moe, 2, 0):
            pass
    with pytest.raises(AblationError, match=r"expert 4 does not exist: the model has 4 experts per layer \(0-3\)"):
        with forced_expert(moe, 0, 4):
            pass


@torch.inference_mode()
def test_replay_restores_a_forward_the_instance_already_had():
    moe = _tiny_moe("llama")
    layers = _decoder_layers(moe)
    own = layers[0].forward  # e.g. a device-placement hook sets an instance forward
    layers[0].forward = lambda *a, **k: own(*a, **k)
    marker = layers[0].forward
    replay = _Replay(layers)
    with replay.recording():
        moe(input_ids=tiny_ids(1, 8), use_cache=False)
    with replay.skipping(1):
        assert layers[0].forward is not marker
    assert layers[0].forward is marker and "forward" not in layers[1].__dict__


def test_windows_past_the_cache_rerun_their_unablated_pass_with_the_same_rows(traced_run, converted, monkeypatch):
    model, _, _ = load_converted(converted, layout="prefill", load_tokenizer=False)
    plan = plan_ablation(traced_run, replacements=["random"], effect="direct")
    assert len(plan.windows) > 1

    def rows():
        folder = run_ablation(model, plan)
        return duckdb.sql(f"SELECT * FROM read_parquet('{folder}/part-*.parquet') ORDER BY ALL").df()

    cached = rows()
    monkeypatch.setattr(ablation, "CACHED_WINDOWS", 1)  # every window but the first recomputed per layer
    assert rows().equals(cached)
