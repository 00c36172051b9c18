"""Your model, your hardware: a labelled projection of what a ToMoE conversion costs on a model shape
and a device we have not measured. Plain functions, no Streamlit; the budget explorer's panel calls them.

Only cost is projected. Quality is never projected: the panel shows measured conversions and, as a
separate labelled series, the paper's published LLaMA-2 7B numbers (`PUBLISHED_LLAMA2_7B`).

Legend: L layers, d hidden size, I MLP intermediate size, h query heads, k KV heads, hd head dim,
V vocabulary, E experts per layer, p active MLP budget, B batch (sequences decoded together),
C context tokens held in the KV cache, b bytes per weight, bw memory bandwidth, F peak FLOP/s.

Parameters (biases and norms left out: under 0.1 % of these models)
  attention per layer   d*h*hd + 2*d*k*hd + h*hd*d           (q, k, v, o)
  MLP per layer         m*d*I, m = 3 for a gated MLP (LLaMA, Mistral, Qwen), 2 for a plain one (GPT-2)
  router per layer      d*E
  active per token      L*(attention + p*MLP + router) + V*d (lm_head)
Weight memory (b bytes per weight)
  one-copy layouts (indexed, shared): every weight once, about the dense size: V*d*(1 or 2, tied or not)
                        + L*(attention + MLP + router)
  packed: each expert's channels stored contiguously: the MLP term becomes E*p*MLP per layer
KV cache: 2*L*k*hd*C values per sequence, at the weights' precision (at most 2 bytes).
One decode step of B sequences reads (bandwidth-bound)
  attention and lm_head weights once, the KV cache of every sequence, and the MLP rows of the experts
  the B tokens chose: with uniform routing B tokens touch D(B) = E*(1 - (1 - 1/E)^B) distinct experts
  per layer on average, so one-copy layouts read min(1, p*D(B)) of the MLP (experts overlap, so this
  is an upper bound on the bytes) and packed reads p*D(B) of it. Dense reads the whole MLP.
  tokens/s (bandwidth-bound) = B * bw / bytes per step
FLOPs per token (compute-bound)
  2 * active + 4*L*h*hd*C (attention scores and values at context C)
  tokens/s (compute-bound) = F / FLOPs per token
Projected tokens/s is the smaller of the two (a roofline): a ceiling; served systems reach a fraction
of peak bandwidth and FLOP/s. $/1M tokens = price per hour / (tokens/s * 3600) * 1e6.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace

import pandas as pd
import plotly.graph_objects as go

GATED_FAMILIES = {"llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gemma3_text",
                  "phi3", "olmo", "olmo2", "granite", "cohere", "internlm2", "deepseek", "exaone", "smollm3"}
PLAIN_FAMILIES = {"gpt2", "phi", "gpt_neox", "gptj", "opt", "falcon", "bloom", "starcoder2"}


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a decoder-only transformer that its cost depends on (a Hugging Face config's fields)."""
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    head_dim: int | None = None  # default hidden / heads
    gated: bool = True  # gate, up and down projections (SwiGLU / GeGLU); False: fc1 and fc2
    tied: bool = False  # lm_head shares the embedding matrix

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def attention_per_layer(self) -> int:
        return self.hidden * self.heads * self.hd * 2 + 2 * self.hidden * self.kv_heads * self.hd

    @property
    def mlp_per_layer(self) -> int:
        return (3 if self.gated else 2) * self.hidden * self.intermediate

    @property
    def embeddings(self) -> int:
        return self.vocab * self.hidden

    @property
    def total_params(self) -> int:
        """Dense parameters (embeddings, attention, MLP, lm_head if untied; no biases or norms)."""
        return self.embeddings * (1 if self.tied else 2) + self.layers * (self.attention_per_layer + self.mlp_per_layer)


