"""Compare: dense and converted model generate side by side; divergence and experts token by token."""
import streamlit as st

from analysis import compare_view
from app import ui

st.title("Compare")
st.caption("Greedy generation with the same settings from the dense model and a ToMoE conversion. Tokens that "
           "differ are underlined in red; the converted model's tokens are coloured by the expert that processed "
           "them in the layer you pick. Hover a token for its expert, router probability and KL to dense.")

cat = ui.read_catalog()
ui.show_problems(cat.problems)
if not cat.conversions:
    st.info("No conversion to compare yet: start one on the **Runs** page or with `python -m tomoe_core convert`.",
            icon="ℹ️")
    st.stop()

by_name = {c.name: c for c in cat.conversions}
ui.keep("conversion", cat.conversions[0].name)
if st.session_state["conversion"] not in by_name:
    st.session_state["conversion"] = cat.conversions[0].name
st.selectbox("Conversion", list(by_name), key="conversion",
             format_func=lambda n: f"{n}  (p = {by_name[n].budget}, {by_name[n].meta.get('num_experts')} experts"
                                   f"{'' if by_name[n].materialised else ', rebuilt on first use'})")
conv = by_name[st.session_state["conversion"]]
budget = None  # a budget-conditioned conversion runs at any budget of its range (materialised in seconds)
if conv.is_conditioned:  # a rebudgeted copy has a range but no hypernetwork
    options = compare_view.budget_options(conv.budget_range, conv.budget)
    ui.keep("compare_budget", conv.budget)
    if st.session_state["compare_budget"] not in options:
        st.session_state["compare_budget"] = min(options, key=lambda b: abs(b - (conv.budget or 0.5)))
    st.select_slider("Budget p (fraction of MLP weights each token uses)", options, key="compare_budget",
                     help=f"{conv.name} was trained for every budget in {conv.budget_range[0]:g}..."
                          f"{conv.budget_range[1]:g}; budgets other than {conv.budget:g} are materialised in memory "
                          "the first time (seconds).")
    budget = float(st.session_state["compare_budget"])
label = compare_view.run_label(conv.name, budget)

