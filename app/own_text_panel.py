"""The Budget explorer's "Quality on your own text": upload a .txt, run the quality benchmark on it as a
background job (dense, ToMoE at the shipped budgets, TEAL-style and the static baselines), and the
evaluation-set box offers it when the job ends (every quality card and chart then reads it)."""
from __future__ import annotations

import streamlit as st

from analysis import catalog
from app import ui

BUDGETS = ("0.3", "0.5", "0.7", "0.9")  # the budgets the speed file measures: quality at equal speed reads them
METHODS = "teal,wanda-sp,flap"
WINDOW = 512
MAX_WINDOWS = 8


def _jobs(jobs) -> list:
    return [j for j in jobs.list_jobs() if j.kind == "quality" and jobs.status(j) == "running"]


def check_upload(data: bytes, name: str, model: str) -> tuple[str, int]:
    """(text, windows) of an upload, or a ValueError that names the problem: binary, not UTF-8, empty,
    or too short for one evaluation window of the model's tokens."""
    from tomoe_core.convert.dense import load_tokenizer
    from tomoe_core.text.reading import TextSourceError, check_text_bytes
    from tomoe_core.text.sources import special_prefix

    text = check_text_bytes(data, name)
    tokenizer = load_tokenizer(model)
    tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    body = WINDOW - len(special_prefix(tokenizer))
    if tokens < body:
        raise TextSourceError(f"{name} has {tokens:,} tokens, fewer than one evaluation window of {body:,}: upload "
                              "a longer text (about 400 words or more)")
    return text, min(MAX_WINDOWS, tokens // body)


def render(model: str) -> None:
    from tomoe_core.infra import jobs
    from tomoe_core.infra.locations import cache_dir
    from tomoe_core.infra.workspace import safe_name
    from tomoe_core.moe.atomic import atomic_write_bytes

    running = _jobs(jobs)
    with st.expander("Quality on your own text", expanded=bool(running)):
        if running:
            ui.job_progress(running[0].id, f"Measuring quality: {running[0].label}")
            return
        st.caption(f"Upload a .txt: the quality benchmark runs on it in the background (dense, ToMoE at p = "
                   f"{', '.join(BUDGETS)}, TEAL-style, Wanda-sp and FLAP; up to {MAX_WINDOWS} windows of {WINDOW} "
                   "tokens; several minutes on 2 CPU cores, progress also on the Runs page). When it ends, the "
                   "evaluation-set box above offers your text and every quality card and chart can read it.")
        upload = st.file_uploader("Your text (.txt, UTF-8)", type=["txt"], key="own_text")
        if upload is None or not st.button("Measure quality on this text", key="own_text_go"):
            return
        try:
            text, windows = check_upload(upload.getvalue(), upload.name, model)
        except ValueError as err:
            st.error(f"Your text: {err}")
            return
        import hashlib

        # the content's hash in the name: token and item caches are keyed on the path, so a new text
        # under an old name must not be read from them
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:8]
        name = f"{safe_name(upload.name.rsplit('.', 1)[0]) or 'text'}-{digest}"
        path = cache_dir() / "data" / "uploads" / f"{name}.txt"
        atomic_write_bytes(path, text.encode("utf-8"))
        output = catalog.cache_root() / "results" / f"quality_benchmark-{name}.json"
        argv = jobs.python_argv("-m", "benchmarks.quality", "--model", model, "--text", str(path), "--budgets", *BUDGETS,
                                "--methods", METHODS, "--windows", str(windows), "--window", str(WINDOW),
                                "--output", str(output))
        try:
            jobs.start_job("quality", argv, label=f"quality on {upload.name}", output=output)
        except jobs.JobError as err:
            st.error(str(err))
            return
        st.rerun()
