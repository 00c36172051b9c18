"""`tomoe_core.infra.jobs`: the background jobs the studio starts (progress, exit status, cancel, threads)."""
from __future__ import annotations

import time


def test_job_runner_progress_exit_status_and_cancel(monkeypatch, tmp_path):
    from tomoe_core.infra import jobs

    monkeypatch.setenv("TOMOE_CACHE", str(tmp_path))
    log = tmp_path / "log.jsonl"
    script = ("import json, time\n"
              f"for i in range(1, 200):\n    open({str(log)!r}, 'a').write(json.dumps({{'step': i}}) + '\\n')\n"
              "    time.sleep(0.05)\n")
    job = jobs.start_job("convert", jobs.python_argv("-c", script), "t", progress_log=log, total=199)
    for _ in range(100):
        if (jobs.progress(job)[0] or 0) >= 2:
            break
        time.sleep(0.05)
    assert jobs.status(job) == "running" and jobs.progress(job)[0] >= 2
    jobs.cancel(job)
    time.sleep(0.3)
    assert jobs.status(jobs.get_job(job.id)) == "cancelled"
    failing = jobs.start_job("trace", jobs.python_argv("-c", "print('3/10'); raise SystemExit(3)"), "f")
    for _ in range(100):
        if jobs.status(failing) != "running":
            break
        time.sleep(0.05)
    assert jobs.status(failing) == "failed" and jobs.exit_code(failing) == 3
    assert jobs.progress(failing)[:2] == (3, 10)
    assert [j.id for j in jobs.list_jobs()] == [failing.id, job.id]


def test_background_jobs_run_with_one_torch_thread_and_passive_waits(monkeypatch, tmp_path):
    """A job must leave the studio process a core: torch in the job sees one thread."""
    from tomoe_core.infra import jobs

    monkeypatch.setenv("TOMOE_CACHE", str(tmp_path))
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the studio's own setting does not leak into its jobs
    code = ("import os, torch; print('threads', torch.get_num_threads(), os.environ['OMP_WAIT_POLICY'], "
            "os.environ['MKL_NUM_THREADS'])")
    job = jobs.start_job("trace", jobs.python_argv("-c", code), "threads")
    for _ in range(600):
        if jobs.status(job) != "running":
            break
        time.sleep(0.1)
    assert jobs.status(job) == "finished", jobs.log_tail(job)
    assert "threads 1 PASSIVE 1" in jobs.log_tail(job)
    gpu = jobs.start_job("trace", jobs.python_argv("-c", "import os; print('omp', os.environ['OMP_NUM_THREADS'])"),
                         "override", env={"OMP_NUM_THREADS": "4"})
    for _ in range(100):
        if jobs.status(gpu) != "running":
            break
        time.sleep(0.1)
    assert "omp 4" in jobs.log_tail(gpu)  # a caller that wants more threads says so
