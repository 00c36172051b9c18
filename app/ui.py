"""Streamlit glue shared by the pages: cached reads, cached models, persistent choices, messages.

Only Streamlit-specific code lives here; the logic is in `analysis/` and `tomoe_core/`.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import streamlit as st

from analysis import catalog


# -- choices that survive page switches ----------------------------------------------------------
def keep(key: str, default):
    """Make a widget key persist across pages: Streamlit drops the state of widgets that a run does
    not render, so the value is shadowed under another key and restored when the widget's is gone.

    The widget's own key is written only then: writing it on every run (the old way) sends the run's
    value back to the browser, and a slider moved by arrow keys while the page reran jumped back,
    losing or doubling presses."""
    shadow = f"kept::{key}"
    if key in st.session_state:
        st.session_state[shadow] = st.session_state[key]
    else:
        st.session_state[key] = st.session_state.get(shadow, default)
    return st.session_state[key]


# -- files (cached, invalidated when the files change) --------------------------------------------
def _signature(*folders: Path) -> tuple:
    sig = []
    for folder in folders:
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob("*/tomoe.json")) + sorted(folder.glob("*.json")):
            with contextlib.suppress(OSError):
                st_ = path.stat()
                sig.append((str(path), st_.st_mtime_ns, st_.st_size))
    return tuple(sig)


@st.cache_data(show_spinner=False, max_entries=4)
def _catalog(signature: tuple, cache_root: str) -> catalog.Catalog:
    return catalog.read_catalog()


def read_catalog() -> catalog.Catalog:
    root = catalog.cache_root()
    sig = _signature(root / "conversions", catalog.shipped_root(), root / "results", catalog.shipped_root() / "results")
    return _catalog(sig, str(root))


def show_problems(problems) -> None:
    if problems:
        with st.expander(f":warning: {len(problems)} file(s) could not be used", expanded=False):
            for p in problems:
                st.warning(f"`{p.path}` {p.message}")


# -- models (loaded once per process) -----------------------------------------------------------
@st.cache_resource(show_spinner=False, max_entries=2)
def dense_model(name: str):
    from tomoe_core.convert.dense import load_dense
    return load_dense(name, log=lambda *a: None)


@st.cache_resource(show_spinner=False, max_entries=2)
def converted_model(path: str, digest: str):
    """`digest` (weights sha256 from tomoe.json) makes a rebuilt conversion load afresh."""
    from tomoe_core.convert.materialise import load_converted
    model, tokenizer, meta = load_converted(path, load_tokenizer=True)
    return model, tokenizer, meta


@st.cache_resource(show_spinner=False, max_entries=3)
def model_at_budget(path: str, budget: float, digest: str):
    """A budget-conditioned conversion materialised at `budget` (seconds): (model, metadata, seconds)."""
    from tomoe_core.workflows.rebudget import materialise_at
    return materialise_at(Path(path), budget, layout="memory", log=lambda *a: None)


def conditioned_model(conv: catalog.Conversion, budget: float):
    """`model_at_budget` for a catalog conversion, cached under what makes the model: its weights or
    hypernetwork and its anchor gaps (recalibrated gaps make another model)."""
    import json

    digest = conv.meta.get("weights_sha256") or conv.meta.get("hypernet_sha256")
    return model_at_budget(str(conv.path), round(float(budget), 4),
                           f"{digest}:{json.dumps(conv.meta.get('anchor_gaps'), sort_keys=True)}")


@st.cache_resource(show_spinner=False)
def prepare_shipped_in_background(recipes: tuple[str, ...]) -> str:
    """Once per studio process: rebuild shipped recipes into cache/conversions as a background job
    (listed on the Runs page), so Compare and tracing find a ready model. A tiny launcher process
    registers the job: importing the engine here would cost the landing page seconds."""
    import subprocess
    import sys

    code = ("from tomoe_core.infra import jobs; jobs.start_job('prepare', jobs.python_argv('-c', "
            "'from tomoe_core.workflows.shipping import ensure_shipped_conversions; ensure_shipped_conversions()'), "
            f"label='rebuild shipped conversions ({', '.join(recipes)})')")
    subprocess.Popen([sys.executable, "-c", code], cwd=catalog.REPO_ROOT, start_new_session=True,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     env={**os.environ, "PYTHONPATH": str(catalog.REPO_ROOT)})
    return "started"


def materialise_shipped(log) -> list[Path]:
    """Rebuild shipped recipes into cache/conversions (seconds, once the dense model is cached)."""
    from tomoe_core.workflows.shipping import ensure_shipped_conversions
    return ensure_shipped_conversions(log=log)


@contextlib.contextmanager
def fair_threads():
    """Run the block with the torch threads other work leaves free (`tomoe_core.infra.jobs.fair_thread_count`)."""
    import torch

    from tomoe_core.infra import jobs

    before = torch.get_num_threads()
    torch.set_num_threads(jobs.fair_thread_count())
    try:
        yield
    finally:
        torch.set_num_threads(before)


def user_error_types() -> tuple[type[BaseException], ...]:
    """Errors a user can cause (bad input, missing or corrupt files): shown as messages."""
    return (ValueError, FileNotFoundError, OSError, KeyError)


@st.fragment(run_every=3)
def job_progress(job_id: str, what: str, unit: str = "") -> None:
    """A running background job's progress bar (`done / total` from its output); reruns the whole page
    when the job ends, so that what it wrote shows."""
    from tomoe_core.infra import jobs

    job = jobs.get_job(job_id)
    if jobs.status(job) != "running":
        st.rerun(scope="app")
    done, total, _ = jobs.progress(job)
    st.progress(min(1.0, done / total) if done and total else 0.0,
                text=f"{what}: {done or 0}/{total or '?'}{' ' + unit if unit else ''} (details on the Runs page)")


@st.cache_resource(show_spinner=False)
def generation_lock():
    """One lock for every session's generation: the cached models are shared between sessions, and
    steering (Compare's forced expert) changes a model's routing while it generates."""
    import threading

    return threading.Lock()
