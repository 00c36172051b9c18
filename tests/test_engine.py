"""Engine tests on tiny randomly initialised models of every supported family."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from tiny_models import FAMILIES, VOCAB, tiny_ids, tiny_model
from tomoe_core import (SUPPORTED_FAMILIES, ConversionConfig, MaskedModel, UnsupportedModelError, load_converted,
                        materialise, save_converted, train_conversion)
from tomoe_core.convert.accounting import account
from tomoe_core.convert.materialise import materialise_from_recipe, save_recipe
from tomoe_core.convert.train import CheckpointError, finalize_masks


def random_masks(mm: MaskedModel, p: float = 0.5, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(mm.num_experts, size, generator=g) < p).float() for size in mm.intermediate_sizes]


def test_every_required_family_is_supported():
    required = {"llama", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3", "phi", "gpt2"}
    assert required <= set(SUPPORTED_FAMILIES)
    assert required <= set(FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_all_ones_masks_reproduce_dense_logits(family):
    model, ids = tiny_model(family), tiny_ids()
    with torch.no_grad():
        dense = model(ids).logits
    mm = MaskedModel(model, num_experts=4)
    mm.set_masks([torch.ones(4, size) for size in mm.intermediate_sizes])
    with torch.no_grad():
        masked = mm(ids).logits
    torch.testing.assert_close(masked, dense)
    # masks off is the dense model itself
    mm.set_masks(None)
    with torch.no_grad():
        torch.testing.assert_close(mm(ids).logits, dense)


@pytest.mark.parametrize("family", FAMILIES)
def test_materialised_equals_masked_and_reload_is_identical(family, tmp_path):
    ids = tiny_ids()
    mm = MaskedModel(tiny_model(family), num_experts=4)
    masks = random_masks(mm)
    mm.set_masks(masks)
    with torch.no_grad():
        masked = mm(ids).logits
    moe = materialise(mm, masks, budget=0.5)
    for layout in ("shared", "packed"):
        moe.set_layout(layout)
        with torch.no_grad():
            torch.testing.assert_close(moe(input_ids=ids).logits, masked, rtol=1e-4, atol=1e-5)
    moe.set_layout("shared")
    save_converted(moe, tmp_path / "moe", metadata={"model": "tiny", "budget": 0.5})
    reloaded, _, meta = load_converted(tmp_path / "moe", layout="shared", load_tokenizer=False)
    auto = AutoModelForCausalLM.from_pretrained(tmp_path / "moe")  # default layout: chosen by use
    with torch.no_grad():
        ref = moe(input_ids=ids).logits
        assert torch.equal(reloaded(input_ids=ids).logits, ref)  # same layout: bit-identical
        torch.testing.assert_close(auto(input_ids=ids).logits, ref, rtol=1e-4, atol=1e-5)
        auto.set_layout("shared")
        assert torch.equal(auto(input_ids=ids).logits, ref)
    assert meta["budget"] == 0.5 and len(meta["weights_sha256"]) == 64
    assert not list(tmp_path.glob(".*tmp")), "temporary folders left behind"


@pytest.mark.parametrize("family", ["llama", "phi3", "gpt2", "gemma3_text"])
def test_generation_with_kv_cache_matches_full_recompute(family):
    mm = MaskedModel(tiny_model(family), num_experts=4)
    masks = random_masks(mm, seed=1)
    moe = materialise(mm, masks)
    prompt = tiny_ids(batch=1, length=6, seed=3)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = moe.generate(input_ids=prompt, use_cache=True, **kwargs)
        uncached = moe.generate(input_ids=prompt, use_cache=False, **kwargs)
        mm.set_masks(masks)
        masked = mm.model.generate(input_ids=prompt, use_cache=False, **kwargs)
    assert cached.shape == (1, 14)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, masked)


def test_routing_is_deterministic_and_observable():
    mm = MaskedModel(tiny_model("llama"), num_experts=4)
    moe = materialise(mm, random_masks(mm))
    ids = tiny_ids()
    seen = []
    handle = moe.moe_mlps[0].routing_point.register_forward_hook(lambda mod, args, out: seen.append(args[0].clone()))
    try:
        with torch.no_grad():
            moe(input_ids=ids)
            moe(input_ids=ids)
    finally:
        handle.remove()
    assert len(seen) == 2 and seen[0].shape == (ids.numel(),)
    assert torch.equal(seen[0], seen[1])
    assert not moe.moe_mlps[0].routing_point.listening


def test_random_and_fixed_routing_modes():
    mm = MaskedModel(tiny_model("qwen2"), num_experts=4)
    moe = materialise(mm, random_masks(mm))
    ids = tiny_ids()
    chosen = []
    h = moe.moe_mlps[1].routing_point.register_forward_hook(lambda mod, args, out: chosen.append(args[0].clone()))
    try:
        with torch.no_grad():
            moe.set_routing(2)
            moe(input_ids=ids)
            moe.set_routing("random", torch.Generator().manual_seed(0))
            moe(input_ids=ids)
            moe.set_routing(None)
    finally:
        h.remove()
    assert (chosen[0] == 2).all()
    assert len(set(chosen[1].tolist())) > 1


def _train(family, tmp_path, steps, stop_after=None, seed=0, workdir="run"):
    torch.manual_seed(0)
    mm = MaskedModel(tiny_model(family), num_experts=4, seed=seed)
    stream = torch.randint(3, VOCAB, (3000,), generator=torch.Generator().manual_seed(1))
    cfg = ConversionConfig(budget=0.5, num_experts=4, steps=steps, tokens_per_step=64, seq_len=32, init_tokens=256,
                           checkpoint_every=2, seed=seed, model="tiny")
    summary = train_conversion(mm, stream, cfg, tmp_path / workdir, show_tqdm=False, stop_after=stop_after,
                               log=lambda *a: None)
    return mm, summary


def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path):
    full, _ = _train("llama", tmp_path, steps=6, workdir="full")
    _train("llama", tmp_path, steps=6, stop_after=3, workdir="resumed")  # checkpoint at step 3 (end of call)
    resumed, summary = _train("llama", tmp_path, steps=6, workdir="resumed")
    assert summary["finished"]
    a, b = full.trainable_state(), resumed.trainable_state()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    lines = (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == list(range(1, 7))


def test_training_updates_only_hypernetwork_and_routers(tmp_path):
    mm = MaskedModel(tiny_model("phi"), num_experts=4)
    before = {k: v.clone() for k, v in mm.model.state_dict().items()}
    hyper_before = {k: v.clone() for k, v in mm.trainable_state().items()}
    stream = torch.randint(3, VOCAB, (3000,), generator=torch.Generator().manual_seed(1))
    cfg = ConversionConfig(budget=0.5, num_experts=4, steps=3, tokens_per_step=64, seq_len=32, init="offset",
                           model="tiny")
    train_conversion(mm, stream, cfg, tmp_path / "w", show_tqdm=False, log=lambda *a: None)
    after = mm.model.state_dict()
    for k, v in before.items():
        if "router" not in k:
            assert torch.equal(v, after[k]), f"frozen weight {k} changed"
    changed = [k for k, v in mm.trainable_state().items() if not torch.equal(v, hyper_before[k])]
    assert any(k.startswith("hypernet.") for k in changed) and any(k.startswith("router.") for k in changed)


def test_checkpoint_with_other_settings_is_refused(tmp_path):
    _train("llama", tmp_path, steps=4, stop_after=2)
    mm = MaskedModel(tiny_model("llama"), num_experts=4)
    stream = torch.randint(3, VOCAB, (3000,))
    cfg = ConversionConfig(budget=0.3, num_experts=4, steps=4, tokens_per_step=64, seq_len=32, model="tiny")
    with pytest.raises(CheckpointError, match="other settings"):
        train_conversion(mm, stream, cfg, tmp_path / "run", show_tqdm=False, log=lambda *a: None)


def test_corrupt_checkpoint_is_reported_by_name(tmp_path):
    _train("llama", tmp_path, steps=4, stop_after=2)
    target = tmp_path / "run" / "checkpoint" / "trainable.safetensors"
    target.write_bytes(target.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="trainable.safetensors"):
        _train("llama", tmp_path, steps=4)


@pytest.mark.parametrize("budget", [0.3, 0.5, 0.7])
def test_saved_model_active_ratio_is_within_002_of_budget(budget):
    mm = MaskedModel(tiny_model("llama"), num_experts=4)
    masks, info = finalize_masks(mm, budget)
    moe = materialise(mm, masks, budget)
    report = account(moe)
    assert abs(report.mlp_active_ratio - budget) <= 0.02
    assert abs(info["ratio"] - report.mlp_active_ratio) < 1e-6
    assert report.active_total < report.dense_total


def test_accounting_of_dense_model():
    model = tiny_model("gpt2")
    report = account(model)
    assert report.mlp_active_ratio == 1.0 and report.active_total == report.dense_total
    assert report.mlp_dense == 2 * (2 * 32 * 48 + 48)  # 2 layers x (fc_in + fc_out + fc_in bias)
    assert report.flops_per_token > 2 * report.active_total


def test_recipe_rebuilds_the_same_model(tmp_path):
    mm = MaskedModel(tiny_model("mistral"), num_experts=4)
    moe = materialise(mm, random_masks(mm), 0.5)
    save_recipe(moe, tmp_path / "recipe", {"model": "tiny"})
    rebuilt = materialise_from_recipe(tmp_path / "recipe", tiny_model("mistral"))
    ids = tiny_ids()
    with torch.no_grad():
        assert torch.equal(rebuilt(input_ids=ids).logits, moe(input_ids=ids).logits)
    assert (tmp_path / "recipe" / "recipe.safetensors").stat().st_size < 20_000


def test_unsupported_family_lists_supported_ones():
    cfg = AutoConfig.for_model("bert", vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32)
    with pytest.raises(UnsupportedModelError, match="supported families: .*gpt2.*llama"):
        MaskedModel(_bert(cfg))


def _bert(cfg):
    from transformers import BertLMHeadModel
    return BertLMHeadModel(cfg)


def test_sampled_regularisation_sees_the_noisy_masks_and_logs_the_deterministic_ones(tmp_path):
    """The paper's recipe: budget and union terms on the sampled masks. With all channels on (+3 offset)
    the noise switches some off, so the regularised ratio is below the deterministic one (all on)."""
    stream = torch.randint(3, VOCAB, (3000,), generator=torch.Generator().manual_seed(1))
    logs = {}
    for mode in ("sampled", "deterministic"):
        mm = MaskedModel(tiny_model("llama"), num_experts=4)
        cfg = ConversionConfig(budget=0.5, num_experts=4, steps=2, tokens_per_step=64, seq_len=32, init="offset",
                               noise_anneal=0.0, regularise=mode, model="tiny")
        train_conversion(mm, stream, cfg, tmp_path / mode, show_tqdm=False, log=lambda *a: None)
        logs[mode] = [json.loads(x) for x in (tmp_path / mode / "log.jsonl").read_text().splitlines()]
    first = logs["sampled"][0]
    assert first["det_ratio"] == pytest.approx(1.0) and first["det_union"] == pytest.approx(1.0)
    assert 0.85 < first["ratio"] < 0.99  # about 5 % of the channels drawn off by logistic noise > 3
    assert logs["deterministic"][0]["ratio"] == pytest.approx(1.0) and "det_ratio" not in logs["deterministic"][0]
    with pytest.raises(ValueError, match="regularise must be"):
        ConversionConfig(regularise="noisy")


def test_mask_noise_sets_the_noise_amplitude_and_its_anneal(tmp_path):
    """--mask-noise a: logistic noise of amplitude a at step 0, annealed linearly to 0. With all channels at
    +3 (offset init) noise of amplitude a switches a fraction 1 / (1 + e^(3/a)) of them off in the sampled masks."""
    from tomoe_core.convert.train import noise_scale

    assert ConversionConfig(prior_scale=1.5).mask_noise == 0.5  # default: prior / 3 (~5 % of entries flip)
    assert ConversionConfig(init="offset").mask_noise == 1.0  # the paper's: +3 offset, amplitude 1
    cfg = ConversionConfig(steps=10, noise_anneal=0.5, mask_noise=0.5)
    assert [noise_scale(cfg, s) for s in (0, 1, 5, 9)] == pytest.approx([0.5, 0.4, 0.0, 0.0])
    assert noise_scale(ConversionConfig(noise_anneal=0.0, mask_noise=0.25), 7) == 0.25
    stream = torch.randint(3, VOCAB, (3000,), generator=torch.Generator().manual_seed(1))
    first = {}
    for amp in (3.0, 0.0):
        mm = MaskedModel(tiny_model("llama"), num_experts=4)
        cfg = ConversionConfig(budget=0.5, num_experts=4, steps=1, tokens_per_step=64, seq_len=32, init="offset",
                               noise_anneal=0.0, mask_noise=amp, regularise="sampled", model="tiny")
        train_conversion(mm, stream, cfg, tmp_path / str(amp), show_tqdm=False, log=lambda *a: None)
        first[amp] = json.loads((tmp_path / str(amp) / "log.jsonl").read_text().splitlines()[0])
    assert first[3.0]["noise"] == pytest.approx(3.0) and first[0.0]["noise"] == 0.0
    assert 0.68 < first[3.0]["ratio"] < 0.78  # 1 - 1 / (1 + e) = 0.73 of the channels stay on
    assert first[0.0]["ratio"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="mask_noise must be >= 0"):
        ConversionConfig(mask_noise=-1)


def test_cluster_prior_scale_sets_the_prior_and_unsaturates_the_mask_gradient():
    """--prior-scale: the cluster prior is +-s, and a smaller s lets the distillation gradient reach the
    hypernetwork (the straight-through sigmoid's slope at +-3 / tau is ~1e-3 of its slope at 0)."""
    from tomoe_core.convert.train import conversion_losses

    stream = torch.randint(3, VOCAB, (3000,), generator=torch.Generator().manual_seed(1))
    grads = {}
    for scale in (3.0, 1.0):
        mm = MaskedModel(tiny_model("llama"), num_experts=4)
        cfg = ConversionConfig(budget=0.5, num_experts=4, steps=2, tokens_per_step=64, seq_len=32, model="tiny",
                               prior_scale=scale, mask_noise=0.0)
        mm.cluster_init(stream[:256].view(8, 32), cfg.budget, prior_scale=cfg.prior_scale, seed=0)
        for l in range(len(mm.mlps)):
            assert set(mm.mask_base(l).unique().tolist()) == {-scale, scale}
        terms = conversion_losses(mm, stream[:64].view(2, 32), cfg, step=0)
        terms["distill"].backward()
        grads[scale] = sum(float(p.grad.norm()) for p in mm.hypernet.parameters() if p.grad is not None)
    assert grads[1.0] > 20 * grads[3.0]  # about 80x on this tiny model at step 0 without mask noise
    with pytest.raises(ValueError, match="prior_scale must be positive"):
        ConversionConfig(prior_scale=0)


def test_training_uses_the_configured_prior_scale(tmp_path):
    mm = MaskedModel(tiny_model("llama"), num_experts=4)
    stream = torch.randint(3, VOCAB, (3000,), generator=torch.Generator().manual_seed(1))
    cfg = ConversionConfig(budget=0.5, num_experts=4, steps=1, tokens_per_step=64, seq_len=32, model="tiny",
                           init_tokens=256, prior_scale=1.5)
    train_conversion(mm, stream, cfg, tmp_path / "w", show_tqdm=False, log=lambda *a: None)
    assert set(mm.mask_base(0).unique().tolist()) == {-1.5, 1.5}