# Public configs (config.json on the Hugging Face hub). SmolLM2-135M is the model the studio measures;
# LLaMA-2 7B is the model of the paper's published numbers.
MODEL_PRESETS = {s.name: s for s in (
    ModelShape("Llama-3.1-8B", hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, vocab=128256),
    ModelShape("Qwen2.5-7B", hidden=3584, intermediate=18944, layers=28, heads=28, kv_heads=4, vocab=152064),
    ModelShape("Mistral-7B-v0.3", hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, vocab=32768),
    ModelShape("Llama-3.1-70B", hidden=8192, intermediate=28672, layers=80, heads=64, kv_heads=8, vocab=128256),
    ModelShape("Llama-2-7B", hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, vocab=32000),
    ModelShape("SmolLM2-135M", hidden=576, intermediate=1536, layers=30, heads=9, kv_heads=3, vocab=49152, tied=True),
)}


@dataclass(frozen=True)
class Device:
    name: str
    bandwidth_gb_s: float  # peak memory bandwidth, vendor data sheet
    tflops: float  # peak dense bf16 TFLOP/s (no structured-sparsity doubling)
    memory_gb: float
    price_per_hour: float  # a typical on-demand cloud price in USD; the user edits it


# Names short enough for the studio's hardware box (about 24 characters at 1280 px), details in DEVICE_NOTES.
DEVICE_PRESETS = {d.name: d for d in (
    Device("NVIDIA H100 SXM 80GB", 3350, 989, 80, 2.50),
    Device("NVIDIA H200 141GB", 4800, 989, 141, 3.50),
    Device("NVIDIA A100 SXM 80GB", 2039, 312, 80, 1.50),
    Device("NVIDIA L4 24GB", 300, 121, 24, 0.70),
    Device("CPU server, DDR5", 307, 4, 512, 1.00),  # one socket, 8 channels of DDR5-4800
)}
DEVICE_NOTES = {"CPU server, DDR5": "one socket, 8 channels of DDR5-4800"}
LAYOUTS = {"indexed": "one copy of the weights; each token gathers its expert's rows",
           "shared": "one copy of the weights; experts index into the union",
           "packed": "each expert's weights stored contiguously: about E x p x the MLP memory"}
LAYOUT_COPIES = {"indexed": "one copy", "shared": "one copy", "packed": "E x p copies"}
BYTES_PER_PARAM = {"bf16 / fp16": 2.0, "fp32": 4.0, "int8": 1.0, "4-bit": 0.5625}  # q4: 4.5 bits with scales
COPY_FREE = ("indexed", "shared", "core+extras")  # core+extras: nearly one copy (the extras are small)

# Gao et al., "ToMoE: Converting Dense Large Language Models to Mixture-of-Experts through Dynamic
# Structural Pruning", TMLR (arXiv 2501.15316): WikiText-2 perplexity of LLaMA-2 7B at 70/60/50 % active parameters.
PUBLISHED_LLAMA2_7B = {"dense": 5.12, "tomoe": {0.7: 6.41, 0.6: 7.17, 0.5: 8.36},
                       "source": "Gao et al., ToMoE (TMLR, arXiv 2501.15316): LLaMA-2 7B, WikiText-2 perplexity"}


def shape_from_config(config: dict | str | bytes, name: str = "uploaded config.json") -> ModelShape:
    """A ModelShape from a Hugging Face config.json (dict, or its text). Raises ValueError naming what is missing."""
    if isinstance(config, (str, bytes)):
        try:
            config = json.loads(config)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{name} is not valid JSON ({err}): upload the model's config.json") from err
    if not isinstance(config, dict):
        raise ValueError(f"{name} is not a JSON object: upload the model's config.json")
    if isinstance(config.get("text_config"), dict):  # multimodal wrappers keep the language model here
        config = {**config["text_config"], "model_type": config["text_config"].get("model_type", config.get("model_type"))}

    def first(*keys, default=None):
        for key in keys:
            if config.get(key) is not None:
                return config[key]
        if default is not None:
            return default
        raise ValueError(f"{name} has no {' / '.join(keys)}: it is not a decoder-only transformer config "
                         "this projection understands")

    hidden = int(first("hidden_size", "n_embd", "d_model"))
    heads = int(first("num_attention_heads", "n_head"))
    model_type = str(config.get("model_type", "")).lower()
    gated = model_type not in PLAIN_FAMILIES
    intermediate = int(first("intermediate_size", "n_inner", "ffn_dim", default=4 * hidden))
    shape = ModelShape(
        name=name, hidden=hidden, intermediate=intermediate,
        layers=int(first("num_hidden_layers", "n_layer")), heads=heads,
        kv_heads=int(first("num_key_value_heads", default=heads)), vocab=int(first("vocab_size")),
        head_dim=int(config["head_dim"]) if config.get("head_dim") else None, gated=gated,
        tied=bool(config.get("tie_word_embeddings", model_type in PLAIN_FAMILIES)))
    for field in ("hidden", "intermediate", "layers", "heads", "kv_heads", "vocab"):
        if getattr(shape, field) <= 0:
            raise ValueError(f"{name}: {field} must be positive, got {getattr(shape, field)}")
    return shape


