"""Two studio sessions (two tabs) and a terminal write into the same cache at the same moment.

Each session is its own process doing what the Runs page does on a click: `jobs.start_job` of a
trace into run id `same` and of a conversion into folder `same-conv`. A third process runs the
trace command straight from a shell, outside the job registry. The registry's lock lets one
session start each job and refuses the other with a message; the run's file lock makes the
terminal's trace and the studio's trace write one after the other, the second told the run
exists. A reader polls the run folder all along: it sees no run, or a complete run whose every
file matches its checksum, never anything in between.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from routing_fixtures import TEXTS, converted  # noqa: F401
from tomoe_core.trace.routing_log import RoutingLogError, list_runs, read_run_meta, verify_run

ROOT = Path(__file__).resolve().parent.parent
SESSION = r"""
import sys, time
from pathlib import Path
from tomoe_core.infra import jobs
folder, conversion, text, cache = map(Path, sys.argv[1:5])
trace_argv = jobs.python_argv("-m", "tomoe_core", "trace", str(conversion), "--text", str(text), "--run-id", "same",
                              "--seq-len", "16", "--quiet")
convert_argv = jobs.python_argv("-c", "import time; time.sleep(4)")  # stands in for a conversion: only the start races
(folder / f"ready-{sys.argv[5]}").touch()
while not (folder / "go").exists():
    time.sleep(0.001)
for kind, argv, output in (("trace", trace_argv, cache / "routing" / "run_id=same"),
                           ("convert", convert_argv, cache / "conversions" / "same-conv")):
    try:
        job = jobs.start_job(kind, argv, label=f"{kind} same", output=output)
        print(kind, "started", job.id)
    except jobs.JobError as err:
        print(kind, "refused", err)
"""


def test_two_sessions_and_a_terminal_write_the_same_run(converted, tmp_path):
    from tomoe_core.infra import jobs

    cache, sync = tmp_path / "cache", tmp_path / "sync"
    cache.mkdir()
    sync.mkdir()
    text = tmp_path / "docs.txt"
    text.write_text("\n\n".join(TEXTS * 4))
    env = {**os.environ, "TOMOE_CACHE": str(cache), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    sessions = [subprocess.Popen([sys.executable, "-c", SESSION, str(sync), str(converted), str(text), str(cache),
                                  str(i)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for i in range(2)]
    terminal = subprocess.Popen([sys.executable, "-m", "tomoe_core", "trace", str(converted), "--text", str(text),
                                 "--run-id", "same", "--seq-len", "16", "--quiet"], env=env, cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = cache / "routing" / "run_id=same"
    seen, problems, stop = {"none": 0, "complete": 0}, [], threading.Event()

    def reader():  # polls from before the clicks until both traces are over
        while not stop.is_set():
            if not run.exists():
                seen["none"] += 1
            else:
                try:
                    verify_run(run)  # every file present and matching its sha256 in run.json
                    seen["complete"] += 1
                except RoutingLogError as err:
                    problems.append(f"a reader saw a half-written run: {err}")
                except FileNotFoundError as err:  # pragma: no cover - would also be a half-visible run
                    problems.append(f"a reader saw a run without its files: {err}")
            time.sleep(0.02)

    polling = threading.Thread(target=reader, daemon=True)
    polling.start()
    deadline = time.time() + 300
    while len(list(sync.glob("ready-*"))) < 2 and time.time() < deadline:
        time.sleep(0.01)
    (sync / "go").touch()  # both sessions click at the same moment
    said = [s.communicate(timeout=300) for s in sessions]
    assert all(s.returncode == 0 for s in sessions), said
    lines = [line for out, _ in said for line in out.splitlines()]
    for kind in ("trace", "convert"):
        assert sum(line.startswith(f"{kind} started") for line in lines) == 1, lines
        refused = [line for line in lines if line.startswith(f"{kind} refused")]
        assert len(refused) == 1 and "is already running" in refused[0] and "choose another name" in refused[0]

    os.environ["TOMOE_CACHE"] = str(cache)
    try:
        job = next(j for j in jobs.list_jobs() if j.kind == "trace")
        deadline = time.time() + 300
        while (terminal.poll() is None or jobs.status(job) == "running") and time.time() < deadline:
            time.sleep(0.05)
        stop.set()
        polling.join(timeout=10)
        assert not problems, problems
        out, err = terminal.communicate(timeout=120)
        verify_run(run)
        meta = read_run_meta(run)
        assert meta["rows"] == meta["tokens"] * meta["num_layers"] > 0
        # one of the two wrote the run; the other waited for the lock and was told it exists
        results = {"terminal": (terminal.returncode, err), "job": (jobs.exit_code(job), jobs.log_tail(job))}
        assert sorted(rc for rc, _ in results.values()) == [0, 2], results
        loser = next(msg for rc, msg in results.values() if rc == 2)
        assert "routing run 'same' exists" in loser and "choose another run id or overwrite it" in loser
        assert not [p for p in run.parent.iterdir() if p.name.startswith(".") and p.is_dir()], "temporary folder left"
        print(f"reader polls: {seen}")
        assert seen["complete"] + seen["none"] > 0
    finally:
        os.environ.pop("TOMOE_CACHE", None)
        for j in jobs.list_jobs() if cache.exists() else []:
            jobs.cancel(j)
