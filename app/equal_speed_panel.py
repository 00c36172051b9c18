"""The Budget explorer's "Quality at equal speed": per serving scenario, each method's perplexity against
its measured speed (one speed file), with the best method at the speed ToMoE reaches at the slider's p."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from analysis import equal_speed, speed_cards, tradeoff
from app import ui

HELP = ("Which method gives the best quality at a given measured speed depends on how the model is served: "
        "one user decoding (batch 1), a batch of users (batch 8), or long prompts (prefill). Each line is one "
        "method over its budgets, from one speed file (dense, ToMoE and the baselines timed in one interleaved "
        "run on one machine) and one evaluation set. TEAL-style is timed as TEAL deploys it: decode steps sparse, "
        "the prompt pass dense, so its prefill runs at dense speed.")


def render(results: dict, points: pd.DataFrame, eval_set: str | None, budget: float, threads: int | None,
           layout: str | None, speed_source: str | None, conversion: str | None, model: str) -> None:
    st.subheader("Quality at equal speed", help=HELP)
    speed = speed_cards.method_speed_rows(results, speed_source)
    speed = speed[speed["model"] == model]  # never one model's speed beside another's quality
    if speed.empty or eval_set is None:
        st.caption("Needs a speed file and quality results: run `python -m benchmarks.speed` and "
                   "`python -m benchmarks.quality`.")
        return
    if not set(speed["method"]) - {"dense", "tomoe"}:
        st.info("This speed file times dense and ToMoE only. **Measure speed** (above) times TEAL-style, Wanda-sp "
                "and FLAP beside them in the same run, which this comparison needs.", icon="ℹ️")
        return
    options = equal_speed.scenarios(speed)
    ui.keep("equal_speed_scenario", next(iter(options)))
    if st.session_state["equal_speed_scenario"] not in options:
        st.session_state["equal_speed_scenario"] = next(iter(options))
    st.radio("Serving scenario", list(options), key="equal_speed_scenario", horizontal=True,
             help="decode: new tokens/s with a KV cache; prompt: tokens/s of the prompt pass (time to first token)")
    scenario = st.session_state["equal_speed_scenario"]
    pts = points[points["eval_set"] == eval_set]
    dense = pts[pts["kind"] == "dense"]["perplexity"]
    teal_options = [v for v in equal_speed.TEAL_QUALITY if (pts["variant"] == v).any()]
    teal_variant = "teal"
    if len(teal_options) > 1:
        ui.keep("equal_speed_teal", "teal")
        st.radio("TEAL-style's perplexity", teal_options, key="equal_speed_teal", horizontal=True,
                 format_func=lambda v: equal_speed.TEAL_QUALITY[v],
                 help="Every token sparse (prompt too): how the quality benchmark scores every method. First "
                      "half dense: how TEAL's own code scores it, and how it is deployed (dense prompt pass); "
                      "the other methods keep every token at their budget.")
        teal_variant = st.session_state["equal_speed_teal"]
    quality = equal_speed.quality_by_method(points, eval_set, tradeoff.tomoe_curve(points, eval_set, conversion),
                                            teal_variant)
    table = equal_speed.equal_speed_table(speed, quality, scenario, threads, layout or "indexed",
                                          float(dense.iloc[0]) if len(dense) else None)
    if table[table["method"] != "dense"].empty:
        st.caption("No method has both a speed and a perplexity at the same budget in this scenario.")
        return
    st.plotly_chart(equal_speed.equal_speed_figure(table, scenario, budget), key="equal_speed")
    sentence = equal_speed.equal_speed_sentence(table, budget, scenario)
    if sentence:
        st.markdown(sentence)
    machine = speed["machine"].iloc[0]
    st.caption(f"Speed: {machine}, {threads} thread(s), ToMoE's {layout or 'indexed'} layout; "
               f"{speed['source'].iloc[0]}. Quality: {eval_set}; TEAL-style's perplexity: "
               f"{equal_speed.TEAL_QUALITY[teal_variant]}. Points on the dotted Pareto front are beaten by no other "
               "on both speed and perplexity.")
