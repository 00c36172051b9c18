"""Runs: conversions and routing logs in cache/, background conversions and traces with live progress."""
import shlex
import time
from pathlib import Path

import pandas as pd
import streamlit as st

from analysis import catalog
from app import ui

st.title("Runs")
st.caption("Conversions and routing logs under `cache/`, and background jobs. A job runs as its own process: it "
           "keeps going when you reload the page or close the tab, and Cancel stops it.")

from tomoe_core.infra import jobs, paths
from tomoe_core.convert.config import ConversionConfig
from tomoe_core.convert.folder import Conversion, conversions_dir, default_conversion_name
from tomoe_core.infra.workspace import safe_name

cat = ui.read_catalog()
ui.show_problems(cat.problems)



def _refuse(form: str, message: str) -> None:
    """Why a start was refused: kept in the session so that a rerun (a job finishing refreshes the
    page) does not wipe it; shown until the next attempt."""
    st.session_state[f"refused::{form}"] = message


def _show_refusal(form: str) -> None:
    message = st.session_state.get(f"refused::{form}")
    if message:
        st.error(message)


# -- background jobs ------------------------------------------------------------------------------
def _job_row(job) -> None:
    state = jobs.status(job)
    done, total, last = jobs.progress(job)
    icon = {"running": ":material/progress_activity:", "finished": ":material/check_circle:",
            "failed": ":material/error:", "cancelled": ":material/cancel:", "lost": ":material/help:"}[state]
    with st.container(border=True):
        head, buttons = st.columns([5, 1])
        head.markdown(f"{icon} **{job.label}** · {job.kind} · {state} · started {job.started_at}")
        if state == "running":
            if buttons.button("Cancel", key=f"cancel-{job.id}"):
                jobs.cancel(job)
                st.rerun(scope="app")
        elif buttons.button("Remove", key=f"forget-{job.id}", help="remove from this list; the output stays"):
            jobs.forget(job)
            st.rerun(scope="app")
        if total:
            frac = min(1.0, (done or 0) / total)
            unit = {"convert": "steps", "trace": "tokens", "speed": "repeats", "ablate": "passes"}.get(job.kind, "done")
            text = f"{done or 0} / {total} {unit}"
            if last:
                text += (f" · loss {last.get('loss', float('nan')):.3f} · active ratio {last.get('det_ratio', last.get('ratio', 0)):.3f}"
                         f" · union {last.get('det_union', last.get('union', 0)):.3f} · {last.get('elapsed_s', 0) / 60:.1f} min")
            st.progress(frac, text=text)
        elif state == "running":
            st.progress(0.0, text="starting (loading the model)...")
        if state == "failed":
            st.error(f"The job failed (exit status {jobs.exit_code(job)}); the end of its output is below.")
        if state == "lost":
            st.warning("The process ended without an exit status (killed from outside, or the machine restarted). "
                       "A conversion can be resumed by starting it again with the same settings.")
        with st.expander("output", expanded=state == "failed"):
            st.code(jobs.log_tail(job, 3000)[-3000:] or "(no output yet)", language=None)


all_jobs = jobs.list_jobs()
running = [j for j in all_jobs if jobs.status(j) == "running"]


@st.fragment(run_every=2 if running else None)
def job_panel():
    current = jobs.list_jobs()
    now_running = {j.id for j in current if jobs.status(j) == "running"}
    if {j.id for j in running} - now_running:  # a job just ended: refresh the lists below
        st.rerun(scope="app")
    if not current:
        st.caption("No background jobs.")
    for job in current:
        _job_row(job)


st.subheader("Background jobs")
job_panel()

# -- start a conversion ---------------------------------------------------------------------------
st.subheader("Start a conversion")
with st.form("convert"):
    c1, c2, c3, c4 = st.columns(4)
    model = c1.text_input("Dense model", value="smollm2-135m",
                          help="built-in name, local Hugging Face checkpoint folder, or .gguf file")
    budget = c2.number_input("Budget p", min_value=0.05, max_value=1.0, value=0.5, step=0.05)
    experts = c3.number_input("Experts per layer", min_value=2, max_value=64, value=8, step=1)
    steps = c4.number_input("Steps", min_value=1, max_value=100000, value=100, step=10,
                            help="about 3 s per step for SmolLM2-135M on 2 CPU cores")
    with st.expander("More settings"):
        text = st.text_input("Calibration text", value="wiki", help="'wiki', or a .txt file or a folder of .txt "
                             "files inside the cache or data folder")
        name = st.text_input("Output name", value="", help="default: MODEL-pBUDGET-eEXPERTS; an existing "
                                                            "unfinished run of the same name resumes")
        extra = st.text_input("Extra convert options", value="", help="e.g. --tokens-per-step 1024 --seq-len 256")
    start = st.form_submit_button("Start conversion", type="primary")


