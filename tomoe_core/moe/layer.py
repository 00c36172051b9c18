"""The materialised MoE MLP used for inference (its layouts) and the routing shared with training.

Legend: N = tokens, D = hidden size, I = intermediate channels, U = union channels kept
by a materialised layer, E = experts, W_k = width of expert k.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .families import MLPWeights
from .atomic import release_file_pages
from .gather_kernels import MAX_EXPERTS as MAX_GATHER_EXPERTS
from .gather_kernels import activation_code
from .gather_kernels import backend as gather_backend_for
from .gather_kernels import down as gather_down
from .gather_kernels import gate_up as gather_gate_up
from .gather_kernels import mlp as gather_mlp


def mlp_intermediate(w: MLPWeights, x: torch.Tensor) -> torch.Tensor:
    """act(gate x) * (up x) for gated MLPs, act(up x) for plain ones.  (..., D) -> (..., I)"""
    up = F.linear(x, w.up, w.up_bias)
    if w.gate is None:
        return w.act(up)
    return w.act(F.linear(x, w.gate, w.gate_bias)) * up


class RoutingPoint(nn.Module):
    """Named identity marking where a routing decision is made (TransformerLens-style hook point).

    Its forward receives `(expert_index (N,), router_prob (N,))`; forward hooks observe them.
    Modules call it only when a hook is attached, so nothing is paid when nobody listens.
    """

    def forward(self, expert_index: torch.Tensor, router_prob: torch.Tensor):
        return expert_index, router_prob

    @property
    def listening(self) -> bool:
        return bool(self._forward_hooks)


class RoutedMixin:
    """Routing choice shared by the masked and the materialised MLP and attention (training adds
    `convert.masked_mlp.MaskedRouting`).

    `routing_override`: None (learned argmax), "random" (uniform expert per token, from
    `random_generator`), an int (that fixed expert for every token): the three ways the
    evaluation runs a conversion; or a callable mapping router logits (N, E) to experts (N,)
    (interventions: `tomoe_core.trace.ablation` replaces one expert by each token's next choice).
    """

    routing_override: int | str | Callable | None = None
    random_generator: torch.Generator | None = None

    def choose_experts(self, logits: torch.Tensor) -> torch.Tensor:  # (N, E) -> (N,)
        num_experts = logits.shape[-1]
        if self.routing_override is None:
            return logits.argmax(dim=-1)
        if callable(self.routing_override):
            return self.routing_override(logits)
        if self.routing_override == "random":
            idx = torch.randint(num_experts, logits.shape[:-1], generator=self.random_generator)
            return idx.to(logits.device)
        assert 0 <= int(self.routing_override) < num_experts, self.routing_override
        return torch.full(logits.shape[:-1], int(self.routing_override), dtype=torch.long, device=logits.device)

    def report_routing(self, logits: torch.Tensor, expert_index: torch.Tensor) -> None:
        if self.routing_point.listening:
            probs = torch.softmax(logits.float(), dim=-1)
            self.routing_point(expert_index, probs.gather(-1, expert_index.unsqueeze(-1)).squeeze(-1))


def _channels(flat: torch.Tensor, offsets: torch.Tensor, k: int) -> torch.Tensor:
    return flat[offsets[k]:offsets[k + 1]]


# Layouts of a materialised layer, fastest first per use (measured on CPU with SmolLM2 shapes,
# see benchmarks/speed.py): indexed reads only the token's expert rows from the one copy of the
# union weights (batch-1 decode at packed speed, dense memory), core + extras wins long prefill.
LAYOUTS = ("indexed", "shared", "packed", "core+extras")
COPY_FREE_LAYOUTS = ("indexed", "shared")  # no weight copies: they fit wherever the model does
LAYOUT_PREFERENCE = {
    "decode": ("indexed", "packed", "core+extras", "shared"),
    "prefill": ("core+extras", "packed", "indexed", "shared"),
    "memory": ("indexed", "shared"),
}
LAYOUT_PREFERENCE["auto"] = LAYOUT_PREFERENCE["decode"]
# Up to this many tokens per call the indexed layout runs the gather kernels (each weight row the
# call needs is read once, for all its tokens); beyond, matmuls win (see SHARED_GATHER_MIN_TOKENS).
INDEXED_KERNEL_MAX_TOKENS = 16
# From this many tokens the indexed layout groups tokens by expert: the shared prefix as a view,
# each expert's other rows gathered (contiguous rows, down included). Below, the whole union masked.
# SmolLM2 p = 0.5, one thread, MLPs of all layers: masked / grouped / dense 99 / 160 / 91 ms at 32
# tokens, 326 / 403 / 278 at 128, 1268 / 892 / 1020 at 512.
INDEXED_GROUPED_MIN_TOKENS = 256
# Channels that at least this fraction of a layer's experts use run for every token of a long call
# (prefill) as one view of the union, masked per token, instead of being gathered for each expert:
# computing them for the few tokens that do not need them costs less than copying them E times.
# SmolLM2 p = 0.5, one thread, 512 held-out tokens, MLPs of all 30 layers: 0.711x dense at 0.75
# against 0.732x with the core alone (four layers on other text: 0.58-0.66x against 0.65-0.79x;
# 7/8 and 5/8 no better).
SHARED_PREFIX_FRACTION = 0.75
# Below this many tokens the shared layout runs the whole union and masks it: gathering the
# experts' rows (down columns are strided) costs more than the matmul over the extra channels.
# Measured on SmolLM2 shapes, one CPU thread, p = 0.5: masked 3.8 / 61 / 140 ms vs gathered
# 13 / 83 / 119 ms at 8 / 512 / 1024 tokens (batch-1 gathering alone is about 1.8x dense).
SHARED_GATHER_MIN_TOKENS = 768


def _rebuild_layout(module: "MoEMLP", incompatible_keys) -> None:
    module.set_layout(module.layout)


class ExpertBlock(NamedTuple):
    """Weights of a group of intermediate channels; W = channels in the group."""

    gate: torch.Tensor | None  # (W, D); None for a plain MLP
    up: torch.Tensor  # (W, D)
    up_bias: torch.Tensor | None  # (W,)
    down: torch.Tensor  # (D, W), possibly a transposed view of (W, D) rows


class IndexedTables(NamedTuple):
    """What the indexed layout adds to the union weights (see `gather_kernels`); W = widest expert."""

    down_t: torch.Tensor  # (U, D) view: the down parameter's storage, one channel per row
    union_masks: torch.Tensor  # (E, U) 0/1 in the weights' dtype
    channel_experts: torch.Tensor | None  # (U,) int64 bitmask of the experts using each channel; None if E > 64
    expert_table: torch.Tensor  # (E, W) union positions of each expert's channels, padded with 0
    expert_valid: torch.Tensor  # (E, W) 0/1 in the weights' dtype, 0 at the padding
    act_code: int  # the fused C kernel's code for the activation; 0: not fused (plain MLP or another activation)


class MoEMLP(RoutedMixin, nn.Module):
    """Materialised ToMoE layer: union weights, expert index lists into them, and the router.

    Persistent state (what is saved): `up`, `gate`, biases, `down` restricted to the U union
    channels, `union_channels` (U,) ids of those channels in the dense MLP, `expert_channels`
    (sum W_k,) indices into the union and `expert_offsets` (E+1,). `from_masks` orders the
    union by how many experts use each channel, so the C channels every expert uses come first.

    Layouts are derived from that state at load time and are never saved (`set_layout`):
      * "indexed": one copy of the union weights, `down` stored transposed (the parameter is a
        (D, U) view of (U, D) rows), so every expert channel is a contiguous row of each matrix.
        Up to INDEXED_KERNEL_MAX_TOKENS tokens per call, fused gather kernels read only the rows
        of the tokens' experts (`gather_kernels`: one C call per layer on CPU, Triton on CUDA, a
        pure-torch fallback) with no copy and no host synchronisation. Long calls (prefill) run
        the channels most experts share (SHARED_PREFIX_FRACTION; the union is ordered by share)
        for every token as one masked view, and gather each expert's remaining rows for its
        tokens. Dense memory, fastest batch-1 decode.
      * "shared": one copy of the union weights. Up to a few hundred tokens the whole union is
        computed and masked per token (gathering rows costs more than the extra channels);
        beyond, each expert gathers its rows once per call. Leanest, about dense speed.
      * "packed": each expert's weights contiguous; a token reads exactly its expert. Fastest
        batch-1 decode; extra memory sum_k W_k channels (about E * p of the MLP).
      * "core+extras": the core (a view of the union's first C rows) runs for every token in
        one matmul, then each expert's own extra channels, contiguous. Fastest prefill; extra
        memory sum_k (W_k - C) channels.
    All layouts compute the same function (tests compare them with the masked model).
    """

    shared_gather_min_tokens = SHARED_GATHER_MIN_TOKENS  # tests lower it to reach the gather path on tiny inputs
    indexed_kernel_max_tokens = INDEXED_KERNEL_MAX_TOKENS
    indexed_grouped_min_tokens = INDEXED_GROUPED_MIN_TOKENS
    gather_backend: str | None = None  # None: gather_kernels.backend() decides; tests force "torch"

    def __init__(self, hidden_size: int, union_size: int, expert_widths: list[int], gated: bool,
                 act: nn.Module, has_up_bias: bool = False, has_down_bias: bool = False):
        super().__init__()
        num_experts = len(expert_widths)
        self.num_experts = num_experts
        self.act = act
        self.up = nn.Parameter(torch.empty(union_size, hidden_size), requires_grad=False)
        self.gate = nn.Parameter(torch.empty(union_size, hidden_size), requires_grad=False) if gated else None
        self.up_bias = nn.Parameter(torch.empty(union_size), requires_grad=False) if has_up_bias else None
        self.gate_bias = None
        self.down = nn.Parameter(torch.empty(hidden_size, union_size), requires_grad=False)
        self.down_bias = nn.Parameter(torch.empty(hidden_size), requires_grad=False) if has_down_bias else None
        self.router = nn.Linear(hidden_size, num_experts, bias=True)
        self.register_buffer("union_channels", torch.zeros(union_size, dtype=torch.long))  # ids in the dense MLP
        self.register_buffer("expert_channels", torch.zeros(sum(expert_widths), dtype=torch.long))
        offsets = torch.tensor([0] + list(expert_widths)).cumsum(0)
        self.register_buffer("expert_offsets", offsets)
        self.routing_point = RoutingPoint()
        self.layout = "indexed"  # the default; materialising and loading build it (`_apply`, load hook)
        self._core: ExpertBlock | None = None  # core+extras: the channels all experts share; indexed: the shared prefix
        self._blocks: list[ExpertBlock] | None = None  # packed: whole experts; core+extras: extras
        self._union_masks: torch.Tensor | None = None  # shared, indexed: (E, U) 0/1 in the weights' dtype
        self._indexed: IndexedTables | None = None
        # loading weights invalidates the derived ones: rebuild them
        self.register_load_state_dict_post_hook(_rebuild_layout)

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_masks(cls, weights: MLPWeights, router: nn.Linear, expert_masks: torch.Tensor) -> "MoEMLP":
        """Keep the union of the experts' channels of one layer.  expert_masks: (E, I) in {0, 1}."""
        if weights.gate_bias is not None:
            raise ValueError("MoEMLP does not support a gate projection with a bias (e.g. LLaMA mlp_bias=True)")
        masks = expert_masks.bool().cpu()
        share = masks.sum(0)  # (I,) experts using each channel
        union = share.nonzero().squeeze(-1)
        union = union[torch.sort(share[union], descending=True, stable=True).indices]  # (U,) most shared first
        position = torch.full((masks.shape[1],), -1, dtype=torch.long)
        position[union] = torch.arange(len(union))
        per_expert = [position[m.nonzero().squeeze(-1)].sort().values for m in masks]
        moe = cls(weights.hidden_size, len(union), [len(c) for c in per_expert], weights.gated, weights.act,
                  has_up_bias=weights.up_bias is not None, has_down_bias=weights.down_bias is not None)
        with torch.no_grad():
            dev = weights.up.device
            u = union.to(dev)
            moe.up.data = weights.up.index_select(0, u)
            if weights.gated:
                moe.gate.data = weights.gate.index_select(0, u)
            if weights.up_bias is not None:
                moe.up_bias.data = weights.up_bias.index_select(0, u)
            moe.down.data = weights.down.index_select(1, u)
            if weights.down_bias is not None:
                moe.down_bias.data = weights.down_bias.detach().clone()
            moe.router.to(router.weight.dtype).load_state_dict(router.state_dict())  # a bf16 model's router is bf16
            moe.expert_channels = torch.cat(per_expert).to(dev) if per_expert else moe.expert_channels
            moe.expert_offsets = moe.expert_offsets.to(dev)
            moe.union_channels = union.to(dev)
        moe.to(dev)
        return moe

    @property
    def expert_widths(self) -> list[int]:
        return (self.expert_offsets[1:] - self.expert_offsets[:-1]).tolist()

    @property
    def union_size(self) -> int:
        return self.up.shape[0]

    def channels_of(self, k: int) -> torch.Tensor:
        """Union positions of expert k's channels.  (W_k,)"""
        return _channels(self.expert_channels, self.expert_offsets, k)

    def core_size(self) -> int:
        """Channels used by every expert (they sit first in a union ordered by `from_masks`)."""
        return int((self._shares() == self.num_experts).sum())

    # -- layouts ----------------------------------------------------------------------------
    def set_layout(self, layout: str) -> None:
        """Derive the weights a layout runs on (see the class docstring); frees the previous layout's."""
        if layout not in LAYOUTS:
            raise ValueError(f"unknown MoE layout {layout!r}; choose one of {', '.join(LAYOUTS)} "
                             f"(or a use: {', '.join(LAYOUT_PREFERENCE)} on the whole model)")
        self.layout = layout
        self._core = self._blocks = self._union_masks = self._indexed = None
        with torch.no_grad():
            if layout == "indexed":
                self._order_by_share()
                if not self.down.t().is_contiguous():  # keep one copy, channel rows contiguous
                    saved = self.down.data
                    self.down.data = saved.t().contiguous().t()
                    release_file_pages(saved)  # the saved (D, U) copy may be pages of the weights file
                self._union_masks = self._build_union_masks()
                self._indexed = self._build_indexed_tables()
                prefix = self._shared_prefix_size()
                self._core = self._union_block(slice(0, prefix)) if prefix else None
                return
            if not self.down.is_contiguous():  # back from the indexed layout's transposed storage
                self.down.data = self.down.data.contiguous()
            if layout == "shared":
                self._union_masks = self._build_union_masks()
            elif layout == "packed":
                self._blocks = [self._gather_block(self.channels_of(k)) for k in range(self.num_experts)]
            else:
                core = self._order_by_share()
                self._core = self._union_block(slice(0, core)) if core else None
                self._blocks = [self._gather_block(ch[ch >= core]) for ch in map(self.channels_of, range(self.num_experts))]

    def _build_union_masks(self) -> torch.Tensor:  # (E, U) 0/1 in the weights' dtype
        masks = torch.zeros(self.num_experts, self.union_size, dtype=self.up.dtype, device=self.up.device)
        for k in range(self.num_experts):
            masks[k, self.channels_of(k)] = 1
        return masks

    def _build_indexed_tables(self) -> IndexedTables:
        widths = self.expert_widths
        dev = self.up.device
        table = torch.zeros(self.num_experts, max(widths), dtype=torch.long, device=dev)
        valid = torch.zeros(self.num_experts, max(widths), dtype=self.up.dtype, device=dev)
        for k, width in enumerate(widths):
            table[k, :width] = self.channels_of(k)
            valid[k, :width] = 1
        bits = None
        if self.num_experts <= MAX_GATHER_EXPERTS:
            bit = torch.tensor([1 << k for k in range(self.num_experts)], dtype=torch.long, device=dev)  # (E,)
            bits = (self._union_masks.bool().long() * bit[:, None]).sum(0)  # (U,)
        act_code = activation_code(self.act) if self.gate is not None else 0
        return IndexedTables(self.down.t(), self._union_masks, bits, table, valid, act_code)

    def indexed_extra_bytes(self) -> int:
        """Bytes of the indexed layout's tables (union masks, channel bitmask, padded expert table)."""
        elem, widest = self.up.element_size(), max(self.expert_widths)
        return (self.num_experts * self.union_size * elem + self.union_size * 8
                + self.num_experts * widest * (8 + elem))

    def layout_extra_bytes(self, layout: str | None = None) -> int:
        """Bytes a layout adds to the union weights (estimated for `layout`, measured for the current one)."""
        if layout is None or layout == self.layout:
            derived = [t for b in (self._blocks or []) for t in b if t is not None]
            derived += [self._union_masks] if self._union_masks is not None else []
            derived += [t for t in (self._indexed or ())[1:] if isinstance(t, torch.Tensor)]
            own = {p.untyped_storage().data_ptr() for p in self.parameters()}
            seen, total = set(), 0
            for t in derived:
                ptr = t.untyped_storage().data_ptr()
                if ptr not in own and ptr not in seen:
                    seen.add(ptr)
                    total += t.untyped_storage().nbytes()
            return total
        if layout not in LAYOUTS:
            raise ValueError(f"unknown MoE layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
        per_channel = self.up.element_size() * ((3 if self.gate is not None else 2) * self.up.shape[1]
                                                + int(self.up_bias is not None))
        if layout == "shared":
            return self.num_experts * self.union_size * self.up.element_size()
        if layout == "indexed":
            return self.indexed_extra_bytes()
        widths = sum(self.expert_widths)
        if layout == "core+extras":
            widths -= self.num_experts * self.core_size()
        return widths * per_channel

    def weight_bytes(self) -> int:
        """Resident bytes of this layer: union weights, router, index lists and the layout's copies."""
        own = sum(t.untyped_storage().nbytes() for t in {p.untyped_storage().data_ptr(): p for p in
                                                         [*self.parameters(), *self.buffers()]}.values())
        return own + self.layout_extra_bytes()

    def _union_block(self, rows: slice) -> ExpertBlock:  # views, no copy
        return ExpertBlock(self.gate[rows] if self.gate is not None else None, self.up[rows],
                           self.up_bias[rows] if self.up_bias is not None else None, self.down[:, rows])

    def _gather_block(self, ch: torch.Tensor) -> ExpertBlock:  # contiguous copies of union positions ch
        down = (self._indexed.down_t.index_select(0, ch).t() if self._indexed is not None  # rows, not columns
                else self.down.index_select(1, ch))
        return ExpertBlock(self.gate.index_select(0, ch) if self.gate is not None else None,
                           self.up.index_select(0, ch),
                           self.up_bias.index_select(0, ch) if self.up_bias is not None else None,
                           down)

    def _shares(self) -> torch.Tensor:  # (U,) how many experts use each union position
        return torch.bincount(self.expert_channels, minlength=self.union_size)

    def _order_by_share(self) -> int:
        """Permute the union so channels used by more experts come first (a no-op for unions made by
        `from_masks`); the core is then its prefix. -> C"""
        share = self._shares()
        core = int((share == self.num_experts).sum())
        if bool((share[1:] <= share[:-1]).all()):
            return core
        perm = torch.sort(share, descending=True, stable=True).indices  # new position -> old
        new_position = torch.empty_like(perm)
        new_position[perm] = torch.arange(len(perm), device=perm.device)
        saved = [self.up.data, self.down.data] + ([self.gate.data] if self.gate is not None else [])
        self.up.data = self.up.data[perm]
        if self.gate is not None:
            self.gate.data = self.gate.data[perm]
        if self.up_bias is not None:
            self.up_bias.data = self.up_bias.data[perm]
        self.down.data = self.down.data[:, perm].contiguous()
        for t in saved:  # a loaded model's originals are pages of its weights file
            release_file_pages(t)
        self.union_channels = self.union_channels[perm]
        remapped = new_position[self.expert_channels]
        self.expert_channels = torch.cat([remapped[self.expert_offsets[k]:self.expert_offsets[k + 1]].sort().values
                                          for k in range(self.num_experts)])
        return core

    def _shared_prefix_size(self) -> int:
        """Channels at the front of the (share-ordered) union that SHARED_PREFIX_FRACTION of the experts
        use: the indexed layout's many-token path runs them for every token as one view, masked, rather
        than gathering them for each expert (S >= C)."""
        need = math.ceil(SHARED_PREFIX_FRACTION * self.num_experts)
        below = (self._shares() < need).nonzero()
        return int(below[0]) if len(below) else self.union_size

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        down = destination[prefix + "down"]
        if not down.is_contiguous():  # the indexed layout's transposed storage; files hold (D, U) rows
            destination[prefix + "down"] = down.detach().contiguous()

    def _apply(self, fn, *args, **kwargs):  # derived layout weights follow the module's device/dtype
        out = super()._apply(fn, *args, **kwargs)
        if getattr(self, "layout", None) is not None:
            self.set_layout(self.layout)
        return out

    # -- forward ----------------------------------------------------------------------------
    def _block_forward(self, block: ExpertBlock, x: torch.Tensor) -> torch.Tensor:  # (n, D) -> (n, D), no bias
        h = F.linear(x, block.up, block.up_bias)  # (n, W)
        h = self.act(h) if block.gate is None else self.act(F.linear(x, block.gate)) * h
        return F.linear(h, block.down)

    def _masked_union_forward(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:  # shared, few tokens
        h = F.linear(x, self.up, self.up_bias)  # (n, U)
        h = self.act(h) if self.gate is None else self.act(F.linear(x, self.gate)) * h
        return F.linear(h * self._union_masks[idx], self.down)

    def _expert_block(self, k: int) -> ExpertBlock:
        if self._blocks is not None:
            return self._blocks[k]
        ch = self.channels_of(k)
        if self._core is not None:  # indexed: the shared prefix ran as a view, gather only the rest
            ch = ch[ch >= self._core.up.shape[0]]
        return self._gather_block(ch)

    def _prefix_forward(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:  # (N, D) -> (N, D)
        """The union's shared prefix (the core, or more in the indexed layout) for every token, masked
        to the channels of each token's expert where the prefix is wider than the core."""
        block = self._core
        h = F.linear(x, block.up, block.up_bias)  # (N, S)
        h = self.act(h) if block.gate is None else self.act(F.linear(x, block.gate)) * h
        if self._indexed is not None:  # the prefix may hold channels some experts lack (exact 1s on the core)
            h = h * self._union_masks[:, : h.shape[1]].index_select(0, idx)
        return F.linear(h, block.down)

    def _indexed_forward(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:  # (n, D), (n,) -> (n, D)
        """Gather kernels: every weight row the tokens' experts use is read once, nothing else."""
        t = self._indexed
        use = self.gather_backend or gather_backend_for(self.up)
        if t.channel_experts is None:
            use = "torch"
        idx = idx.contiguous()
        if use == "cpu-c" and t.act_code and self.up_bias is None:  # one fused call: no (n, U) tensors in torch
            return gather_mlp(self.gate, self.up, t.down_t, x, idx, t.channel_experts, t.act_code)
        g, u = gather_gate_up(self.gate, self.up, x, idx, t.channel_experts, t.union_masks, use)  # (n, U)
        member = None
        if self.up_bias is not None or self.gate is None:
            member = t.union_masks.index_select(0, idx)  # (n, U)
        if self.up_bias is not None:
            u = u + self.up_bias * member
        a = self.act(u) * member if self.gate is None else self.act(g) * u  # (n, U), 0 outside the expert
        return gather_down(t.down_t, a, idx, t.channel_experts, t.expert_table, t.expert_valid, use)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat_x = x.reshape(-1, shape[-1])  # (N, D)
        logits = self.router(flat_x)  # (N, E)
        idx = self.choose_experts(logits)  # (N,)
        self.report_routing(logits, idx)
        n = flat_x.shape[0]
        if self._indexed is not None and n <= self.indexed_kernel_max_tokens and not (
                torch.is_grad_enabled() and flat_x.requires_grad):  # the kernels have no backward
            out = self._indexed_forward(flat_x, idx)
        elif self._union_masks is not None and n < (self.shared_gather_min_tokens if self._indexed is None
                                                     else self.indexed_grouped_min_tokens):
            out = self._masked_union_forward(flat_x, idx)
        else:
            out = self._prefix_forward(flat_x, idx) if self._core is not None else None  # (N, D)
            if n == 1:  # batch-1 decode: one expert, no sort
                y = self._block_forward(self._expert_block(int(idx[0])), flat_x)
                out = y if out is None else out.add_(y)
            else:  # tokens sorted by expert, one matmul group per used expert
                counts = torch.bincount(idx, minlength=self.num_experts).tolist()  # one host sync per layer
                order = torch.argsort(idx, stable=True)  # (N,)
                grouped = flat_x.index_select(0, order)
                pieces, start = [], 0
                for k, count in enumerate(counts):
                    if count:
                        pieces.append(self._block_forward(self._expert_block(k), grouped[start:start + count]))
                        start += count
                y = torch.cat(pieces)  # (N, D) in sorted order
                out = torch.empty_like(flat_x).index_copy_(0, order, y) if out is None else out.index_add_(0, order, y)
        if self.down_bias is not None:
            out = out + self.down_bias
        return out.view(shape)