ui.keep("prompt", "The history of the Roman Empire begins")
ui.keep("max_new_tokens", 30)
with st.form("generate"):
    st.text_area("Prompt", key="prompt", height=90)
    st.slider("New tokens", min_value=1, max_value=100, key="max_new_tokens")
    num_layers_conv = len(conv.meta.get("layers") or []) or 1
    num_experts_conv = int(conv.meta.get("num_experts") or 1)
    ui.keep("steer", False)
    ui.keep("steer_layer", num_layers_conv // 2)
    ui.keep("steer_expert", 0)
    with st.expander("Steering (advanced)"):
        st.checkbox("Also generate with one expert forced", key="steer",
                    help="Every token, of the prompt and of the continuation, goes to the chosen expert in the "
                         "chosen layer (the other layers route as learned): what that expert does to the text, "
                         "beside the dense and the normally routed output.")
        c1, c2 = st.columns(2)
        c1.number_input("Layer", 0, max(num_layers_conv - 1, 0), key="steer_layer")
        c2.number_input("Expert", 0, max(num_experts_conv - 1, 0), key="steer_expert")
    submitted = st.form_submit_button("Generate side by side", type="primary")


def generate(conv) -> dict | None:
    from tomoe_core.eval.metrics import PromptError

    with st.status("Generating...", expanded=True) as status:
        try:
            if budget is not None and (abs(budget - float(conv.budget)) > 1e-9 or not conv.materialised):
                st.write(f"Loading the dense model `{conv.model}`...")
                dense, tokenizer = ui.dense_model(conv.model)
                st.write(f"Materialising `{conv.name}` at p = {budget:g} from its hypernetwork...")
                moe, _meta, _seconds = ui.conditioned_model(conv, budget)
                return _generate_with(moe, dense, tokenizer, status)
            if not conv.materialised:
                st.write("Rebuilding the shipped conversion from the dense model (first use only; the dense model's "
                         "first load dequantises it, about 30 s)...")
                ui.materialise_shipped(log=lambda msg: st.write(msg))
                conv = {c.name: c for c in ui.read_catalog().conversions}.get(conv.name, conv)
                if not conv.materialised:
                    raise FileNotFoundError(f"the shipped conversion {conv.name} was not materialised")
            st.write(f"Loading the dense model `{conv.model}`...")
            dense, tokenizer = ui.dense_model(conv.model)
            st.write(f"Loading the converted model `{conv.name}`...")
            moe, _tok, _meta = ui.converted_model(str(conv.path), str(conv.meta.get("weights_sha256")))
            return _generate_with(moe, dense, tokenizer, status)
        except PromptError as err:
            status.update(label="Check the prompt", state="error")
            st.error(f"Prompt: {err}")
            return None
        except ui.user_error_types() as err:
            status.update(label="Could not generate", state="error")
            st.error(f"Could not run {conv.name}: {err}")
            return None
        except Exception as err:  # a model that fails to load (e.g. saved by an older format): a message, not a trace
            status.update(label="Could not load the models", state="error")
            st.error(f"Could not load or run `{conv.name}` ({err.__class__.__name__}: {str(err).splitlines()[0][:300]}). "
                     f"If the conversion was saved by an older version, convert it again.")
            return None
    return None


def _generate_with(moe, dense, tokenizer, status) -> dict:
    from tomoe_core.eval.metrics import compare_generation

    st.write(f"Generating {st.session_state['max_new_tokens']} tokens greedily with both models...")
    prompt = st.session_state["prompt"]
    result = compare_generation(dense, moe, tokenizer, prompt, int(st.session_state["max_new_tokens"]))
    st.write("Recording the converted model's routing of its tokens...")
    experts, probs = compare_view.generated_routing(moe, tokenizer, prompt, result["moe_ids"])
    steered = None
    if st.session_state["steer"]:
        from tomoe_core.trace.ablation import forced_expert

        layer, expert = int(st.session_state["steer_layer"]), int(st.session_state["steer_expert"])
        st.write(f"Generating again with expert {expert} forced in layer {layer}...")
        with forced_expert(moe, layer, expert):
            forced = compare_generation(dense, moe, tokenizer, prompt, int(st.session_state["max_new_tokens"]))
        steered = {"layer": layer, "expert": expert, "ids": forced["moe_ids"], "tokens": forced["moe_tokens"],
                   "kl": forced["moe_token_kl"], "first_divergence": forced["first_divergence"]}
    status.update(label="Generated", state="complete", expanded=False)
    return {**result, "experts": experts.tolist(), "probs": probs.tolist(), "conversion": label, "prompt": prompt,
            "steered": steered}


if submitted and not st.session_state["prompt"].strip():  # checked before any model loads
    st.error("Prompt: the prompt is empty: type some text to continue (the last result stays below)")
elif submitted:
    with ui.fair_threads(), ui.generation_lock():  # a background job keeps its core; sessions share models
        generated = generate(conv)
    if generated is not None:  # a failed run leaves the last result on the page
        st.session_state["compare_result"] = generated

result = st.session_state.get("compare_result")
if not result:
    st.stop()
if result["conversion"] != label:
    st.caption(f"Showing the last result, from `{result['conversion']}`: press Generate to run `{label}`.")

num_layers = len(result["experts"])
ui.keep("compare_layer", num_layers // 2)
if st.session_state["compare_layer"] >= num_layers:
    st.session_state["compare_layer"] = num_layers // 2
st.slider("Colour the converted model's tokens by the expert chosen in layer", 0, num_layers - 1,
          key="compare_layer")
layer = int(st.session_state["compare_layer"])
experts, probs = result["experts"][layer], result["probs"][layer]
div = result["first_divergence"]
differs = compare_view.diverging_positions(result["dense_ids"], result["moe_ids"])
kl = result["moe_token_kl"]

m = st.columns(3)
m[0].metric("First divergence", "none" if div is None else f"token {div}", border=True)
m[1].metric("Tokens that differ, by position", f"{len(differs)} / {max(len(result['dense_ids']), len(result['moe_ids']))}",
            border=True, help="position by position: once the texts diverge they are shifted against each other, "
                              "so most later positions differ; the first divergence and the KL say more")
m[2].metric("Mean KL to dense", f"{sum(kl) / max(len(kl), 1):.3f} nats", border=True)

left, right = st.columns(2, gap="large")
with left:
    st.markdown("**Dense**")
    st.html(compare_view.tokens_html(result["dense_tokens"], differs, div, prompt=result["prompt"]))
with right:
    st.markdown(f"**ToMoE** · `{result['conversion']}`")
    st.html(compare_view.tokens_html(result["moe_tokens"], differs, div, experts, probs, kl, layer,
                                     prompt=result["prompt"]))
    st.html(compare_view.legend_html(experts))
st.plotly_chart(compare_view.kl_figure(result["moe_tokens"], kl, experts, div), key="kl_chart")

steered = result.get("steered")
if steered:
    s_div = steered["first_divergence"]
    s_differs = compare_view.diverging_positions(result["dense_ids"], steered["ids"])
    st.markdown(f"**ToMoE with expert {steered['expert']} forced in layer {steered['layer']}** · "
                f"first divergence from dense: {'none' if s_div is None else f'token {s_div}'} · mean KL to dense "
                f"{sum(steered['kl']) / max(len(steered['kl']), 1):.3f} nats (normal routing: "
                f"{sum(kl) / max(len(kl), 1):.3f})")
    st.html(compare_view.tokens_html(steered["tokens"], s_differs, s_div, kl=steered["kl"], prompt=result["prompt"]))
