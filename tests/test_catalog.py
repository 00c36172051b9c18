"""`analysis.catalog`: what the studio finds in the cache (conversions, results, what is broken)."""
from __future__ import annotations

from pathlib import Path

from analysis import catalog


def test_catalog_cache_root_matches_the_engine(monkeypatch, tmp_path):
    from tomoe_core.infra.locations import cache_dir, shipped_dir

    assert catalog.cache_root() == cache_dir() and catalog.shipped_root() == shipped_dir()
    monkeypatch.setenv("TOMOE_CACHE", str(tmp_path))
    assert catalog.cache_root() == cache_dir() == tmp_path


def test_catalog_reports_broken_conversions(tmp_path):
    (tmp_path / "conversions" / "half").mkdir(parents=True)
    (tmp_path / "conversions" / "half" / "tomoe.json").write_text("{not json")
    (tmp_path / "conversions" / "nometa").mkdir()
    (tmp_path / "conversions" / "nometa" / "x").write_text("")
    convs, problems = catalog.list_conversions(tmp_path / "conversions", tmp_path / "none")
    assert convs == [] and {Path(p.path).name for p in problems} == {"tomoe.json", "nometa"}
    for name, weights in (("noweights", None), ("sharded", "model.safetensors.index.json")):
        (tmp_path / "conversions" / name).mkdir()
        (tmp_path / "conversions" / name / "tomoe.json").write_text('{"budget": 0.5}')
        if weights:
            (tmp_path / "conversions" / name / weights).write_text("{}")
    convs, problems = catalog.list_conversions(tmp_path / "conversions", tmp_path / "none")
    assert [c.name for c in convs] == ["sharded"]  # save_pretrained's sharded folders are complete
    assert "noweights" in {Path(p.path).name for p in problems}


def test_catalog_says_how_each_conversion_reached_its_budget():
    def source(**meta):
        return catalog.Conversion(Path("c"), {"budget": 0.5, **meta}).summary()["budget source"]

    assert source() == "trained"
    assert source(budget_source="trained", train_budget=0.4) == "trained at 0.4, widened to 0.5"
    assert source(budget_source="threshold-moved", train_budget=0.4) == "threshold-moved"
    assert source(budget_range=[0.3, 1.0], settings={"budget_sampling": "log"}) == "conditioned on 0.3..1 (log sampling)"


def test_catalog_reads_shipped_results_and_local_results_win(tmp_path):
    (tmp_path / "results").mkdir()
    (tmp_path / "shipped" / "results").mkdir(parents=True)
    (tmp_path / "shipped" / "results" / "speed_benchmark.json").write_text('{"kind": "speed", "rows": []}')
    (tmp_path / "shipped" / "results" / "quality_benchmark.json").write_text('{"kind": "quality-benchmark"}')
    (tmp_path / "results" / "quality_benchmark.json").write_text('{"kind": "quality-benchmark", "local": 1}')
    results, problems = catalog.list_results(tmp_path / "results", tmp_path / "shipped" / "results")
    assert not problems
    assert set(results) == {"quality_benchmark.json", "shipped/speed_benchmark.json"}
    assert results["quality_benchmark.json"]["local"] == 1
    convs, problems = catalog.list_conversions(tmp_path / "conversions", tmp_path / "shipped")
    assert convs == [] and problems == []  # shipped/results is not a conversion


def test_what_the_repository_ships_lists_cleanly(tmp_path):
    """A fresh clone: the shipped conversion, and no warning about the results or the routing log."""
    from tomoe_core.infra.locations import shipped_dir

    conversions, problems = catalog.list_conversions(tmp_path / "none", shipped_dir())
    assert problems == []
    assert [c.name for c in conversions] == ["smollm2-135m-any-budget"] and conversions[0].is_conditioned
