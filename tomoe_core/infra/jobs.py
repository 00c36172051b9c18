"""Background jobs (conversions, traces): detached subprocesses with a file registry under cache/jobs/.

A job is `cache/jobs/<id>.json` (kind, argv, pid, process start time, output, progress source)
plus `<id>.log` (stdout and stderr) and `<id>.rc` (exit status, written by a shell wrapper when
the command ends). The process runs in its own session, so it outlives the Streamlit script run
that started it, a page reload and a restart of the studio; `cancel` kills its whole process
group. Progress is read from files only: a JSON-lines training log (`{"step": ...}` per step,
`total` steps) or the last `done/total` counter a progress bar printed to the log.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import re
import signal
import subprocess
import sys
import threading
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..moe.atomic import atomic_write_json
from .workspace import file_lock
from .locations import REPO_ROOT, cache_dir


class JobError(ValueError):
    pass


@dataclass
class Job:
    id: str
    kind: str  # "convert" or "trace"
    label: str
    argv: list[str]
    pid: int
    started_ticks: int | None  # /proc start time: tells our process from a later one with the same pid
    started_at: str
    output: str | None = None  # folder the job produces
    progress_log: str | None = None  # JSON-lines file with a "step" per record
    total: int | None = None  # steps (or tokens) when known up front
    cancelled: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def log_path(self) -> Path:
        return jobs_dir() / f"{self.id}.log"

    @property
    def rc_path(self) -> Path:
        return jobs_dir() / f"{self.id}.rc"


# A background job leaves the studio a core: one torch/OpenMP thread, and threads that sleep rather than
# spin while they wait (two processes with two spinning threads each on two cores slowed Compare 3-20x).
# `start_job(env=...)` overrides these (a GPU box may want more).
JOB_THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
                  "OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false"}


def fair_thread_count(cpus: int | None = None, load: float | None = None, running_jobs: int | None = None) -> int:
    """Torch threads for interactive work (the studio's Compare, a trace it runs itself) beside other work.

    The CPUs that other processes leave free: the 1-minute load average, or the registered running
    jobs (one thread each) where the load average has not caught up with them yet; at least 1. On 2
    cores with one conversion running, 2 threads spin against it and a 30-token Compare took 19.4 s
    where 1 thread took 8.1 s (`python -m benchmarks.compare_latency`, docs/RESULTS.md).
    """
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    load = os.getloadavg()[0] if load is None else load
    if running_jobs is None:
        running_jobs = sum(1 for j in list_jobs() if is_running(j))
    return max(1, cpus - max(int(load + 0.5), running_jobs))


def jobs_dir() -> Path:
    return cache_dir() / "jobs"


def _proc_start_ticks(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
    if fields[0] == "Z":  # exited, not yet reaped: not running
        return None
    return int(fields[19])


def _reap(proc: subprocess.Popen) -> None:
    threading.Thread(target=proc.wait, daemon=True).start()  # no zombie while the studio lives


def start_job(kind: str, argv: list[str], label: str, output: str | Path | None = None,
              progress_log: str | Path | None = None, total: int | None = None, extra: dict | None = None,
              env: dict | None = None) -> Job:
    """Start `argv` in the background from the repository root; returns the registered job.

    Two studio sessions (two tabs, or two studios on one cache) may ask at the same moment for
    jobs that write the same `output`: the check and the registration happen under one lock,
    so exactly one starts and the other gets a JobError that says which job holds the output.
    """
    folder = jobs_dir()
    folder.mkdir(parents=True, exist_ok=True)
    with file_lock(folder / "registry"):
        if output is not None:
            busy = [j for j in list_jobs() if j.output and Path(j.output).resolve() == Path(output).resolve()
                    and is_running(j)]
            if busy:
                raise JobError(f"a {busy[0].kind} job writing `{Path(output).name}` is already running "
                               f"({busy[0].label}, started {busy[0].started_at}): wait for it to finish, cancel "
                               "it under Background jobs, or choose another name")
        return _start(kind, argv, label, output, progress_log, total, extra, env)


def _start(kind, argv, label, output, progress_log, total, extra, env) -> Job:
    folder = jobs_dir()
    job_id = f"{_dt.datetime.now(_dt.timezone.utc):%Y%m%dT%H%M%S}-{kind}-{uuid.uuid4().hex[:6]}"
    log_path = folder / f"{job_id}.log"
    rc_path = folder / f"{job_id}.rc"
    wrapper = '"$@"; echo $? > "$TOMOE_JOB_RC"'
    full_env = {**os.environ, **JOB_THREAD_ENV, **(env or {}), "TOMOE_JOB_RC": str(rc_path), "PYTHONUNBUFFERED": "1",
                "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(["/bin/sh", "-c", wrapper, "sh", *argv], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=REPO_ROOT, env=full_env, start_new_session=True)
    _reap(proc)
    job = Job(id=job_id, kind=kind, label=label, argv=list(argv), pid=proc.pid,
              started_ticks=_proc_start_ticks(proc.pid), started_at=_dt.datetime.now(_dt.timezone.utc).isoformat(
                  timespec="seconds"), output=str(output) if output else None,
              progress_log=str(progress_log) if progress_log else None, total=total, extra=extra or {})
    atomic_write_json(folder / f"{job_id}.json", asdict(job))
    return job


def python_argv(*args: str) -> list[str]:
    return [sys.executable, *args]


def list_jobs() -> list[Job]:
    """Every registered job, newest first; unreadable registry files are skipped."""
    folder = jobs_dir()
    jobs = []
    for path in sorted(folder.glob("*.json"), reverse=True) if folder.is_dir() else []:
        try:
            jobs.append(Job(**json.loads(path.read_text())))
        except (OSError, json.JSONDecodeError, TypeError):
            continue
    return jobs


def get_job(job_id: str) -> Job:
    path = jobs_dir() / f"{job_id}.json"
    try:
        return Job(**json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError, TypeError):
        raise JobError(f"job {job_id!r} is not registered under {jobs_dir()}") from None


def is_running(job: Job) -> bool:
    ticks = _proc_start_ticks(job.pid)
    return ticks is not None and (job.started_ticks is None or ticks == job.started_ticks)


def exit_code(job: Job) -> int | None:
    try:
        return int(job.rc_path.read_text().strip())
    except (OSError, ValueError):
        return None


def status(job: Job) -> str:
    """running, finished, failed, cancelled, or lost (the process ended without an exit status)."""
    if is_running(job):
        return "running"
    if job.cancelled:
        return "cancelled"
    rc = exit_code(job)
    if rc is None:
        return "lost"
    return "finished" if rc == 0 else "failed"


_COUNTER = re.compile(rb"(\d+)/(\d+)")


def progress(job: Job) -> tuple[int | None, int | None, dict | None]:
    """(done, total, last progress record) from the job's files; None where unknown."""
    if job.progress_log:
        last = _last_jsonl(Path(job.progress_log))
        if last is not None:
            return int(last.get("step", 0)), job.total, last
        return 0, job.total, None
    tail = log_tail(job, 4096).encode()
    counters = _COUNTER.findall(tail)
    if counters:
        done, total = counters[-1]
        return int(done), int(total), None
    return None, job.total, None


def _last_jsonl(path: Path) -> dict | None:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 8192))
            lines = fh.read().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # the line being written
        if isinstance(rec, dict):
            return rec
    return None


def log_tail(job: Job, max_bytes: int = 4000) -> str:
    """The end of the job's output; progress-bar carriage returns become line breaks."""
    try:
        with open(job.log_path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - max_bytes))
            data = fh.read()
    except OSError:
        return ""
    return data.decode("utf-8", errors="replace").replace("\r", "\n")


def cancel(job: Job, sig: int = signal.SIGTERM) -> None:
    """Stop the job's whole process group (the wrapper shell and everything the command started)."""
    if is_running(job):
        try:
            os.killpg(job.pid, sig)  # start_new_session: the process group id is the wrapper's pid
        except ProcessLookupError:
            pass
    job.cancelled = True
    atomic_write_json(jobs_dir() / f"{job.id}.json", asdict(job))


def forget(job: Job) -> None:
    """Remove a finished job from the registry (its output stays)."""
    if is_running(job):
        raise JobError(f"job {job.id} is still running: cancel it first")
    for path in (jobs_dir() / f"{job.id}.json", job.log_path, job.rc_path):
        path.unlink(missing_ok=True)
