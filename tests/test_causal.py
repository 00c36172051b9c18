"""Expert roles by intervention (analysis.causal, app.causal_panel): the ablation tables joined with
tags, cluster verdicts, roles across budgets, and the Experts page's ablation job and charts."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from routing_fixtures import annotated_run, converted, routing_cache, sibling_log, tokenizer, traced_run  # noqa: F401
from analysis import causal


@pytest.fixture(scope="module")
def ablated_run(annotated_run, converted):
    from tomoe_core.convert.materialise import load_converted
    from tomoe_core.trace.ablation import plan_ablation, run_ablation

    model, _, _ = load_converted(converted, layout="prefill", load_tokenizer=False)
    run_ablation(model, plan_ablation(annotated_run))
    return annotated_run


def test_ablation_by_tag_means_intervals_and_grey_cells(ablated_run):
    rows = pd.concat(pq.read_table(p).to_pandas() for p in sorted((ablated_run / "ablation").glob("part-*.parquet")))
    table = causal.ablation_by_tag(ablated_run, 0, min_tokens=3)
    assert set(table.columns) == {"expert", "tag", "tokens", "mean", "low", "high"}
    assert table.tokens.sum() > 0
    few = table[table.tokens < 3]
    assert few["mean"].isna().all()
    enough = table[table.tokens >= 3]
    assert len(enough) and (enough["low"] <= enough["mean"]).all() and (enough["mean"] <= enough["high"]).all()
    routed = rows[(rows.layer == 0) & rows.routed & (rows.replacement == "second") & rows.delta_loss.notna()]
    # every routed token with a tag is counted once, in its expert's row
    assert table.tokens.sum() <= len(routed)
    everyone = causal.ablation_by_tag(ablated_run, 0, scope="all", min_tokens=3)
    assert everyone.tokens.sum() > table.tokens.sum()
    with pytest.raises(ValueError, match="scope"):
        causal.ablation_by_tag(ablated_run, 0, scope="some")


def test_bootstrap_interval_covers_the_mean_and_narrows_with_tokens():
    rng = np.random.default_rng(0)
    small = causal.bootstrap_mean(rng.normal(1.0, 1.0, 20))
    large = causal.bootstrap_mean(rng.normal(1.0, 1.0, 2000))
    assert small[1] < small[0] < small[2] and large[1] < 1.0 < large[2]
    assert large[2] - large[1] < small[2] - small[1]


def test_cluster_verdict_says_holds_only_when_the_named_tag_suffers_more(ablated_run):
    rows = causal._rows(ablated_run, "a.replacement = 'second' AND a.delta_loss IS NOT NULL AND t.tag IS NOT NULL",
                        [])
    by_tag = rows[(rows.layer == 0) & (rows.expert == 0)].groupby("tag").delta_loss.mean().sort_values()
    worst, best = by_tag.index[-1], by_tag.index[0]
    experts = pd.DataFrame({"layer": [0, 0], "expert": [0, 0], "cluster_name": [worst, best]})
    verdicts = causal.cluster_verdicts(ablated_run, experts).set_index("cluster_name")
    assert verdicts.loc[worst, "diff"] > 0 > verdicts.loc[best, "diff"]
    assert not verdicts.loc[best, "holds"]
    assert "the name holds causally" not in verdicts.loc[best, "sentence"]
    assert f"of {best} tokens by" in verdicts.loc[best, "sentence"] and "interval over tokens" in verdicts.loc[best, "sentence"]
    mixed = causal.cluster_verdicts(ablated_run, experts.assign(cluster_name="mixed"))
    assert mixed.empty  # no tag named, no claim to test


def test_needed_tokens_and_layer_table(ablated_run):
    needed = causal.needed_tokens(ablated_run, 1, 0)
    assert list(needed.columns) == ["token", "count", "mean_increase", "total_increase"]
    assert needed.total_increase.is_monotonic_decreasing
    table = causal.layer_table(ablated_run)
    assert list(table.layer) == [0, 1]
    assert table.loc[1, "others_second"] == pytest.approx(0, abs=1e-6)  # the last layer reaches no other token


def test_budget_siblings_and_agreement(annotated_run, tmp_path):
    from tomoe_core.trace.routing_log import list_runs

    same = sibling_log(annotated_run, tmp_path, 0.7, "same")
    moved = sibling_log(annotated_run, tmp_path, 0.3, "moved", shuffle=0.5)
    other_text = sibling_log(annotated_run, tmp_path, 0.9, "other")
    meta = json.loads((other_text / "run.json").read_text())
    meta["tokens"] += 1
    (other_text / "run.json").write_text(json.dumps(meta))
    runs = list_runs(annotated_run.parent) + list_runs(tmp_path)
    siblings = causal.budget_siblings(annotated_run, runs)
    assert sorted(siblings) == [0.3, 0.5, 0.7]  # the log with another token count is not a sibling
    table = causal.budget_agreement(siblings, reference=0.5)
    same_rows, moved_rows = table[table.budget == 0.7], table[table.budget == 0.3]
    assert np.allclose(same_rows.ari, 1) and np.allclose(same_rows.same_expert, 1)
    assert (moved_rows.ari < 0.9).all() and (moved_rows.same_expert < 0.7).all()
    assert same_rows.profile_cosine.dropna().gt(0.999).all()
    with pytest.raises(ValueError, match="two budgets"):
        causal.budget_agreement({0.5: siblings[0.5]})
    assert moved.exists() and same.exists()


def test_conversion_family_strips_the_rebudget_suffix():
    assert causal.conversion_family({"conversion": "/x/smollm2-135m-any-budget-at-p0.3"}) == "smollm2-135m-any-budget"
    assert causal.conversion_family({"conversion": "/x/my-at-pony"}) == "my-at-pony"


# -- the Experts page ------------------------------------------------------------------------------
def _experts_page(root: Path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    from tomoe_core.trace import routing_log

    monkeypatch.setattr(routing_log, "routing_root", lambda: root)
    at = AppTest.from_file(str(Path(__file__).parents[1] / "app" / "main.py"), default_timeout=400).run()
    at.switch_page("pages/experts.py").run()
    assert not at.exception, [e.message for e in at.exception]
    assert at.selectbox(key="experts_run").value == "tiny-prompts"
    return at


def _run_ablation_job(at, effect: str):
    """Click the form's button, wait for the job (its label names the effect), rerun the same session (its
    widget state carries over, as in a browser)."""
    from tomoe_core.infra import jobs

    [b for b in at.button if b.label == "Run expert ablation"][0].click().run()
    assert not at.exception, [e.message for e in at.exception]
    job = next(j for j in jobs.list_jobs() if j.kind == "ablate" and effect in j.label)
    if jobs.status(job) == "running" and effect == "direct effect":  # it ran while the page was drawn
        assert "Expert ablation" in " ".join(p.proto.text for p in at.get("progress"))
        assert any(c.startswith("Total (exact) effect:") for c in at.caption.values)  # the finished one stays
        assert not any(b.label == "Run expert ablation" for b in at.button)  # one ablation job per log at a time
    deadline = time.time() + 240
    while jobs.status(job) == "running" and time.time() < deadline:
        time.sleep(1)
    assert jobs.status(job) == "finished", jobs.log_tail(job)
    return at.run()


def test_experts_page_runs_an_ablation_job_then_shows_the_heatmap(tmp_path, monkeypatch):
    import studio_fixture
    from analysis.syntax import annotate_run

    own = tmp_path / "cache"  # its own cache and job registry: nothing another test left there
    studio_fixture.build(own)
    studio_fixture.use_studio_cache(own, monkeypatch, tmp_path)
    root = tmp_path / "routing"
    shutil.copytree(own / "routing" / "run_id=tiny-prompts", root / "run_id=tiny-prompts")
    annotate_run(root / "run_id=tiny-prompts")
    at = _experts_page(root, monkeypatch)
    assert "Which tokens need each expert (ablation)" in at.subheader.values
    assert any(w.key == "ablate_layers" for w in at.text_input), (
        [i.value for i in at.info], [e.value for e in at.error], [c for c in at.caption.values][-6:],
        [w.key for w in at.text_input], [p.proto.text for p in at.get("progress")])
    at.text_input(key="ablate_layers").set_value("7").run()
    assert any("Cannot ablate: layer 7 does not exist" in e.value for e in at.error)
    at.text_input(key="ablate_layers").set_value("1").run()
    at.number_input(key="ablate_tokens_total").set_value(128).run()
    assert any("Cost: 128 tokens x 1 layers x 4 experts" in c for c in at.caption.values)
    at = _run_ablation_job(at, "total effect")
    at.slider(key="experts_layer").set_value(1).run()
    assert not at.exception
    keys = {c.proto.id for c in at.get("plotly_chart")}
    assert len(at.get("plotly_chart")) == 9  # the 7 of the page + the lift heatmap beside the ablation heatmap
    assert "Do the cluster names hold causally?" in " ".join(at.markdown.values)
    at.radio(key="ablate_replacement").set_value("random").run()
    at.radio(key="ablate_scope").set_value("all").run()
    assert not at.exception and keys
    at.slider(key="experts_layer").set_value(0).run()  # a layer that was not ablated
    assert any("Layer 0 was not ablated" in i.value for i in at.info)

    # the fast direct effect, from the form under "Run another ablation"
    assert at.radio(key="ablate_effect").value == "direct"
    at.text_input(key="ablate_layers").set_value("1").run()
    at.number_input(key="ablate_tokens_direct").set_value(128).run()
    assert any("Cost: 128 tokens x 1 layers x 2 replacement(s)" in c and "direct effect" in c for c in at.caption.values)
    at = _run_ablation_job(at, "direct effect")
    at.slider(key="experts_layer").set_value(1).run()
    at.radio(key="ablate_view_effect").set_value("direct").run()
    assert not at.exception, [e.message for e in at.exception]
    assert at.radio(key="ablate_scope").options == ["its tokens"]  # the direct effect touches routed tokens only
    assert any("Against the exact total effect" in c for c in at.caption.values)
    assert len(at.get("plotly_chart")) == 9


def test_experts_page_compares_routing_across_budgets(cache_env, tmp_path, monkeypatch):
    from analysis.syntax import annotate_run

    root = tmp_path / "routing"
    run = root / "run_id=tiny-prompts"
    shutil.copytree(cache_env / "routing" / "run_id=tiny-prompts", run)
    annotate_run(run)
    at = _experts_page(root, monkeypatch)
    assert any("Trace the same text at other budgets" in c for c in at.caption.values)
    sibling_log(run, root, 0.3, "tiny-prompts-p0.3", shuffle=0.3)
    at = _experts_page(root, monkeypatch)
    assert "Roles across budgets" in at.subheader.values
    assert any("Against p = 0.5" in c for c in at.caption.values)


def test_compare_steering_forces_one_expert_beside_dense_and_normal(cache_env):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(Path(__file__).parents[1] / "app" / "main.py"), default_timeout=180).run()
    at.switch_page("pages/compare.py").run()
    at.slider(key="max_new_tokens").set_value(8)
    at.checkbox(key="steer").check()
    at.number_input(key="steer_layer").set_value(1)
    at.number_input(key="steer_expert").set_value(3)
    at.button[0].click().run()
    assert not at.exception and not at.error
    text = " ".join(at.markdown.values)
    assert "**Dense**" in text and "ToMoE with expert 3 forced in layer 1" in text and "normal routing" in text
    html = [h.proto.body for h in at.get("html")]
    assert len([h for h in html if "KL to dense" in h]) >= 2  # the normal and the steered continuation


def test_causal_report_command_prints_tables_and_writes_json(ablated_run, tmp_path, capsys):
    from analysis import causal_report

    out = tmp_path / "report.json"
    assert causal_report.main([str(ablated_run), "--min-tokens", "1", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| layer | routed_second |" in printed and "\n| 0 | " in printed  # layers print as integers
    report = json.loads(out.read_text())
    assert [r["layer"] for r in report["layers"]] == [0, 1]
    assert set(report["verdicts"]) == {"second, delta_loss", "second, kl", "random, delta_loss", "random, kl"}


def test_direct_effect_reads_like_the_total_one_and_the_report_compares_them(ablated_run, converted, tmp_path, capsys):
    from analysis import causal_report
    from tomoe_core.convert.materialise import load_converted
    from tomoe_core.trace.ablation import plan_ablation, run_ablation

    model, _, _ = load_converted(converted, layout="prefill", load_tokenizer=False)
    run_ablation(model, plan_ablation(ablated_run, effect="direct"))
    direct = causal.ablation_by_tag(ablated_run, 1, effect="direct", min_tokens=1)
    total = causal.ablation_by_tag(ablated_run, 1, min_tokens=1)
    # the last layer: the same tokens, the same values (nothing later carries a change to other tokens)
    assert direct[["expert", "tag", "tokens"]].equals(total[["expert", "tag", "tokens"]])
    assert (direct["mean"] - total["mean"]).abs().max() < 1e-4
    assert causal.ablation_by_tag(ablated_run, 1, effect="direct", scope="all", min_tokens=1).tokens.sum() == \
        direct.tokens.sum()  # only routed tokens are written for the direct effect
    agreement = causal.effect_agreement(ablated_run)
    assert agreement["r_by_layer"][1] > 0.999 and agreement["tokens"] > 0
    assert -1 <= agreement["r_tokens"] <= 1 and 0 <= agreement["same_sign_expert_means"] <= 1
    out = tmp_path / "report.json"
    assert causal_report.main([str(ablated_run), "--min-tokens", "1", "--output", str(out)]) == 0
    assert "Direct against total (second" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["direct"]["ablation"]["effect"] == "direct" and "second" in report["direct"]["agreement"]
    with pytest.raises(ValueError, match="unknown effect"):
        causal.ablation_by_tag(ablated_run, 1, effect="partial")


def test_causal_report_refuses_a_run_without_ablation(annotated_run, tmp_path, capsys):
    from analysis import causal_report

    bare = sibling_log(annotated_run, tmp_path, 0.5, "bare")
    assert causal_report.main([str(bare)]) == 2
    assert "has no expert ablation" in capsys.readouterr().err


def test_cluster_verdict_resamples_experts_when_it_has_enough_and_reads_kl(ablated_run):
    pairs = [(l, e) for l in (0, 1) for e in range(4)]
    experts = pd.DataFrame({"layer": [l for l, _ in pairs], "expert": [e for _, e in pairs], "cluster_name": "NOUN"})
    loss = causal.cluster_verdicts(ablated_run, experts).iloc[0]
    kl = causal.cluster_verdicts(ablated_run, experts, metric="kl").iloc[0]
    assert loss["over"] == "experts" and loss["experts"] == 8
    assert loss["low"] <= loss["diff"] <= loss["high"]
    assert kl["named"] >= 0 and kl["others"] >= 0 and "KL to the unablated model" in kl["sentence"]
    with pytest.raises(ValueError, match="metric"):
        causal.cluster_verdicts(ablated_run, experts, metric="accuracy")


def test_retagging_a_log_keeps_its_ablation(ablated_run):
    from analysis.syntax import annotate_run
    from tomoe_core.trace.ablation import has_ablation

    before = sorted(p.name for p in (ablated_run / "ablation").iterdir())
    annotate_run(ablated_run, overwrite=True)  # rebuilds the run folder with fresh tag columns
    assert has_ablation(ablated_run)
    assert sorted(p.name for p in (ablated_run / "ablation").iterdir()) == before
