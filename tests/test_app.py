"""Studio page tests with Streamlit's AppTest: every page renders without exceptions, its widgets exist,
the budget slider moves the KPIs. The analysis behind the pages is tested in test_tradeoff.py and
test_catalog.py, the job runner in test_jobs.py.

All pages run against a small cache/ (tests/studio_fixture.py) selected with TOMOE_CACHE (`cache_env`,
conftest.py).
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
APP = str(ROOT / "app" / "main.py")
pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

import studio_fixture  # noqa: E402
from analysis import catalog  # noqa: E402


def run_page(page: str | None = None, timeout: float = 120) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=timeout).run()
    if page:
        at.switch_page(f"pages/{page}.py").run()
    assert not at.exception, [e.message for e in at.exception]
    return at


def metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


# -- settings --------------------------------------------------------------------------------------
def test_root_streamlit_config_is_the_one_in_force():
    link = ROOT / ".streamlit" / "config.toml"
    assert link.resolve() == (ROOT / "streamlit_config.toml").resolve()
    out = subprocess.run([sys.executable, "-m", "streamlit", "config", "show"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, check=True).stdout
    assert 'primaryColor = "#4338ca"' in out
    assert "gatherUsageStats = false" in out


# -- pages -----------------------------------------------------------------------------------------
def test_budget_explorer_slider_moves_every_cost_kpi(cache_env):
    at = run_page()
    assert at.title.values[0] == "Budget explorer"
    slider = at.slider(key="budget")
    assert slider.value == 0.5  # opens at the conversion's budget
    before = metrics(at)
    assert before["Perplexity"] == "40.00"
    assert before["Last-word accuracy"] == "25.0%"  # the benchmark's last_word_accuracy, where it has one
    assert len(at.get("plotly_chart")) == 3  # the Pareto chart, quality at equal speed, the projection's quality chart
    slider.set_value(0.7).run()
    assert not at.exception
    after = metrics(at)
    for label in ("Active params", "FLOPs / token", "Tokens/s", "$/M tokens", "Memory"):
        assert before[label] != after[label], label
    assert after["Perplexity"] == "30.00"  # the p = 0.7 result
    slider.set_value(0.6).run()
    assert "interpolated" in " ".join(at.caption.values)
    assert 30.0 < float(metrics(at)["Perplexity (interpolated)"]) < 40.0


def test_speed_card_quotes_one_statistic_and_says_within_noise(cache_env):
    """The Tokens/s card's delta and its tooltip quote the same figure, the file's paired median ratio
    (1.15x here), not the ratio of the two medians (120 / 100 = 1.2x); overlapping IQRs of neighbouring
    budgets are called within noise; the setting names the CPU model."""
    at = run_page()
    card = next(m for m in at.metric if m.label == "Tokens/s")
    assert at.selectbox(key="layout").value == "indexed"
    assert card.proto.delta == "+15% vs dense"
    assert "median 1.15x, IQR 1.10-1.20x" in card.proto.help
    assert "within noise of p = 0.7" in card.proto.help
    assert "Fixture CPU 9000" in card.proto.help
    assert any("within noise of p = 0.7" in c for c in at.caption.values)
    prefill = next(m for m in at.metric if m.label == "Prefill tokens/s")  # from the same file and layout
    assert prefill.value == "1,200" and prefill.proto.delta == "+18% vs dense"
    assert "median 1.18x, IQR 1.16-1.20x" in prefill.proto.help and "batch 1" in prefill.proto.help
    at.slider(key="budget").set_value(0.6).run()  # interpolated: no paired median exists there
    card = next(m for m in at.metric if m.label.startswith("Tokens/s"))
    assert "median" not in card.proto.help and card.proto.delta == "+15% vs dense"  # 115 / 100
    assert any(m.label == "Prefill tokens/s (interpolated)" for m in at.metric)


@pytest.fixture()
def conditioned_cache(cache_env, tmp_path, monkeypatch) -> Path:
    """A copy of the studio cache whose conversion says it is budget-conditioned (0.3-1.0)."""
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(cache_env, cache)
    monkeypatch.setenv("TOMOE_CACHE", str(cache))
    meta_path = cache / "conversions" / studio_fixture.CONVERSION / "tomoe.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "budget_range": [0.3, 1.0], "budget_source": "conditioned"}))
    return cache


def test_budget_explorer_offers_the_conditioned_conversion_and_reports_a_failed_materialisation(conditioned_cache):
    at = run_page()
    assert any("budget-conditioned" in i.value and "[0.3, 1]" in i.value for i in at.info), [i.value for i in at.info]
    button = next(b for b in at.button if b.label.startswith("Materialise"))
    button.click().run()
    assert not at.exception, [e.message for e in at.exception]
    # the fixture keeps no hypernetwork: the user is told what is missing, not shown a traceback
    assert any("hypernet.safetensors" in e.value for e in at.error), [e.value for e in at.error]


def test_measure_this_machine_starts_the_speed_benchmark_as_a_job(conditioned_cache, monkeypatch):
    from tomoe_core.infra import jobs

    started = []
    monkeypatch.setattr(jobs, "start_job", lambda kind, argv, label, output=None, **kw: started.append(
        (kind, argv, label, output)))
    at = run_page()
    next(b for b in at.button if b.label == "Measure speed").click().run()
    assert not at.exception, [e.message for e in at.exception]
    (kind, argv, label, output), = started
    assert kind == "speed" and argv[1:3] == ["-m", "benchmarks.speed"]
    assert argv[argv.index("--conversions") + 1] == studio_fixture.CONVERSION  # the conditioned one: every budget
    assert Path(output) == conditioned_cache / "results" / "speed_benchmark.json" and "this machine" in label


def test_budget_explorer_says_when_the_experts_were_generated_below_the_budget(conditioned_cache, monkeypatch):
    import tomoe_core.workflows.rebudget

    seen = []

    def fake_materialise_at(path, budget, **kwargs):  # the engine's result, without a hypernetwork to run
        seen.append(budget)
        acc = {"mlp_active_ratio": budget, "active_total": 80e6}
        return None, {"budget_source": "conditioned", "accounting": acc,
                      "mask_calibration": {"generated_at": round(budget - 0.1, 4), "ratio": budget}}, 1.5

    monkeypatch.setattr(tomoe_core.workflows.rebudget, "materialise_at", fake_materialise_at)
    at = run_page()
    at.slider(key="budget").set_value(0.8).run()
    next(b for b in at.button if b.label.startswith("Materialise")).click().run()
    assert not at.exception, [e.message for e in at.exception]
    assert seen == [0.8]
    text = " ".join(x.value for x in at.success)
    assert "generated for p = 0.7 and widened to 0.8" in text and "MLP active ratio 0.8000" in text, text


def test_budget_explorer_chooses_among_conditioned_conversions_and_skips_rebudgeted_copies(conditioned_cache):
    import shutil

    cache = conditioned_cache
    src = cache / "conversions" / studio_fixture.CONVERSION
    for name, extra in (("second-cond", {}), ("cond-at-p0.37", {"derived_from": str(src), "budget": 0.37})):
        shutil.copytree(src, cache / "conversions" / name)
        m = json.loads((cache / "conversions" / name / "tomoe.json").read_text())
        (cache / "conversions" / name / "tomoe.json").write_text(json.dumps({**m, **extra}))
    at = run_page()
    assert not at.exception, [e.message for e in at.exception]
    box = at.selectbox(key="conditioned_conversion")
    assert sorted(box.options) == sorted([studio_fixture.CONVERSION, "second-cond"])  # the copy is not offered
    box.set_value("second-cond").run()
    assert any("**second-cond** is budget-conditioned" in i.value for i in at.info)
    assert any(b.label.startswith("Materialise second-cond") for b in at.button)


def test_budget_explorer_price_changes_cost_and_a_zero_price_is_a_message(cache_env):
    at = run_page()
    before = metrics(at)["$/M tokens"]
    at.number_input(key="price_per_hour").set_value(10.0).run()
    assert metrics(at)["$/M tokens"] != before
    at.number_input(key="price_per_hour").set_value(0.0).run()
    assert not at.exception, [e.message for e in at.exception]
    assert metrics(at)["$/M tokens"] == "—"
    assert any("price per hour is 0" in i.value for i in at.info), [i.value for i in at.info]
    assert metrics(at)["Tokens/s"] == "120"  # every card after it still renders


def test_budget_explorer_reads_one_speed_file_at_the_chosen_layout(cache_env):
    at = run_page()
    assert at.selectbox(key="layout").options == ["indexed", "packed"]  # the layouts the file measured
    assert at.selectbox(key="batch").options == ["1", "8"]
    shown = metrics(at)
    assert shown["Tokens/s"] == "120" and shown["Memory"] == "950 MiB"  # indexed at p = 0.5, batch 1
    assert shown["$/M tokens"] == "$0.231"  # $0.10/h / (120 tokens/s x 3600) x 1e6
    at.selectbox(key="layout").set_value("packed").run()
    shown = metrics(at)
    assert shown["Tokens/s"] == "130" and shown["Memory"] == "1.17 GiB"  # the faster layout shows its memory
    assert any(m.label == "Memory" and m.proto.delta.startswith("+33%") for m in at.metric)
    at.slider(key="budget").set_value(0.6).run()
    assert metrics(at)["Tokens/s (interpolated)"] == "122"  # halfway between 130 and 115
    assert "interpolated between measured p = 0.5 and 0.7" in " ".join(at.caption.values)
    at.slider(key="budget").set_value(0.2).run()
    shown = metrics(at)
    assert "Tokens/s (estimate)" in shown and "Memory (estimate)" in shown  # never 0.5's value as 0.2's
    assert "outside the measured range" in " ".join(at.caption.values)
    at.slider(key="budget").set_value(1.0).run()
    shown = metrics(at)
    assert shown["Tokens/s (dense)"] == "100" and shown["Memory (dense)"] == "900 MiB"
    assert shown["Perplexity (dense)"] == "26.60"  # dense, not the nearest conversion
    at.selectbox(key="batch").set_value("8").run()
    assert metrics(at)["Tokens/s (dense)"] == "400"


def test_corrupt_result_file_is_reported_not_raised(cache_env):
    at = run_page()
    assert any("could not be used" in e.label for e in at.expander)
    assert any("eval-corrupt.json" in w.value for w in at.warning)


def test_empty_cache_tells_the_user_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("TOMOE_CACHE", str(tmp_path))
    monkeypatch.setenv("TOMOE_SHIPPED", str(tmp_path / "none"))  # nothing shipped either: no recipe, no log
    for page in (None, "compare", "experts", "runs"):
        at = run_page(page)
        if page in (None, "compare", "experts"):
            assert at.info, page


def test_compare_generates_side_by_side_and_colours_by_expert(cache_env):
    at = run_page("compare")
    assert at.selectbox(key="conversion").value == studio_fixture.CONVERSION
    assert at.text_area(key="prompt") and at.slider(key="max_new_tokens")
    at.slider(key="max_new_tokens").set_value(8)
    at.button[0].click().run()
    assert not at.exception and not at.error
    shown = metrics(at)
    assert set(shown) >= {"First divergence", "Tokens that differ, by position", "Mean KL to dense"}
    html = [h.proto.body for h in at.get("html")]
    assert any("expert" in h and "KL to dense" in h for h in html)
    at.slider(key="compare_layer").set_value(0).run()
    assert not at.exception and "(layer 0)" in "".join(h.proto.body for h in at.get("html"))


def test_compare_empty_prompt_is_a_message(cache_env):
    at = run_page("compare")
    at.text_area(key="prompt").input("   ")
    at.button[0].click().run()
    assert not at.exception
    assert any("prompt is empty" in e.value for e in at.error)


def test_compare_empty_prompt_keeps_the_last_result_and_loads_nothing(cache_env, monkeypatch):
    from app import ui

    at = run_page("compare")
    at.slider(key="max_new_tokens").set_value(4)
    at.button[0].click().run()
    assert "First divergence" in metrics(at)
    monkeypatch.setattr(ui, "dense_model", lambda *a, **k: pytest.fail("an empty prompt loads no model"))
    at.text_area(key="prompt").input("  ")
    at.button[0].click().run()
    assert not at.exception and any("prompt is empty" in e.value for e in at.error)
    assert "First divergence" in metrics(at)  # the last result is still on the page


def test_compare_model_that_fails_to_load_is_a_message(cache_env, monkeypatch):
    from app import ui

    def broken(path, digest):
        raise RuntimeError("Error(s) in loading state_dict for ToMoEForCausalLM:\n    Missing key(s)")

    monkeypatch.setattr(ui, "converted_model", broken)
    at = run_page("compare")
    at.button[0].click().run()
    assert not at.exception
    assert any("Missing key" not in e.value and "RuntimeError" in e.value for e in at.error)


def test_runs_page_lists_conversions_logs_and_runs_a_cancellable_job(cache_env):
    from tomoe_core.infra import jobs

    at = run_page("runs")
    assert {"Background jobs", "Start a conversion", "Conversions", "Routing logs"} <= set(at.subheader.values)
    assert at.get("download_button")
    assert studio_fixture.CONVERSION in at.get("dataframe")[0].value["name"].tolist()
    model_box = [t for t in at.text_input if t.label == "Dense model"][0]
    model_box.input(str(cache_env / "models" / "tiny-dense"))
    [n for n in at.number_input if n.label == "Steps"][0].set_value(3)
    [t for t in at.text_input if t.label == "Output name"][0].input("app-test-conversion")
    [b for b in at.button if b.label == "Start conversion"][0].click().run()
    assert not at.exception and not at.error
    job = next(j for j in jobs.list_jobs() if j.label == "app-test-conversion")
    try:
        assert jobs.status(job) == "running"
        assert any("app-test-conversion" in m.value for m in at.markdown)
        cancel = [b for b in at.button if b.label == "Cancel"]
        cancel[0].click().run()
        assert not at.exception
        for _ in range(50):
            if jobs.status(jobs.get_job(job.id)) != "running":
                break
            time.sleep(0.1)
        assert jobs.status(jobs.get_job(job.id)) == "cancelled"
    finally:
        jobs.cancel(job)
        jobs.forget(jobs.get_job(job.id))


def test_runs_page_trace_estimate_and_run_id_rule(cache_env):
    """The trace box proposes a size that takes about a minute, shows the estimate as the size
    changes, and refuses a run id that is not a plain name (no job starts)."""
    from tomoe_core.infra import jobs

    at = run_page("runs")
    estimate = [c for c in at.caption.values if c.startswith("About ")]
    assert estimate and "tokens/s" in estimate[0]
    seconds = float(estimate[0].split()[1])
    assert 40 <= seconds <= 60  # from the fixture's own trace: its tiny model is fast, so many tokens
    at.number_input(key="trace_max_tokens").set_value(5_000_000).run()
    assert any(c.startswith("About ") and "min for 5,000,000 tokens" in c for c in at.caption.values)
    before = {j.id for j in jobs.list_jobs()}
    at.text_input(key="trace_run_id").input("..")
    [b for b in at.button if b.label == "Start trace"][0].click().run()
    assert not at.exception
    assert any("Run id '..' is not a plain name" in e.value for e in at.error)
    assert {j.id for j in jobs.list_jobs()} == before
    at.run()  # a rerun, as when a background job finishes and refreshes the page: the reason stays
    assert any("Run id '..' is not a plain name" in e.value for e in at.error)
    at.text_input(key="trace_run_id").input("fine-name")
    [b for b in at.button if b.label == "Start trace"][0].click().run()  # the next attempt replaces it
    assert not any("is not a plain name" in e.value for e in at.error)
    for job in jobs.list_jobs():
        if job.id not in before:
            jobs.cancel(job)


def test_experts_page_tags_then_shows_roles_and_drills_down(cache_env):
    at = run_page("experts")
    assert at.selectbox(key="experts_run").value == "tiny-prompts"
    assert {"Expert load", "Experts by part of speech", "Top tokens of an expert",
            "A document, token by token"} <= set(at.subheader.values)
    if at.button and at.button[0].label.startswith("Tag the text"):
        at.button[0].click().run()
        assert not at.exception and not at.error
    charts = {c.proto.id: c for c in at.get("plotly_chart")}
    assert len(charts) == 7  # load, lift, NMI, contextual NMI, clustering map, choice of k, token strip
    assert "layers have an NMI above" in " ".join(at.caption.values)
    assert {"Contextual NMI, median", "Explained by word identity"} <= set(metrics(at))
    assert all(m.proto.help for m in at.metric)  # a "?" on every metric
    at.radio(key="cluster_baseline").set_value("token").run()
    assert not at.exception
    at.selectbox(key="cluster_k").set_value(2).run()
    assert not at.exception and any("chosen by the user" in c for c in at.caption.values)
    before = at.dataframe[-1].value
    at.number_input(key="drill_expert").set_value(1).run()
    assert not at.exception
    assert not at.dataframe[-1].value.equals(before)
    at.selectbox(key="strip_doc").set_value(3).run()
    assert not at.exception


def test_experts_page_reports_a_corrupt_log(cache_env, tmp_path, monkeypatch):
    import shutil

    from tomoe_core.trace import routing_log

    root = tmp_path / "routing"
    shutil.copytree(cache_env / "routing" / "run_id=tiny-prompts", root / "run_id=broken")
    part = next((root / "run_id=broken").glob("part-*.parquet"))
    part.write_bytes(part.read_bytes()[:100])  # truncated
    monkeypatch.setattr(routing_log, "routing_root", lambda: root)
    at = run_page("experts")
    assert at.error and "cannot be read" in at.error[0].value


def test_experts_page_gold_conllu_run_against_spacy(cache_env, tmp_path, monkeypatch):
    """A run traced on a CoNLL-U file: the page reads its gold tags into the log, and once spaCy has
    tagged it too, shows their agreement, NMI for both and NMI(expert; deprel)."""
    from tomoe_core.trace import routing_log
    from tomoe_core.trace import run as trace

    root = tmp_path / "routing"
    trace.trace_run(cache_env / "conversions" / studio_fixture.CONVERSION,
                    source=str(ROOT / "tests" / "data" / "en_sample.conllu"), seq_len=64, run_id="gold", root=root)
    monkeypatch.setattr(routing_log, "routing_root", lambda: root)
    at = run_page("experts")
    assert at.selectbox(key="experts_run").value == "gold"
    assert at.radio(key="experts_tags").options == ["gold UPOS", "gold XPOS", "gold deprel"]  # before spaCy
    [b for b in at.button if b.label.startswith("Tag the text")][0].click().run()
    assert not at.exception and not at.error
    shown = metrics(at)
    assert float(shown["spaCy = gold UPOS"].rstrip("%")) > 85
    assert int(shown["Tokens tagged by both"]) > 100
    spacy_nmi, gold_nmi = (float(v) for v in shown["NMI spaCy / gold UPOS"].split(" / "))
    assert 0 < spacy_nmi <= 1 and 0 < gold_nmi <= 1 and 0 < float(shown["NMI gold deprel"]) <= 1
    assert all(m.proto.help for m in at.metric)
    assert any("spaCy vs gold" in c.proto.spec for c in at.get("plotly_chart"))  # NMI per layer of both
    at.radio(key="experts_tags").set_value("gold deprel").run()
    assert not at.exception and any(m.label == "NMI, median" and "NMI(expert; gold deprel)" in m.proto.help
                                    for m in at.metric)  # the card names the tags it measured


def test_experts_page_single_valued_tag_column_and_named_tag_axes(cache_env, tmp_path, monkeypatch):
    """A treebank whose deprel is 'dep' everywhere: a message instead of 'nan %' and a false 'too few
    to cluster'; the XPOS heatmap is titled and labelled XPOS, not POS."""
    from tomoe_core.trace import routing_log
    from tomoe_core.trace import run as trace

    lines = []
    for line in (ROOT / "tests" / "data" / "en_sample.conllu").read_text().splitlines():
        cols = line.split("\t")
        if len(cols) == 10 and cols[0].isdigit():
            cols[7] = "dep"
        lines.append("\t".join(cols))
    flat = tmp_path / "flat.conllu"
    flat.write_text("\n".join(lines) + "\n")
    root = tmp_path / "routing"
    trace.trace_run(cache_env / "conversions" / studio_fixture.CONVERSION, source=str(flat), seq_len=64,
                    run_id="flat", root=root)
    monkeypatch.setattr(routing_log, "routing_root", lambda: root)
    at = run_page("experts")
    at.radio(key="experts_tags").set_value("gold deprel").run()
    assert not at.exception
    assert any("gold deprel has a single value in this log ('dep'" in i.value for i in at.info)
    assert not any("nan" in str(m.value) for m in at.metric)
    assert not any("too few to cluster" in i.value for i in at.info)
    at.radio(key="experts_tags").set_value("gold XPOS").run()
    assert not at.exception
    lift = [c for c in at.get("plotly_chart") if "lift" in c.proto.spec][0]
    spec = json.loads(lift.proto.spec)
    assert spec["layout"]["title"]["text"].startswith("Expert x gold XPOS lift")
    assert spec["layout"]["xaxis"]["title"]["text"] == "gold XPOS"