def expected_experts_touched(batch: int, experts: int) -> float:
    """Distinct experts per layer that `batch` tokens choose on average, under uniform routing."""
    if batch <= 0 or experts <= 0:
        return 0.0
    return experts * (1 - (1 - 1 / experts) ** batch)


@dataclass(frozen=True)
class Projection:
    budget: float
    batch: int
    active_params: float
    dense_params: float  # parameters multiplied per token by the dense model
    weight_bytes: float
    dense_weight_bytes: float
    kv_cache_bytes: float  # all sequences of the batch, at context C
    bytes_per_step: float
    dense_bytes_per_step: float
    flops_per_token: float
    dense_flops_per_token: float
    bandwidth_tokens_per_s: float
    compute_tokens_per_s: float
    dense_bandwidth_tokens_per_s: float
    dense_compute_tokens_per_s: float

    @property
    def tokens_per_s(self) -> float:
        return min(self.bandwidth_tokens_per_s, self.compute_tokens_per_s)

    @property
    def dense_tokens_per_s(self) -> float:
        return min(self.dense_bandwidth_tokens_per_s, self.dense_compute_tokens_per_s)

    @property
    def bound(self) -> str:
        return "memory bandwidth" if self.bandwidth_tokens_per_s <= self.compute_tokens_per_s else "compute"

    def usd_per_million(self, price_per_hour: float) -> float | None:
        return usd_per_million_tokens(self.tokens_per_s, price_per_hour)

    def dense_usd_per_million(self, price_per_hour: float) -> float | None:
        return usd_per_million_tokens(self.dense_tokens_per_s, price_per_hour)


def usd_per_million_tokens(tokens_per_s: float, price_per_hour: float) -> float | None:
    """None where it is undefined (no speed); 0 for a free device."""
    if not tokens_per_s or tokens_per_s <= 0 or not math.isfinite(tokens_per_s) or price_per_hour is None \
            or price_per_hour < 0:
        return None
    return price_per_hour / (tokens_per_s * 3600) * 1e6


