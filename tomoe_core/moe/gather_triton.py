"""Triton (CUDA) backend of the indexed layout's gather kernels; see `gather_kernels` for the contract.

Legend: T = tokens, D = hidden size, U = union channels, BC / BD = channel / hidden block sizes.

Each program handles one token and a block of channels (gate/up) or of hidden units (down). It
reads the token's expert id and the channels' expert bitmask from device memory and masks every
weight load by membership, so rows outside the token's expert are never fetched and the host
never reads the routing (no synchronisation per layer). Accumulation is in float32.

Importable without triton (AVAILABLE is then False and `gather_kernels` uses another backend).
"""
from __future__ import annotations

import importlib

import torch

try:  # imported by name so that tools listing this module's imports see only torch (export copies it)
    triton = importlib.import_module("triton")
    tl = importlib.import_module("triton.language")
    AVAILABLE = True
except ImportError:  # CPU-only installs
    triton = tl = None
    AVAILABLE = False

BLOCK_C = 32
BLOCK_D = 64

if AVAILABLE:

    @triton.jit
    def _gate_up_kernel(gate_ptr, up_ptr, x_ptr, expert_ptr, bits_ptr, g_ptr, u_ptr, U, D,
                        HAS_GATE: tl.constexpr, BC: tl.constexpr, BD: tl.constexpr):
        t = tl.program_id(0)
        c = tl.program_id(1) * BC + tl.arange(0, BC)  # (BC,)
        in_union = c < U
        e = tl.load(expert_ptr + t)
        bits = tl.load(bits_ptr + c, mask=in_union, other=0)
        member = (((bits >> e) & 1) != 0) & in_union  # (BC,)
        acc_u = tl.zeros([BC], dtype=tl.float32)
        acc_g = tl.zeros([BC], dtype=tl.float32)
        for d0 in range(0, D, BD):
            d = d0 + tl.arange(0, BD)  # (BD,)
            in_d = d < D
            xv = tl.load(x_ptr + t * D + d, mask=in_d, other=0.0).to(tl.float32)
            rows = member[:, None] & in_d[None, :]  # (BC, BD): loads outside the expert are skipped
            offs = c[:, None].to(tl.int64) * D + d[None, :]
            w = tl.load(up_ptr + offs, mask=rows, other=0.0).to(tl.float32)
            acc_u += tl.sum(w * xv[None, :], axis=1)
            if HAS_GATE:
                w = tl.load(gate_ptr + offs, mask=rows, other=0.0).to(tl.float32)
                acc_g += tl.sum(w * xv[None, :], axis=1)
        tl.store(u_ptr + t * U + c, acc_u, mask=in_union)
        if HAS_GATE:
            tl.store(g_ptr + t * U + c, acc_g, mask=in_union)

    @triton.jit
    def _down_kernel(down_t_ptr, a_ptr, expert_ptr, bits_ptr, y_ptr, U, D, BC: tl.constexpr, BD: tl.constexpr):
        t = tl.program_id(0)
        d = tl.program_id(1) * BD + tl.arange(0, BD)  # (BD,)
        in_d = d < D
        e = tl.load(expert_ptr + t)
        acc = tl.zeros([BD], dtype=tl.float32)
        for c0 in range(0, U, BC):
            c = c0 + tl.arange(0, BC)  # (BC,)
            in_union = c < U
            bits = tl.load(bits_ptr + c, mask=in_union, other=0)
            member = (((bits >> e) & 1) != 0) & in_union
            av = tl.load(a_ptr + t * U + c, mask=member, other=0.0).to(tl.float32)  # (BC,)
            w = tl.load(down_t_ptr + c[:, None].to(tl.int64) * D + d[None, :],
                        mask=member[:, None] & in_d[None, :], other=0.0).to(tl.float32)  # (BC, BD)
            acc += tl.sum(av[:, None] * w, axis=0)
        tl.store(y_ptr + t * D + d, acc, mask=in_d)


def gate_up(gate, up, x, expert, channel_experts):  # -> g, u (T, U) float32 (g None for a plain MLP)
    assert AVAILABLE
    T, D = x.shape
    U = up.shape[0]
    x = x.contiguous()
    u = torch.empty(T, U, dtype=torch.float32, device=x.device)
    g = torch.empty_like(u) if gate is not None else None
    grid = (T, triton.cdiv(U, BLOCK_C))
    _gate_up_kernel[grid](gate if gate is not None else up, up, x, expert, channel_experts, g if g is not None else u,
                          u, U, D, HAS_GATE=gate is not None, BC=BLOCK_C, BD=BLOCK_D)
    return g, u


def down(down_t, a, expert, channel_experts):  # -> y (T, D) float32
    assert AVAILABLE
    T, U = a.shape
    D = down_t.shape[1]
    a = a.contiguous()
    y = torch.empty(T, D, dtype=torch.float32, device=a.device)
    grid = (T, triton.cdiv(D, BLOCK_D))
    _down_kernel[grid](down_t, a, expert, channel_experts, y, U, D, BC=BLOCK_C, BD=BLOCK_D)
    return y