def test_lift_heatmap_pools_rare_tags_beyond_the_most_frequent():
    import pandas as pd

    from analysis import routing_figures as figs

    tags = [f"T{i:02d}" for i in range(30)]
    counts = pd.DataFrame({"layer": 0, "expert": [i % 3 for i in range(30)], "pos": tags,
                           "tokens": list(range(100, 70, -1))})
    fig = figs.lift_heatmap(counts, layer=0, max_tags=10)
    columns = list(fig.data[-1].x)
    assert len(columns) == 10 and columns[-1] == "other (21 tags)" and "T00" in columns and "T29" not in columns
    assert figs.top_tags(counts, 10)["tokens"].sum() == counts["tokens"].sum()


def test_runs_page_conversion_job_runs_to_completion_with_progress(cache_env, tmp_path, monkeypatch):
    """Start a (tiny) conversion from the form; the page shows step progress and, when it ends,
    lists the new conversion."""
    from tomoe_core.infra import jobs

    monkeypatch.setenv("TOMOE_DATA", str(tmp_path))  # the studio reads text only from the cache and data folders
    text = tmp_path / "calibration.txt"
    text.write_text("\n\n".join(studio_fixture.PROMPTS * 8))
    at = run_page("runs")
    [t for t in at.text_input if t.label == "Dense model"][0].input(str(cache_env / "models" / "tiny-dense"))
    [n for n in at.number_input if n.label == "Steps"][0].set_value(2)
    [n for n in at.number_input if n.label == "Experts per layer"][0].set_value(4)
    [t for t in at.text_input if t.label == "Calibration text"][0].input(str(text))
    [t for t in at.text_input if t.label == "Output name"][0].input("app-finished")
    [t for t in at.text_input if t.label == "Extra convert options"][0].input(
        "--tokens-per-step 256 --seq-len 128 --checkpoint-every 1")
    [b for b in at.button if b.label == "Start conversion"][0].click().run()
    job = next(j for j in jobs.list_jobs() if j.label == "app-finished")
    try:
        seen_progress = set()
        for _ in range(120):
            time.sleep(1)
            at.run()
            assert not at.exception
            seen_progress |= {p.proto.text for p in at.get("progress")}
            if jobs.status(job) != "running":
                break
        at.run()
        assert jobs.status(job) == "finished", jobs.log_tail(job)
        assert any("/ 2 steps" in t for t in seen_progress), seen_progress
        assert "app-finished" in at.get("dataframe")[0].value["name"].tolist()
    finally:
        import shutil

        jobs.cancel(job)
        jobs.forget(jobs.get_job(job.id))
        for name in ("app-finished", "app-finished.work"):  # later tests expect the fixture's conversions only
            shutil.rmtree(cache_env / "conversions" / name, ignore_errors=True)


def test_every_page_renders(cache_env):
    for page in (None, "compare", "experts", "runs"):
        at = run_page(page)
        assert at.title, page