def start_conversion() -> None:
    st.session_state.pop("refused::convert", None)
    if not model.strip():
        _refuse("convert", "Dense model: type a built-in name (smollm2-135m, gemma3-270m), a checkpoint folder or a .gguf file.")
        return
    try:  # every path the user typed stays inside the cache and data folders
        model_arg = paths.confine_model(model)
        text_arg = paths.confine_text_source(text, "Calibration text")
        default = default_conversion_name(ConversionConfig(model=model.strip(), budget=budget,
                                                           num_experts=int(experts)))
        output = Conversion(paths.confine_child(safe_name(name or default), conversions_dir(), "Output name"))
        extra_args = paths.check_extra_options(shlex.split(extra), paths.CONVERT_PATH_OPTIONS, "Extra convert options")
    except ValueError as err:
        _refuse("convert", str(err))
        return
    if output.metadata_path.exists():
        _refuse("convert", f"`{output.name}` is already a finished conversion: choose another output name.")
        return
    argv = jobs.python_argv("-m", "tomoe_core", "convert", "--model", model_arg, "--budget", f"{budget:g}",
                            "--experts", str(int(experts)), "--steps", str(int(steps)), "--text", text_arg,
                            "--output", str(output.path), *extra_args)
    try:  # under the job registry's lock: a second tab asking for the same output is refused here
        jobs.start_job("convert", argv, label=output.name, output=output.path, progress_log=output.progress_log,
                       total=int(steps))
    except jobs.JobError as err:
        _refuse("convert", f"Output name: {err}")
        return
    st.toast(f"Started conversion {output.name}")
    time.sleep(0.2)
    st.rerun()


if start:
    start_conversion()
_show_refusal("convert")

# -- conversions ----------------------------------------------------------------------------------
st.subheader("Conversions")
if not cat.conversions:
    st.caption("No conversions yet.")
else:
    table = pd.DataFrame([c.summary() for c in cat.conversions])
    st.dataframe(table, hide_index=True, column_config={
        "budget": st.column_config.NumberColumn(format="%.2f"),
        "MLP active ratio": st.column_config.NumberColumn(format="%.3f"),
        "active ratio vs dense": st.column_config.NumberColumn(format="%.3f")})
    names = [c.name for c in cat.conversions]
    ui.keep("runs_conversion", names[0])
    if st.session_state["runs_conversion"] not in names:
        st.session_state["runs_conversion"] = names[0]
    picked = {c.name: c for c in cat.conversions}[st.selectbox("Details of", names, key="runs_conversion")]
    left, right = st.columns(2)
    with left:
        log = catalog.read_jsonl_tail(picked.training_log, 1 << 20)
        if log:
            frame = pd.DataFrame(log).set_index("step")
            cols = [c for c in ("loss", "distill", "load_balance") if c in frame]
            st.markdown("**Training log**")
            st.line_chart(frame[cols], height=220)
        else:
            st.caption("No training log beside this conversion.")
        if picked.meta.get("command"):
            st.code(picked.meta["command"], language="bash", wrap_lines=True)
    with right:
        with st.expander("tomoe.json", expanded=False):
            st.json({k: v for k, v in picked.meta.items() if k != "layers"}, expanded=1)

# -- routing logs ---------------------------------------------------------------------------------
st.subheader("Routing logs")
from tomoe_core.trace import routing_log

runs = routing_log.list_runs()
if not runs:
    st.caption("No routing logs yet: start a trace below.")