def project(shape: ModelShape, device: Device, budget: float, batch: int = 1, layout: str = "indexed",
            experts: int = 8, bytes_per_param: float = 2.0, context: int = 2048) -> Projection:
    """Cost of `shape` converted at active MLP budget `budget` on `device` (see the module docstring)."""
    if not 0 < budget <= 1:
        raise ValueError(f"budget must be in (0, 1], got {budget}")
    batch, experts, context = max(1, int(batch)), max(1, int(experts)), max(0, int(context))
    L, mlp, attn = shape.layers, shape.mlp_per_layer, shape.attention_per_layer
    router = shape.hidden * experts
    lm_head = shape.embeddings
    dense_active = L * (attn + mlp) + lm_head
    active = L * (attn + budget * mlp + router) + lm_head
    mlp_stored = mlp if layout in COPY_FREE else experts * budget * mlp
    dense_weight_bytes = shape.total_params * bytes_per_param
    weight_bytes = (shape.embeddings * (1 if shape.tied else 2) + L * (attn + mlp_stored + router)) * bytes_per_param
    kv_bytes = 2 * L * shape.kv_heads * shape.hd * context * min(bytes_per_param, 2.0) * batch
    touched = budget * expected_experts_touched(batch, experts)
    mlp_read = L * mlp * (min(1.0, touched) if layout in COPY_FREE else touched)
    fixed_read = (L * (attn + router) + lm_head) * bytes_per_param + kv_bytes
    bytes_per_step = fixed_read + mlp_read * bytes_per_param
    dense_bytes_per_step = (L * (attn + mlp) + lm_head) * bytes_per_param + kv_bytes
    score_flops = 4 * L * shape.heads * shape.hd * context
    flops = 2 * active + score_flops
    dense_flops = 2 * dense_active + score_flops
    bw, peak = device.bandwidth_gb_s * 1e9, device.tflops * 1e12
    return Projection(
        budget=budget, batch=batch, active_params=active, dense_params=dense_active, weight_bytes=weight_bytes,
        dense_weight_bytes=dense_weight_bytes, kv_cache_bytes=kv_bytes, bytes_per_step=bytes_per_step,
        dense_bytes_per_step=dense_bytes_per_step, flops_per_token=flops, dense_flops_per_token=dense_flops,
        bandwidth_tokens_per_s=batch * bw / bytes_per_step, compute_tokens_per_s=peak / flops if peak > 0 else 0.0,
        dense_bandwidth_tokens_per_s=batch * bw / dense_bytes_per_step,
        dense_compute_tokens_per_s=peak / dense_flops if peak > 0 else 0.0)


def batch_explanation(pr: "Projection", experts: int, layout: str = "indexed") -> str:
    """Why a batch decodes as fast as it does against dense, in words (the card says "same as dense"
    at batch 8 without this: the batch's tokens together read every expert)."""
    touched = expected_experts_touched(pr.batch, experts)
    share = pr.budget * touched
    read = min(1.0, share) if layout in COPY_FREE else share
    ratio = pr.tokens_per_s / pr.dense_tokens_per_s if pr.dense_tokens_per_s else float("nan")
    why = (f"at batch {pr.batch} the tokens choose {touched:.1f} of {experts} experts per layer on average, so a "
           f"decode step reads {read:.0%} of the MLP weights (p x experts touched = {share:.2f}"
           + (", capped at the one copy" if layout in COPY_FREE and share > 1 else "") + ")")
    if pr.bound == "compute":
        return (f"compute-bound: {why}, but at this batch the arithmetic, {pr.flops_per_token / pr.dense_flops_per_token:.0%} "
                f"of dense's per token, sets the speed ({ratio:.2f}x dense)")
    if abs(ratio - 1) < 0.005:
        return f"same as dense because {why}: the same bytes as dense, and bandwidth-bound decode time is bytes read"
    return f"bandwidth-bound: {why} ({ratio:.2f}x dense)"


def projection_table(shape: ModelShape, device: Device, budget: float, batches: tuple[int, ...], layout: str,
                     experts: int, bytes_per_param: float, context: int, price_per_hour: float) -> pd.DataFrame:
    """One row per batch size and model (dense, ToMoE at `budget`): the numbers the panel shows."""
    rows = []
    for batch in dict.fromkeys(max(1, int(b)) for b in batches):
        pr = project(shape, device, budget, batch, layout, experts, bytes_per_param, context)
        for model, bw, comp, weights, usd in (
                ("dense", pr.dense_bandwidth_tokens_per_s, pr.dense_compute_tokens_per_s, pr.dense_weight_bytes,
                 pr.dense_usd_per_million(price_per_hour)),
                (f"ToMoE p = {budget:g}, {layout}", pr.bandwidth_tokens_per_s, pr.compute_tokens_per_s,
                 pr.weight_bytes, pr.usd_per_million(price_per_hour))):
            rows.append({"batch": batch, "model": model, "bandwidth-bound tokens/s": bw,
                         "compute-bound tokens/s": comp, "projected tokens/s": min(bw, comp),
                         "weights (GB)": weights / 1e9, "KV cache (GB)": pr.kv_cache_bytes / 1e9,
                         "$ / 1M tokens": usd})
    return pd.DataFrame(rows)


