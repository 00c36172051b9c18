"""The projection panel's arithmetic (analysis.projection) and the cost-card helpers (analysis.card_format, analysis.speed_cards):
public model shapes, config.json parsing, roofline speed, layouts' memory, prices of 0, curve reading."""
import json

import pandas as pd
import pytest

from analysis import card_format, projection, speed_cards, tradeoff, tradeoff_figure

P = projection


@pytest.mark.parametrize("name, billions", [("Llama-3.1-8B", 8.03), ("Qwen2.5-7B", 7.62), ("Mistral-7B-v0.3", 7.25),
                                            ("Llama-3.1-70B", 70.55), ("Llama-2-7B", 6.74), ("SmolLM2-135M", 0.1345)])
def test_presets_have_the_published_parameter_counts(name, billions):
    assert P.MODEL_PRESETS[name].total_params / 1e9 == pytest.approx(billions, rel=0.003)


def test_smollm2_shape_matches_the_measured_model():
    s = P.MODEL_PRESETS["SmolLM2-135M"]
    assert s.layers * s.mlp_per_layer == 79_626_240  # 79.6 M MLP parameters (DESIGN.md)


def test_config_json_of_llama_gpt2_and_a_multimodal_wrapper():
    llama = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False}
    assert P.shape_from_config(json.dumps(llama)).total_params == P.MODEL_PRESETS["Llama-3.1-8B"].total_params
    gpt2 = P.shape_from_config({"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12, "vocab_size": 50257})
    assert not gpt2.gated and gpt2.tied and gpt2.intermediate == 3072
    assert gpt2.total_params == pytest.approx(124e6, rel=0.01)  # GPT-2 small without position embeddings and biases
    wrapped = P.shape_from_config({"model_type": "gemma3", "text_config": {**llama, "head_dim": 256}})
    assert wrapped.hd == 256 and wrapped.layers == 32


@pytest.mark.parametrize("bad, message", [("{not json", "not valid JSON"), ("[1, 2]", "not a JSON object"),
                                          ('{"hidden_size": 8}', "num_attention_heads")])
def test_a_bad_config_is_a_message_that_names_the_problem(bad, message):
    with pytest.raises(ValueError, match=message):
        P.shape_from_config(bad)


def test_projection_at_budget_one_is_dense_plus_routers_and_savings_grow_as_p_falls():
    shape, device = P.MODEL_PRESETS["Llama-3.1-8B"], P.DEVICE_PRESETS["NVIDIA H100 SXM 80GB"]
    full = P.project(shape, device, 1.0)
    assert full.active_params == pytest.approx(full.dense_params + shape.layers * shape.hidden * 8)
    speeds = [P.project(shape, device, p).tokens_per_s for p in (0.3, 0.5, 0.7, 1.0)]
    assert speeds == sorted(speeds, reverse=True)
    one = P.project(shape, device, 0.5, batch=1, context=0)
    # batch 1, no KV cache: bytes per step are the active weights
    assert one.bytes_per_step == pytest.approx(one.active_params * 2)
    assert one.bandwidth_tokens_per_s == pytest.approx(3350e9 / (one.active_params * 2))
    assert one.compute_tokens_per_s == pytest.approx(989e12 / (2 * one.active_params))
    assert one.bound == "memory bandwidth"


def test_a_large_batch_touches_every_expert_and_loses_the_bandwidth_saving():
    shape, device = P.MODEL_PRESETS["Llama-3.1-8B"], P.DEVICE_PRESETS["NVIDIA A100 SXM 80GB"]
    assert P.expected_experts_touched(1, 8) == pytest.approx(1.0)
    assert P.expected_experts_touched(64, 8) == pytest.approx(8.0, rel=1e-3)
    big = P.project(shape, device, 0.5, batch=64)
    assert big.bytes_per_step == pytest.approx(big.dense_bytes_per_step, rel=1e-3)


def test_packed_layout_stores_e_times_p_of_the_mlp():
    shape, device = P.MODEL_PRESETS["Mistral-7B-v0.3"], P.DEVICE_PRESETS["NVIDIA L4 24GB"]
    one_copy = P.project(shape, device, 0.5, layout="indexed", experts=8)
    packed = P.project(shape, device, 0.5, layout="packed", experts=8)
    mlp_bytes = shape.layers * shape.mlp_per_layer * 2
    assert packed.weight_bytes - one_copy.weight_bytes == pytest.approx(3 * mlp_bytes)  # 8 x 0.5 = 4 copies
    assert "needs" in P.fits(packed.weight_bytes, 0, device) and "fits" in P.fits(1e9, 0, device)


def test_prices_of_zero_and_no_speed_do_not_divide_by_zero():
    assert P.usd_per_million_tokens(1000, 0.0) == 0.0
    assert P.usd_per_million_tokens(0.0, 2.0) is None and P.usd_per_million_tokens(float("inf"), 2.0) is None
    free = P.with_overrides(P.DEVICE_PRESETS["NVIDIA H100 SXM 80GB"], price_per_hour=0.0, tflops=0.0)
    table = P.projection_table(P.MODEL_PRESETS["SmolLM2-135M"], free, 0.5, (1, 8, 8), "indexed", 8, 2.0, 512, 0.0)
    assert len(table) == 4 and set(table["batch"]) == {1, 8}  # duplicate batch sizes once
    with pytest.raises(ValueError, match="budget"):
        P.project(P.MODEL_PRESETS["SmolLM2-135M"], free, 0.0)


def test_quality_reference_shows_measured_points_and_the_published_series_only():
    measured = pd.DataFrame({"budget": [0.3, 0.5], "ratio": [4.0, 2.0]})
    fig = P.quality_reference_figure(measured, "ToMoE on m")
    published = next(t for t in fig.data if t.name.startswith("published"))
    assert list(published.x) == [0.5, 0.6, 0.7]
    assert list(published.customdata) == [8.36, 7.17, 6.41]
    assert [t.name for t in fig.data][0] == "measured here: ToMoE on m"
    assert len(P.quality_reference_figure(pd.DataFrame(columns=["budget", "ratio"]), "none").data) == 2


# -- cost-card helpers (analysis.speed_cards, analysis.card_format) ---------------------------------------------------------
def test_curve_value_is_dense_measured_interpolated_or_a_labelled_estimate():
    pts = [(0.3, 15.0), (0.5, 13.0), (0.7, 12.0)]
    assert speed_cards.curve_value(pts, 10.0, 1.0).status == "dense" and speed_cards.curve_value(pts, 10.0, 1.0).value == 10
    assert speed_cards.curve_value(pts, 10.0, 0.5).status == "measured"
    mid = speed_cards.curve_value(pts, 10.0, 0.6)
    assert mid.status == "interpolated" and mid.value == pytest.approx(12.5)
    high = speed_cards.curve_value(pts, 10.0, 0.85)
    assert high.status == "estimate" and high.value == pytest.approx(11.0) and "dense" in high.how
    low = speed_cards.curve_value(pts, 10.0, 0.1)
    assert low.status == "estimate" and low.value == pytest.approx(17.0) and "outside the measured range" in low.how
    assert speed_cards.curve_value([], 10.0, 0.5).status == "missing"
    assert speed_cards.curve_value([(0.5, 13.0)], None, 0.3).status == "missing"


def test_metric_deltas_are_green_only_for_savings():
    assert card_format.metric_delta(0.85, 1.0, lower_is_better=False) == {"delta": "-15% vs dense", "delta_color": "normal"}
    assert card_format.metric_delta(1.17, 1.0, lower_is_better=True) == {"delta": "+17% vs dense", "delta_color": "inverse"}
    assert card_format.metric_delta(1.001, 1.0, lower_is_better=True) == {"delta": "same as dense", "delta_color": "off",
                                                                        "delta_arrow": "off"}
    assert card_format.metric_delta(1.0, 0.0, lower_is_better=True)["delta"] is None
    assert card_format.metric_delta(None, 1.0, lower_is_better=True)["delta"] is None


def _bench(with_lwa: bool) -> dict:
    extra = (lambda v: {"last_word_accuracy": v}) if with_lwa else (lambda v: {})
    rows = [{"budget": b, "method": "tomoe", "kind": "tomoe", "label": "ToMoE", "conversion": "c",
             "active_mlp_ratio": b, "perplexity": ppl, "kl_to_dense": 1.0, "top1_agreement": 0.5, **extra(b / 2)}
            for b, ppl in ((0.3, 60.0), (0.5, 40.0))]
    rows += [{"budget": 0.5, "method": "magnitude", "kind": "baseline", "label": "magnitude", "conversion": None,
              "active_mlp_ratio": 0.5, "perplexity": 5000.0, "kl_to_dense": 6.0, "top1_agreement": 0.05}]
    return {"kind": "quality-benchmark", "model": "m", "text": "t", "window": 8, "windows": 2,
            "dense": {"perplexity": 20.0, "kl_to_dense": 0.0, "top1_agreement": 1.0, **extra(0.4)}, "rows": rows}


@pytest.mark.parametrize("with_lwa", [True, False])
def test_last_word_accuracy_is_shown_where_measured_and_optional(with_lwa):
    cost = tradeoff.CostModel("m", attention=100, mlp_dense=1000, lm_head=50, other=5, embeddings=50, score_flops=0,
                              context=8)
    points = tradeoff.quality_points({"q.json": _bench(with_lwa)}, {"m": cost})
    s = points["eval_set"].iloc[0]
    q = tradeoff.quality_at_budget(points, s, 0.4)
    assert q.status == "interpolated"
    assert (q.last_word_accuracy == pytest.approx(0.2)) if with_lwa else q.last_word_accuracy is None
    dense = tradeoff.quality_at_budget(points, s, 1.0)
    assert dense.status == "dense" and dense.perplexity == 20.0 and dense.kl_to_dense == 0.0
    nearest = tradeoff.quality_at_budget(points, s, 0.8)
    assert nearest.status == "nearest" and nearest.budget == 0.5 and "outside the measured range" in nearest.label
    fig = tradeoff_figure.pareto_figure(points, s)
    hover = next(t for t in fig.data if t.name == "ToMoE (one conversion per budget)").hovertext[0]
    assert ("last-word accuracy" in hover) == with_lwa and "x dense" in hover
    assert tradeoff_figure.catastrophic_methods(points, 20.0) == ["magnitude"]
    assert "Magnitude (static pruning)" not in {t.name for t in fig.data}
    shown = tradeoff_figure.pareto_figure(points, s, show_catastrophic=True)
    mag = next(t for t in shown.data if t.name == "Magnitude (static pruning)")
    assert max(mag.y) == tradeoff_figure.CLIP_RATIO  # 250x dense sits on the clipped axis' edge


def test_pareto_front_treats_near_equal_active_params_as_equal():
    df = pd.DataFrame({"active_params": [100.0, 100.05, 120.0], "perplexity": [80.0, 20.0, 10.0]})
    assert tradeoff_figure.pareto_front(df)["perplexity"].tolist() == [80.0, 20.0, 10.0]
    assert tradeoff_figure.pareto_front(df, x_tol=0.005)["perplexity"].tolist() == [20.0, 10.0]


def test_memory_figures_shown_together_share_one_unit():
    """The memory card said "1.01 GiB" while its tooltip gave dense as "1,012 MiB"."""
    unit = card_format.memory_unit(1034.0, 1012.0)
    assert unit == "GiB" and card_format.format_mb(1012.0, unit) == "0.99 GiB"
    assert card_format.format_mb(1034.0, unit) == "1.01 GiB"
    assert card_format.memory_unit(900.0, None, float("nan")) == "MiB" and card_format.format_mb(900.0) == "900 MiB"
    assert card_format.format_mb(None, unit) == "—"


def test_a_model_that_needs_two_devices_is_projected_on_two():
    """A 70B model in bf16 needs two 80 GB devices: speed and price are those of the pair, not of one."""
    shape, h100 = projection.MODEL_PRESETS["Llama-3.1-70B"], projection.DEVICE_PRESETS["NVIDIA H100 SXM 80GB"]
    one_device = projection.project(shape, h100, 0.5, 8, "indexed", 8, 2.0, 2048)
    count = projection.devices_needed(one_device.dense_weight_bytes, one_device.kv_cache_bytes, h100)
    assert count == 2
    pair = projection.device_group(h100, count)
    assert (pair.bandwidth_gb_s, pair.price_per_hour, pair.memory_gb) == (2 * 3350, 5.0, 160)
    on_pair = projection.project(shape, pair, 0.5, 8, "indexed", 8, 2.0, 2048)
    assert on_pair.bandwidth_tokens_per_s == pytest.approx(2 * one_device.bandwidth_tokens_per_s)
    assert "fits in 160 GB" in projection.fits(on_pair.dense_weight_bytes, on_pair.kv_cache_bytes, pair)
    assert projection.device_group(h100, 1) is h100
    assert projection.devices_needed(1e9, 0, h100) == 1


def test_card_prices_fit_a_card_and_keep_their_exact_value_in_words():
    from analysis.card_format import format_usd

    assert format_usd(14842.73) == "$14.8k"
    assert format_usd(2_350_000) == "$2.35M"
    assert format_usd(999.5) == "$999.50" and format_usd(0.4451) == "$0.445" and format_usd(None) == "—"
    assert all(len(format_usd(x)) <= 8 for x in (0.001234, 1.5, 999.99, 1234.5, 98765.4, 1.2e7, 3.4e10))


def test_hardware_preset_names_fit_the_hardware_box():
    from analysis import projection

    assert all(len(name) <= 24 for name in projection.DEVICE_PRESETS)
    assert set(projection.DEVICE_NOTES) <= set(projection.DEVICE_PRESETS)


def test_published_points_have_their_own_axis_not_the_mlp_budget():
    """The paper reports the share of all parameters active; our p is the share of MLP weights: two axes."""
    import pandas as pd

    from analysis import projection as P

    fig = P.quality_reference_figure(pd.DataFrame({"budget": [0.5, 0.7], "ratio": [2.4, 1.6]}), "ToMoE on m")
    by_name = {t.name: t for t in fig.data}
    published = next(t for name, t in by_name.items() if name.startswith("published"))
    measured = next(t for name, t in by_name.items() if name.startswith("measured"))
    assert published.xaxis == "x2" and measured.xaxis in (None, "x")
    assert "MLP budget p" in fig.layout.xaxis.title.text
    assert "share of all parameters" in fig.layout.xaxis2.title.text
    assert fig.layout.xaxis2.overlaying == "x" and list(fig.layout.xaxis.range) == list(fig.layout.xaxis2.range)


def test_batch_card_says_why_it_is_the_same_as_dense():
    from analysis import projection as P

    shape, device = P.MODEL_PRESETS["Llama-3.1-8B"], P.DEVICE_PRESETS["NVIDIA H100 SXM 80GB"]
    many = P.project(shape, device, 0.5, batch=8, layout="indexed", experts=8)
    note = P.batch_explanation(many, 8, "indexed")
    assert note.startswith("same as dense because at batch 8 the tokens choose 5.3 of 8 experts")
    assert "reads 100% of the MLP weights" in note and "capped at the one copy" in note
    one = P.project(shape, device, 0.5, batch=1, layout="indexed", experts=8)
    assert P.batch_explanation(one, 8, "indexed").startswith("bandwidth-bound: at batch 1 the tokens choose 1.0 of 8")