else:
    st.dataframe(pd.DataFrame([{
        "run": r.get("run_id"), "model": r.get("model"), "budget": r.get("budget"),
        "conversion": Path(str(r.get("conversion", ""))).name, "text": (r.get("text") or {}).get("source"),
        "tokens": r.get("tokens"), "rows": r.get("rows"), "bytes/row": r.get("bytes_per_row"),
        "created": r.get("created_at")} for r in runs]), hide_index=True)
    run_ids = [r["run_id"] for r in runs]
    ui.keep("runs_log", run_ids[0])
    if st.session_state["runs_log"] not in run_ids:
        st.session_state["runs_log"] = run_ids[0]
    col, button = st.columns([3, 1], vertical_alignment="bottom")
    chosen = col.selectbox("Routing log", run_ids, key="runs_log")
    folder = Path(next(r["path"] for r in runs if r["run_id"] == chosen))
    try:
        files = routing_log.run_files(folder)  # confined to the routing folder: no symlink leads outside
    except ValueError as err:
        st.error(str(err))
    else:
        size_mb = sum(p.stat().st_size for p in files) / 2**20
        button.download_button(f"Download ({size_mb:.1f} MB zip)", lambda: routing_log.zip_run(folder),
                               file_name=f"{chosen}.zip", mime="application/zip", on_click="ignore")

from analysis.trace_estimate import TARGET_SECONDS, describe, trace_speed  # noqa: E402

with st.container(border=True):  # not a form: the time estimate follows the size as it is typed
    st.markdown("**Start a trace**: record every token's expert in every layer over a text")
    ready = [c.name for c in cat.conversions if c.materialised]
    t1, t2, t3 = st.columns([2, 2, 1])
    conv_name = t1.selectbox("Conversion", ready or ["(no materialised conversion)"], key="trace_conversion")
    source = t2.selectbox("Text", ["wiki held-out split", "my prompts below", "a .txt or .conllu file, or a folder"],
                          key="trace_source",
                          help="a .conllu file (a Universal Dependencies treebank) also brings its gold tags: the "
                               "Experts page compares them with spaCy's")
    conv = {c.name: c for c in cat.conversions}.get(conv_name)
    speed = trace_speed(runs, conv.path if conv else None, len(conv.meta.get("layers") or []) if conv else None,
                        accounting=conv.accounting if conv else None)
    ui.keep("trace_max_tokens", speed.tokens_for(TARGET_SECONDS))
    max_tokens = t3.number_input("Max tokens", min_value=16, max_value=10_000_000, step=500, key="trace_max_tokens",
                                 help="the default finishes in about a minute on this machine")
    st.caption(f"About {describe(speed.seconds(int(max_tokens)))} for {int(max_tokens):,} tokens "
               f"({speed.tokens_per_s:.0f} tokens/s and {speed.load_s:.0f} s to load, from {speed.basis}).")
    prompts = st.text_area("Prompts (one per line) or file path", value="", key="trace_prompts",
                           help="a .txt or .conllu file or a folder must be inside the cache or data folder")
    run_name = st.text_input("Run id", value="", key="trace_run_id",
                             help="name of the routing log: letters, digits, '.', '_' or '-' (default: "
                                  "CONVERSION-TEXT-UTCTIME)")
    go = st.button("Start trace")


def start_trace() -> None:
    st.session_state.pop("refused::trace", None)
    if not ready:
        _refuse("trace", "No materialised conversion: open Compare once (it rebuilds the shipped one) or convert one.")
        return
    if source != "wiki held-out split" and not prompts.strip():
        _refuse("trace", "Type prompts (one per line) or a file path for the chosen text.")
        return
    conv_path = {c.name: c.path for c in cat.conversions}[conv_name]
    argv = jobs.python_argv("-m", "tomoe_core", "trace", str(conv_path), "--max-tokens", str(int(max_tokens)))
    try:
        if source == "my prompts below":
            argv += ["--prompts", *[p for p in prompts.splitlines() if p.strip()]]
            text_name = "prompts"
        elif source.startswith("a .txt or .conllu"):
            text_name = paths.confine_text_source(prompts.strip(), "Text file or folder")
            argv += ["--text", text_name]
        else:
            text_name = "wiki"
        run_id = paths.routing_run_id(run_name) if run_name.strip() else routing_log.default_run_id(conv_path, text_name)
        output = paths.confine_child(f"run_id={run_id}", routing_log.routing_root(), "Run id")
        if output.exists():
            _refuse("trace", f"Run id: a routing log `{run_id}` exists already: choose another run id.")
            return
        jobs.start_job("trace", argv + ["--run-id", run_id], label=f"trace {run_id}", output=output,
                       total=int(max_tokens))
    except (ValueError, jobs.JobError) as err:
        _refuse("trace", str(err))
        return
    st.toast(f"Started trace {run_id}")
    time.sleep(0.2)
    st.rerun()


if go:
    start_trace()
_show_refusal("trace")