def fits(weight_bytes: float, kv_bytes: float, device: Device) -> str:
    """Whether weights and KV cache fit the device's memory, in words."""
    need = (weight_bytes + kv_bytes) / 1e9
    if need <= device.memory_gb:
        return f"fits in {device.memory_gb:g} GB ({need:,.1f} GB of weights and KV cache)"
    return (f"needs {need:,.1f} GB: more than one device's {device.memory_gb:g} GB "
            f"(at least {math.ceil(need / device.memory_gb)} devices, or a lower precision)")


def devices_needed(weight_bytes: float, kv_bytes: float, device: Device) -> int:
    """How many of `device` hold the weights and KV cache (at least one)."""
    return max(1, math.ceil((weight_bytes + kv_bytes) / 1e9 / device.memory_gb))


def device_group(device: Device, count: int) -> Device:
    """`count` devices serving one model by ideal tensor parallelism: memory bandwidth, compute, memory
    and the price per hour add up (an upper bound on speed: no communication cost is counted)."""
    if count == 1:
        return device
    return Device(f"{count} x {device.name}", device.bandwidth_gb_s * count, device.tflops * count,
                  device.memory_gb * count, device.price_per_hour * count)


def quality_reference_figure(measured: pd.DataFrame, measured_label: str) -> go.Figure:
    """Perplexity relative to dense against the active MLP budget: measured conversions (columns budget,
    ratio) and, as a separate series, the paper's published LLaMA-2 7B numbers. Nothing is projected."""
    fig = go.Figure()
    if measured is not None and not measured.empty:
        m = measured.sort_values("budget")
        fig.add_trace(go.Scatter(x=m["budget"], y=m["ratio"], mode="lines+markers", name=f"measured here: {measured_label}",
                                 marker=dict(color="#4338ca", size=10), line=dict(color="#4338ca"),
                                 hovertemplate="p = %{x:g}<br>%{y:.2f}x dense perplexity<extra></extra>"))
    pub = PUBLISHED_LLAMA2_7B
    xs = sorted(pub["tomoe"])
    fig.add_trace(go.Scatter(x=xs, y=[pub["tomoe"][x] / pub["dense"] for x in xs], mode="lines+markers",
                             name="published: ToMoE on LLaMA-2 7B (paper, WikiText-2)",
                             marker=dict(color="#d97706", symbol="diamond", size=10), line=dict(color="#d97706", dash="dot"),
                             customdata=[pub["tomoe"][x] for x in xs], xaxis="x2",
                             hovertemplate="%{x:.0%} active<br>perplexity %{customdata:.2f} (dense 5.12)<br>"
                                           "%{y:.2f}x dense<extra>published</extra>"))
    fig.add_trace(go.Scatter(x=[1.0], y=[1.0], mode="markers", name="dense", marker=dict(color="#1f2937", symbol="star",
                                                                                          size=14),
                             hovertemplate="dense<extra></extra>"))
    # Two quantities, two axes: our p is the share of MLP weights a token uses; the paper reports the
    # share of all parameters active. Both run 0.2..1 so that dense (1, 1) sits at the same place.
    span = [0.2, 1.05]
    fig.update_layout(xaxis=dict(title="measured here: MLP budget p (share of MLP weights per token)", range=span),
                      xaxis2=dict(title="published: share of all parameters active", overlaying="x", side="top",
                                  range=span, tickformat=".0%", showgrid=False, title_font_color="#d97706",
                                  tickfont_color="#d97706"),
                      yaxis_title="perplexity / dense perplexity", yaxis_type="log", height=360,
                      margin=dict(l=10, r=10, t=60, b=10), template="plotly_white",
                      legend=dict(orientation="h", yanchor="top", y=-0.25, x=0))
    return fig


def with_overrides(device: Device, bandwidth_gb_s: float | None = None, tflops: float | None = None,
                   price_per_hour: float | None = None) -> Device:
    """The preset with the user's edits."""
    return replace(device, **{k: v for k, v in (("bandwidth_gb_s", bandwidth_gb_s), ("tflops", tflops),
                                                 ("price_per_hour", price_per_hour)) if v is not None})
