"""The benchmark commands run (dry mode, tiny model) and their outputs keep the documented schema."""
import json
import os

import pytest
import torch

import plotly.graph_objects as go

from benchmarks import gpu_speed, quality, speed
from tomoe_core.moe.layer import LAYOUTS


def test_speed_dry_run_measures_dense_and_every_layout(tmp_path, capsys):
    out = tmp_path / "speed.json"
    assert speed.main(["--dry-run", "--budgets", "0.5", "--threads", "1", "2", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["kind"] == "speed" and result["settings"]["dry_run"]
    assert result["settings"]["batch_sizes"] == [1, 8] and result["settings"]["threads"] == [1, 2]
    for threads in (1, 2):
        for batch in (1, 8):
            every = [r for r in result["rows"] if r["threads"] == threads and r["batch"] == batch]
            baselines = {r["method"]: r for r in every if r["method"] not in ("dense", "tomoe")}
            assert set(baselines) == {"teal", "wanda-sp", "flap"}  # timed in the same run, at the same budget
            assert baselines["wanda-sp"]["mlp_bytes_vs_dense"] == pytest.approx(0.5, abs=0.02)  # sliced: smaller
            assert "dense prompt pass" in baselines["teal"]["source"]
            assert all(r["decode_tokens_per_s"] > 0 and r["budget"] == 0.5 for r in baselines.values())
            rows = [r for r in every if r["method"] in ("dense", "tomoe")]
            assert [r["layout"] for r in rows] == [None, *LAYOUTS]
            dense = rows[0]
            assert dense["decode_speedup"] == 1.0 and dense["mlp_decode_vs_dense"] == 1.0
            assert dense["mlp_decode_vs_dense_iqr"] == [1.0, 1.0]
            for r in rows:
                assert r["decode_tokens_per_s"] > 0 and r["mlp_bytes"] > 0
                assert (r["prefill_tokens_per_s"] or 0) > 0 if batch == 1 else r["prefill_tokens_per_s"] is None
                q1, q3 = r["decode_speedup_iqr"]
                assert q1 <= r["decode_speedup"] <= q3
                assert len(r["loadavg"]) == result["settings"]["repeats"]
            for r in rows[1:]:
                assert r["same_tokens_as_shared"] is True  # float32: every layout decodes the same tokens
            if batch == 1:  # the ceiling: dense is its own bound; a budget-0.5 conversion reads about half
                assert dense["active_mlp_fraction"] == 1.0 and dense["prefill_bound"] == pytest.approx(1.0)
                # a ratio of two timings of this tiny model: positive, but under load it can pass 1
                assert dense["mlp_share_of_dense_prefill"] > 0
                for r in rows[1:]:
                    assert 0.2 < r["active_mlp_fraction"] < 0.8
                    assert r["prefill_bound"] == pytest.approx(speed.prefill_bound(
                        r["mlp_share_of_dense_prefill"], r["active_mlp_fraction"]))
            by_layout = {r["layout"]: r for r in rows}
            assert by_layout["packed"]["mlp_bytes"] > 2 * by_layout["indexed"]["mlp_bytes"]  # packed copies cost memory
            assert by_layout["indexed"]["mlp_bytes_vs_dense"] < 1.2  # one copy (+ index tables, heavy at hidden size 64)
            assert by_layout["indexed"]["gather_backend"] in ("cpu-c", "torch")
    c = result["contention"]
    assert len(c["loadavg_samples"]) == 1 + 2 * 2 * result["settings"]["repeats"] and isinstance(c["high"], bool)
    printed = capsys.readouterr().out
    assert "MLP dec ms" in printed and "threads 2, batch 8" in printed and "loadavg" in printed


def test_prefill_bound_is_amdahl_over_the_mlp_share():
    assert speed.prefill_bound(0.5, 0.5) == pytest.approx(1 / 0.75)
    assert speed.prefill_bound(0.6, 1.0) == pytest.approx(1.0)  # reading every weight saves nothing
    assert speed.prefill_bound(None, 0.5) is None


def test_active_mlp_fraction_is_the_mean_width_of_the_chosen_experts():
    import torch
    moe = speed.untrained_conversion(speed.tiny_dense(), 0.5, 4, torch.randint(3, 512, (2, 32)))
    ids = torch.randint(3, 512, (1, 24))
    mlps = speed.layer_mlps(moe)
    inter = [256] * len(mlps)  # tiny_dense's intermediate size
    for m in mlps:  # every token to expert 1: the fraction is expert 1's width
        m.routing_override = 1
    want = sum(m.expert_widths[1] for m in mlps) / sum(inter)
    assert speed.active_mlp_fraction(moe, ids, inter) == pytest.approx(want)


def test_gpu_script_dry_run_runs_on_cpu_in_bf16(tmp_path):
    out = tmp_path / "gpu.json"
    assert gpu_speed.main(["--dry-run", "--budgets", "0.5", "--output", str(out)], defaults=gpu_speed.GPU_DEFAULTS) == 0
    result = json.loads(out.read_text())
    assert result["dtype"] == "bfloat16" and result["settings"]["batch_sizes"] == [1, 16]
    assert {r["batch"] for r in result["rows"]} == {1, 16}


def fake_quality_result() -> dict:
    rows = []
    for budget in (0.3, 0.5):
        for method, kind, ppl in (("tomoe", "tomoe", 40 / budget), ("magnitude", "baseline", 900 / budget),
                                  ("flap", "baseline", 60 / budget), ("torch-pruning", "external-baseline", 901 / budget)):
            rows.append({"budget": budget, "method": method, "kind": kind, "label": method,
                         "conversion": "conv" if kind == "tomoe" else None, "conversion_digest": None,
                         "active_mlp_ratio": budget, "perplexity": ppl, "kl_to_dense": ppl / 100,
                         "top1_agreement": 0.5, "seconds": 1.0})
    rows[0]["perplexity"] = 500.0  # ToMoE loses at 0.3 in this made-up table
    return {"kind": "quality-benchmark", "schema_version": 1, "model": "m", "text": "t", "window": 8, "windows": 2,
            "tokens": 14, "machine": {"platform": "p", "cpu_count": 2}, "settings": {"budgets": [0.3, 0.5]},
            "dense": {"perplexity": 20.0, "kl_to_dense": 0.0, "top1_agreement": 1.0}, "rows": rows}


def test_quality_comparison_names_the_best_baseline_and_the_winner():
    result = fake_quality_result()
    result["comparison"] = quality.compare(result["rows"])
    by_budget = {c["budget"]: c for c in result["comparison"]}
    assert by_budget[0.5]["best_baseline"] == "flap" and by_budget[0.5]["tomoe_wins"]
    assert by_budget[0.5]["perplexity_ratio"] == 60 / 40
    assert not by_budget[0.3]["tomoe_wins"]
    assert set(by_budget[0.3]["per_method"]) == {"magnitude", "flap", "torch-pruning"}
    table = quality.format_table(result)
    assert "ToMoE wins" in table and "ToMoE loses" in table


def test_conditioned_conversions_are_compared_with_dedicated_ones_at_shared_budgets():
    def row(method, conv, budget, ppl):
        return {"budget": budget, "method": method, "kind": "tomoe", "conversion": conv, "perplexity": ppl,
                "kl_to_dense": 1.0, "top1_agreement": 0.5, "active_mlp_ratio": budget, "label": conv}
    rows = [row("tomoe-conditioned", "cond", 0.4, 110.0), row("tomoe-conditioned", "cond", 0.5, 66.0),
            row("tomoe-conditioned", "cond", 0.6, 50.0), row("tomoe", "ded-0.4", 0.4, 100.0),
            row("tomoe", "ded-0.5", 0.5, 60.0), row("tomoe-random-routing", "ded-0.5", 0.5, 120.0)]
    gaps = quality.conditioned_vs_dedicated(rows)
    assert [(g["budget"], g["dedicated"]) for g in gaps] == [(0.4, "ded-0.4"), (0.5, "ded-0.5")]  # none at 0.6
    assert [round(g["perplexity_gap"], 6) for g in gaps] == [0.1, 0.1]
    result = fake_quality_result()
    result["conditioned_vs_dedicated"] = gaps
    assert "conditioned cond 66.00 vs dedicated ded-0.5 60.00: +10.0%" in quality.format_table(result)


def test_quality_figure_has_a_trace_per_method_and_panel():
    fig = quality.quality_figure(fake_quality_result())
    assert isinstance(fig, go.Figure)
    names = [t.name for t in fig.data]
    assert len(fig.data) == 8  # 4 methods x (perplexity, KL)
    assert "ToMoE (learned routing)" in names and "torch-pruning (external, group magnitude)" in names


def test_quality_reuse_keeps_rows_only_for_the_same_windows(tmp_path):
    old = fake_quality_result()
    old["settings"]["calibration_tokens"] = 1024
    path = tmp_path / "q.json"
    path.write_text(json.dumps(old))
    same = {k: old[k] for k in ("kind", "schema_version", "model", "text", "window", "windows", "tokens")}
    same["settings"] = {"calibration_tokens": 1024}
    rows = quality.reusable_rows(path, same)
    assert (0.5, "flap", None) in rows and len(rows) == len(old["rows"])
    assert quality.reusable_rows(path, {**same, "windows": 3}) == {}
    assert quality.reusable_rows(path, {**same, "settings": {"calibration_tokens": 2048}}) == {}
    assert quality.reusable_rows(tmp_path / "missing.json", same) == {}


def test_speed_times_the_named_conversions_not_the_newest(tmp_path, monkeypatch):
    root = tmp_path / "conversions"
    for name, budget in (("a-p0.5", 0.5), ("b-p0.5", 0.5), ("c-p0.3", 0.3)):
        (root / name).mkdir(parents=True)
        (root / name / "tomoe.json").write_text(json.dumps({"model": "m", "budget": budget}))
    monkeypatch.setattr(speed, "conversions_dir", lambda: root)
    monkeypatch.setattr(speed, "read_metadata", lambda folder: json.loads((folder / "tomoe.json").read_text()))
    os.utime(root / "a-p0.5", (2e9, 2e9))  # a is the newest p = 0.5 conversion
    assert speed.trained_conversions("m") == {0.5: root / "a-p0.5", 0.3: root / "c-p0.3"}
    assert speed.trained_conversions("m", ["b-p0.5"]) == {0.5: root / "b-p0.5"}
    with pytest.raises(SystemExit, match="no-such is not a converted ToMoE model"):
        speed.trained_conversions("m", ["no-such"])
    with pytest.raises(SystemExit, match="both at budget 0.5"):
        speed.trained_conversions("m", ["a-p0.5", "b-p0.5"])
    with pytest.raises(SystemExit, match="converted from 'm', not 'other'"):
        speed.trained_conversions("other", ["a-p0.5"])


def test_speed_times_a_budget_conditioned_conversion_inside_its_range(tmp_path):
    def folder(name, **meta):
        (tmp_path / name).mkdir()
        (tmp_path / name / "tomoe.json").write_text(json.dumps({"model": "m", "budget": 0.5, **meta}))
        return tmp_path / name
    single = folder("single")
    copy = folder("copy", budget_range=[0.3, 1.0], derived_from="any")  # a rebudgeted copy has no hypernetwork
    cond = folder("cond", budget_range=[0.4, 0.8])
    assert speed.conditioned_covering([single, copy, cond], 0.7) == cond
    assert speed.conditioned_covering([single, copy, cond], 0.3) is None
    assert speed.conditioned_covering([single], 0.5) is None


def test_teal_gather_kernel_computes_the_reference_teal_mlp():
    import torch

    from benchmarks.teal_speed import TealGatherMLP
    from tiny_models import tiny_model
    from tomoe_core.eval.baselines import DynamicSparsity
    from tomoe_core.convert.masked_model import MaskedModel

    torch.manual_seed(0)
    masked = MaskedModel(tiny_model("llama"), num_experts=1)
    reference = DynamicSparsity(masked, "teal", 0.5)
    reference.calibrate(torch.randint(3, masked.model.config.vocab_size, (2, 32)))
    x = torch.randn(3, 7, masked.mlps[0].weights.hidden_size)
    for ref in reference.mlps:
        kernel = TealGatherMLP(ref.weights, ref.thresholds)
        with torch.no_grad():
            assert torch.allclose(kernel(x), ref(x), atol=1e-5, rtol=1e-4)
            assert torch.allclose(kernel(x[:1, :1]), ref(x[:1, :1]), atol=1e-5, rtol=1e-4)  # one decode token


def test_quality_reuse_with_other_methods_keeps_the_earlier_baselines(tmp_path):
    old = fake_quality_result()
    reuse = {(r["budget"], r["method"], r.get("conversion_digest")): r for r in old["rows"]}
    kept = quality.other_baseline_rows(reuse, 0.5, ["teal-half-dense"])
    earlier = {r["method"] for r in old["rows"] if r["budget"] == 0.5 and r.get("conversion_digest") is None}
    assert earlier and {r["method"] for r in kept} == earlier  # nothing the file held is dropped
    assert quality.other_baseline_rows(reuse, 0.5, sorted(earlier)) == []  # requested ones are handled apart


@pytest.mark.parametrize("method", ["wanda-sp", "teal"])
def test_memory_probe_builds_a_baseline_and_reports_its_peak(tmp_path, method):
    """The speed file's peak memory covers the baselines too: a probe builds the method as the timed run
    does (dense MLPs dropped for a sliced one) and runs prefill + decode on it."""
    import studio_fixture
    from tomoe_core.convert.dense import load_tokenizer

    tokenizer = load_tokenizer()
    folder = tmp_path / "tiny-dense"
    studio_fixture._tiny_dense(len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    spec = {"folder": None, "budget": 0.5, "model": str(folder), "layout": "shared", "method": method,
            "device": "cpu", "dtype": "float32", "threads": 1, "batch": 2, "prefill_tokens": 32,
            "prompt_tokens": 8, "new_tokens": 4}
    out = speed.memory_probe(spec)
    assert out["peak_rss_bytes"] >= out["rss_before_bytes"] > 0
    assert speed.peak_fields(out, torch.device("cpu"))["peak_memory_mb"] == out["peak_rss_bytes"] / 2**20
