"""The budget explorer's "Your model, your hardware" panel: widgets and cards over `analysis.projection`."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from analysis import card_format, projection
from app import ui

UPLOAD = "Upload a config.json"


def render(budget: float, measured_curve: pd.DataFrame, measured_label: str, layout: str | None) -> None:
    with st.container(key="projection"):
        _render(budget, measured_curve, measured_label, layout)


def _render(budget: float, measured_curve: pd.DataFrame, measured_label: str, layout: str | None) -> None:
    st.subheader("Your model, your hardware (projection)")
    st.caption("A **projection** from formulas, not a measurement: active parameters, weight memory, and "
               "bandwidth- and compute-bound decode speed of a ToMoE conversion of the model shape you pick at the "
               f"budget p = {budget:g} of the slider, on the hardware you pick. Quality is never projected: the "
               "chart below shows measured conversions only, and the paper's published numbers as their own series.")
    left, right = st.columns([1, 3], gap="large")
    with left:
        ui.keep("proj_model", "Llama-3.1-8B")
        st.selectbox("Model shape", [*projection.MODEL_PRESETS, UPLOAD], key="proj_model",
                     help="public config.json sizes (hidden, intermediate, layers, heads, KV heads, vocabulary), "
                          "or your model's config.json")
        shape, problem = None, None
        if st.session_state["proj_model"] == UPLOAD:
            upload = st.file_uploader("config.json", type=["json"], key="proj_config")
            if upload is None:
                problem = "upload the config.json of a Hugging Face causal LM to project it"
            else:
                try:
                    shape = projection.shape_from_config(upload.getvalue(), name=upload.name)
                except ValueError as err:
                    problem = str(err)
        else:
            shape = projection.MODEL_PRESETS[st.session_state["proj_model"]]
        ui.keep("proj_device", next(iter(projection.DEVICE_PRESETS)))
        st.selectbox("Hardware", list(projection.DEVICE_PRESETS), key="proj_device",
                     help="; ".join(f"{name}: {d.bandwidth_gb_s:,.0f} GB/s, {d.tflops:g} TFLOP/s, {d.memory_gb:g} GB"
                                    + (f" ({projection.DEVICE_NOTES[name]})" if name in projection.DEVICE_NOTES else "")
                                    for name, d in projection.DEVICE_PRESETS.items()))
        preset = projection.DEVICE_PRESETS[st.session_state["proj_device"]]
        fields = (("bw", "Memory bandwidth (GB/s)", preset.bandwidth_gb_s, 1.0, 100.0),
                  ("tflops", "Peak TFLOP/s (bf16, dense)", preset.tflops, 0.1, 10.0),
                  ("price", "Price per hour (USD)", preset.price_per_hour, 0.0, 0.1))
        values = {}
        for name, label, default, lo, step in fields:  # each preset keeps the user's edits
            key = f"proj_{name}::{preset.name}"
            ui.keep(key, float(default))
            st.number_input(label, min_value=lo, step=step, key=key)
            values[name] = float(st.session_state[key])
        device = projection.with_overrides(preset, values["bw"], values["tflops"], values["price"])
        layouts = list(projection.LAYOUTS)
        ui.keep("proj_layout", layout if layout in layouts else layouts[0])
        st.selectbox("Layout", layouts, key="proj_layout", format_func=lambda k: f"{k} ({projection.LAYOUT_COPIES[k]})",
                     help="; ".join(f"{k}: {v}" for k, v in projection.LAYOUTS.items()))
        ui.keep("proj_precision", next(iter(projection.BYTES_PER_PARAM)))
        st.selectbox("Weight precision", list(projection.BYTES_PER_PARAM), key="proj_precision")
        ui.keep("proj_experts", 8)
        st.number_input("Experts per layer E", min_value=1, max_value=128, step=1, key="proj_experts")
        ui.keep("proj_batch", 8)
        st.number_input("Batch (sequences decoded together)", min_value=1, max_value=4096, step=1, key="proj_batch")
        ui.keep("proj_context", 2048)
        st.number_input("Context (tokens in the KV cache)", min_value=0, max_value=1_000_000, step=512,
                        key="proj_context")
    with right:
        if shape is None:
            st.info(problem, icon=":material/upload_file:")
        else:
            _cards(shape, device, budget, st.session_state["proj_layout"],
                   projection.BYTES_PER_PARAM[st.session_state["proj_precision"]], int(st.session_state["proj_experts"]),
                   int(st.session_state["proj_batch"]), int(st.session_state["proj_context"]))
        st.plotly_chart(projection.quality_reference_figure(measured_curve, measured_label), key="proj_quality")
        st.caption("Quality, measured only: the blue series is this repository's measured conversion "
                   f"({measured_label}); the orange one is {projection.PUBLISHED_LLAMA2_7B['source']} "
                   "(dense 5.12; ToMoE 6.41 / 7.17 / 8.36 at 70 / 60 / 50 % active), published, not measured here.")
    with st.expander("Projection formulas"):
        st.markdown("```\n" + projection.__doc__.split("\n\n", 2)[2] + "```")


def _cards(shape, device, budget, layout, bytes_per_param, experts, batch, context) -> None:
    many = projection.project(shape, device, budget, batch, layout, experts, bytes_per_param, context)
    # dense and ToMoE on the same hardware: as many devices as the larger of the two needs at this batch
    count = projection.devices_needed(max(many.weight_bytes, many.dense_weight_bytes), many.kv_cache_bytes, device)
    if count > 1:
        st.warning(f"{shape.name} needs {count} x {device.name} at batch {batch} "
                   f"({projection.fits(max(many.weight_bytes, many.dense_weight_bytes), many.kv_cache_bytes, device)}): "
                   f"the cards are for {count} devices serving it together, bandwidth, compute and price "
                   f"{count} times one device's (ideal tensor parallelism, no communication counted).",
                   icon=":material/memory:")
        device = projection.device_group(device, count)
        many = projection.project(shape, device, budget, batch, layout, experts, bytes_per_param, context)
    one = projection.project(shape, device, budget, 1, layout, experts, bytes_per_param, context)
    price = device.price_per_hour

    def tps(x: float) -> str:
        return f"{x:,.0f}" if x >= 10 else f"{x:,.2f}"

    usd = card_format.format_usd

    def delta(value, reference, lower_is_better=True):
        return card_format.metric_delta(value, reference, lower_is_better)

    cells = [cell for _ in range(3) for cell in st.columns(3)]  # rows of three: labels and values stay whole
    row = cells[:4]
    row[0].metric("Active params", f"{one.active_params / 1e9:.2f} B",
                  f"{one.active_params / one.dense_params:.0%} of dense", delta_color="off", delta_arrow="off",
                  border=True, help="projection: L x (attention + p x MLP + router) + lm_head; dense "
                                    f"{one.dense_params / 1e9:.2f} B of {shape.total_params / 1e9:.2f} B parameters")
    row[1].metric(f"Weights ({layout})", f"{one.weight_bytes / 1e9:,.1f} GB",
                  **delta(one.weight_bytes, one.dense_weight_bytes), border=True,
                  help="projection: one-copy layouts: every weight once; packed: E x p x the MLP. "
                       f"{projection.fits(many.weight_bytes, many.kv_cache_bytes, device)} at batch {batch}")
    row[2].metric("Tokens/s, batch 1", tps(one.tokens_per_s),
                  **delta(one.tokens_per_s, one.dense_tokens_per_s, False), border=True, help=f"projection: min(bandwidth-bound {tps(one.bandwidth_tokens_per_s)}, compute-bound "
                                    f"{tps(one.compute_tokens_per_s)}): {one.bound}-bound; dense {tps(one.dense_tokens_per_s)}")
    row[3].metric(f"Tokens/s, batch {batch}", tps(many.tokens_per_s),
                  **delta(many.tokens_per_s, many.dense_tokens_per_s, False), border=True,
                  help=f"projection: min(bandwidth-bound {tps(many.bandwidth_tokens_per_s)}, compute-bound "
                       f"{tps(many.compute_tokens_per_s)}): {projection.batch_explanation(many, experts, layout)}; "
                       f"dense {tps(many.dense_tokens_per_s)}")
    row = cells[4:8]
    if price <= 0:
        row[0].metric("$/M tokens, batch 1", "—", border=True, help="projection: the price per hour is 0")
        row[1].metric(f"$/M tokens, batch {batch}", "—", border=True, help="projection: the price per hour is 0")
    else:
        row[0].metric("$/M tokens, batch 1", usd(one.usd_per_million(price)),
                      **delta(one.usd_per_million(price), one.dense_usd_per_million(price)),
                      border=True, help=f"projection: ${price:.2f}/h / (tokens/s x 3600) x 1e6 = "
                                        f"${one.usd_per_million(price) or 0:,.2f}; dense "
                                        f"{usd(one.dense_usd_per_million(price))}")
        row[1].metric(f"$/M tokens, batch {batch}", usd(many.usd_per_million(price)),
                      **delta(many.usd_per_million(price), many.dense_usd_per_million(price)),
                      border=True, help=f"projection: ${price:.2f}/h / (tokens/s x 3600) x 1e6 = "
                                        f"${many.usd_per_million(price) or 0:,.2f}; dense "
                                        f"{usd(many.dense_usd_per_million(price))}")
    row[2].metric("KV cache", f"{many.kv_cache_bytes / 1e9:,.2f} GB", border=True,
                  help=f"projection: 2 x L x KV heads x head dim x {context} tokens x {batch} sequences")
    row[3].metric("FLOPs / token", f"{one.flops_per_token / 1e9:,.1f} G",
                  **delta(one.flops_per_token, one.dense_flops_per_token), border=True,
                  help="projection: 2 x active parameters + attention scores at the context")
    st.caption(f"Projection for {shape.name} ({shape.layers} layers, hidden {shape.hidden}, MLP {shape.intermediate}, "
               f"{shape.heads} / {shape.kv_heads} heads, vocabulary {shape.vocab:,}) on {device.name} "
               f"({device.bandwidth_gb_s:,.0f} GB/s, {device.tflops:g} TFLOP/s, ${price:.2f}/h): ceilings of an ideal "
               f"kernel; {projection.fits(many.weight_bytes, many.kv_cache_bytes, device)} at batch {batch}. "
               f"Batch {batch}: {projection.batch_explanation(many, experts, layout)}. "
               "Formulas under *Projection formulas*.")
    if price <= 0:
        st.info("The price per hour is 0: enter a price to see the cost per million tokens.",
                icon=":material/payments:")
