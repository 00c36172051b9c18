"""The Budget explorer's "Measure speed" action (of this machine): the speed benchmark as a background job."""
from __future__ import annotations

import streamlit as st

from analysis import catalog
from app import ui

OUTPUT = "speed_benchmark.json"  # the local file wins over the shipped one of the same name


def _speed_jobs(jobs) -> list:
    return [j for j in jobs.list_jobs() if j.kind == "speed" and jobs.status(j) == "running"]


def render(conversions: list[catalog.Conversion], model: str) -> None:
    """A button that starts `python -m benchmarks.speed` on the model's budget-conditioned conversion
    (else its conversions) with the shipped file's protocol, and its progress while it runs."""
    from tomoe_core.infra import jobs

    mine = [c for c in conversions if c.model == model and c.materialised]
    conditioned = [c for c in mine if c.is_conditioned]
    names = [conditioned[0].name] if conditioned else sorted({c.name for c in mine})[:3]
    running = _speed_jobs(jobs)
    if not running:
        disabled = not names
        if st.button("Measure speed", disabled=disabled,
                     help="Measures this machine: runs the speed benchmark here in the background (dense and every budget, interleaved "
                          "repeats, peak memory; 15-30 min on 2 cores, and it slows other jobs down). The cards "
                          "read its file when it ends." if names else
                          "No materialised conversion yet: open Compare once or convert one."):
            output = catalog.cache_root() / "results" / OUTPUT
            argv = jobs.python_argv("-m", "benchmarks.speed", "--model", model, "--conversions", *names,
                                    "--output", str(output))
            try:
                jobs.start_job("speed", argv, label=f"speed benchmark of this machine ({', '.join(names)})",
                               output=output)
            except jobs.JobError as err:
                st.error(str(err))
            st.rerun()
        return
    ui.job_progress(running[0].id, "Measuring this machine", "repeats")
