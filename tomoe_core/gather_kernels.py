"""Fused gather kernels of the "indexed" MoE layout: each token reads only its expert's weight rows.

Legend: T = tokens, D = hidden size, U = union channels of a layer, E = experts (<= 63).

The layout keeps one copy of a layer's union weights, every matrix with a channel per row:
`gate`, `up` (U, D) as saved and `down_t` (U, D), the down projection transposed. A channel's
experts are a bitmask, `channel_experts` (U,) int64 (bit e set when expert e uses the channel).
Two operations then compute the expert MLP of T tokens, each token with its own expert:

  gate_up(gate, up, x, expert, channel_experts) -> g, u   (T, U) float32
      g[t, c] = gate[c] . x[t] where the token's expert uses channel c, else 0 (u alike)
  down(down_t, a, expert, channel_experts) -> y            (T, D) float32
      y[t] = sum over the token's channels c of a[t, c] * down_t[c]

A weight row that no token in the call needs is never read, and a row that several tokens need
is read once for all of them: batch-1 decode reads its expert's rows, a batch reads the union of
its tokens' experts. Nothing is copied and nothing is read back to the host (the expert ids stay
in the tensor the kernel reads).

Backends, fastest available first (`backend()` says which runs):
  * "cpu-c":  a small C library compiled with the system C compiler on first use (OpenMP, the
              torch thread count), cached under cache/kernels/ by source and CPU; float32 and
              bfloat16 weights, float32 accumulation. TOMOE_GATHER_KERNEL=0 disables it.
  * "triton": CUDA kernels, when triton is importable and the tensors are on a GPU.
  * "torch":  pure torch, any device: the gate/up of the whole union masked per token (reads the
              union) and `embedding_bag` over the token's expert rows for the down projection
              (reads only those rows). The reference the others are tested against.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from . import gather_triton
from .gather_triton import AVAILABLE as TRITON_AVAILABLE  # this form is what export (custom_object_save) follows

MAX_EXPERTS = 63  # bits of the int64 channel_experts mask

C_SOURCE = r"""
#include <stdint.h>

static inline float bf16_to_f32(uint16_t v) {
    union { uint32_t u; float f; } c;
    c.u = ((uint32_t)v) << 16;
    return c.f;
}
#define LOAD_F32(v) (v)
#define LOAD_BF16(v) bf16_to_f32(v)

/* Dot products of a weight row with x: LANES independent partial sums, so the FMAs do not
   wait on one another (a single running sum is bound by the FMA latency, not by memory). */
#define LANES 32

/* gate may be NULL (plain MLP: out_gate untouched). Rows run in parallel over channels. */
#define DEFINE_GATE_UP(NAME, WT, LOAD)                                                          \
void NAME(const WT* gate, const WT* up, const float* x, const int64_t* expert,                  \
          const int64_t* channel_experts, int64_t T, int64_t D, int64_t U,                      \
          float* out_gate, float* out_up, int nthreads) {                                       \
    uint64_t wanted = 0;                                                                        \
    for (int64_t t = 0; t < T; t++) wanted |= 1ULL << expert[t];                               \
    _Pragma("omp parallel for schedule(static) num_threads(nthreads) if(nthreads > 1)")         \
    for (int64_t c = 0; c < U; c++) {                                                           \
        uint64_t users = (uint64_t)channel_experts[c];                                          \
        const WT* urow = up + c * D;                                                            \
        const WT* grow = gate ? gate + c * D : 0;                                               \
        for (int64_t t = 0; t < T; t++) {                                                       \
            float su = 0.f, sg = 0.f;                                                           \
            if ((users & wanted) && ((users >> expert[t]) & 1ULL)) {                            \
                const float* xt = x + t * D;                                                    \
                float au[LANES] = {0}, ag[LANES] = {0};                                         \
                int64_t d = 0;                                                                  \
                for (; d + LANES <= D; d += LANES) {                                            \
                    _Pragma("omp simd")                                                         \
                    for (int k = 0; k < LANES; k++) au[k] += LOAD(urow[d + k]) * xt[d + k];     \
                    if (grow) {                                                                 \
                        _Pragma("omp simd")                                                     \
                        for (int k = 0; k < LANES; k++) ag[k] += LOAD(grow[d + k]) * xt[d + k]; \
                    }                                                                           \
                }                                                                               \
                for (; d < D; d++) {                                                            \
                    au[0] += LOAD(urow[d]) * xt[d];                                             \
                    if (grow) ag[0] += LOAD(grow[d]) * xt[d];                                   \
                }                                                                               \
                for (int k = 0; k < LANES; k++) { su += au[k]; sg += ag[k]; }                   \
            }                                                                                   \
            out_up[t * U + c] = su;                                                             \
            if (grow) out_gate[t * U + c] = sg;                                                 \
        }                                                                                       \
    }                                                                                           \
}

/* Threads split the hidden dimension: each owns out[:, d0:d1], so no reduction between them.
   Channels go in blocks of CBLOCK (rows of a block stay in cache while every token of the call
   uses them); a token adds its rows four at a time, so out[t] is loaded and stored once per four. */
#define CBLOCK 64
#define DEFINE_DOWN(NAME, WT, LOAD)                                                             \
void NAME(const WT* down_t, const float* a, const int64_t* expert,                             \
          const int64_t* channel_experts, int64_t T, int64_t D, int64_t U,                      \
          float* out, int nthreads) {                                                           \
    uint64_t wanted = 0;                                                                        \
    for (int64_t t = 0; t < T; t++) wanted |= 1ULL << expert[t];                               \
    int64_t chunks = nthreads > 1 ? nthreads : 1;                                               \
    int64_t step = ((D + chunks - 1) / chunks + 15) / 16 * 16;                                  \
    _Pragma("omp parallel for schedule(static) num_threads(nthreads) if(nthreads > 1)")         \
    for (int64_t j = 0; j < chunks; j++) {                                                      \
        int64_t d0 = j * step, d1 = d0 + step < D ? d0 + step : D;                              \
        for (int64_t t = 0; t < T; t++)                                                         \
            for (int64_t d = d0; d < d1; d++) out[t * D + d] = 0.f;                             \
        for (int64_t c0 = 0; c0 < U; c0 += CBLOCK) {                                            \
            int64_t c1 = c0 + CBLOCK < U ? c0 + CBLOCK : U;                                     \
            for (int64_t t = 0; t < T; t++) {                                                   \
                float* yt = out + t * D;                                                        \
                const WT* rows[4];                                                              \
                float coef[4];                                                                  \
                int n = 0;                                                                      \
                for (int64_t c = c0; c < c1; c++) {                                             \
                    if (!(((uint64_t)channel_experts[c] >> expert[t]) & 1ULL)) continue;        \
                    rows[n] = down_t + c * D;                                                   \
                    coef[n++] = a[t * U + c];                                                   \
                    if (n == 4) {                                                               \
                        const WT *r0 = rows[0], *r1 = rows[1], *r2 = rows[2], *r3 = rows[3];    \
                        float a0 = coef[0], a1 = coef[1], a2 = coef[2], a3 = coef[3];           \
                        _Pragma("omp simd")                                                     \
                        for (int64_t d = d0; d < d1; d++)                                       \
                            yt[d] += a0 * LOAD(r0[d]) + a1 * LOAD(r1[d])                        \
                                   + a2 * LOAD(r2[d]) + a3 * LOAD(r3[d]);                       \
                        n = 0;                                                                  \
                    }                                                                           \
                }                                                                               \
                for (int i = 0; i < n; i++) {                                                   \
                    const WT* r = rows[i];                                                      \
                    float ai = coef[i];                                                         \
                    _Pragma("omp simd")                                                         \
                    for (int64_t d = d0; d < d1; d++) yt[d] += ai * LOAD(r[d]);                 \
                }                                                                               \
            }                                                                                   \
        }                                                                                       \
    }                                                                                           \
}

DEFINE_GATE_UP(tomoe_gate_up_f32, float, LOAD_F32)
DEFINE_GATE_UP(tomoe_gate_up_bf16, uint16_t, LOAD_BF16)
DEFINE_DOWN(tomoe_down_f32, float, LOAD_F32)
DEFINE_DOWN(tomoe_down_bf16, uint16_t, LOAD_BF16)
"""

_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}
_library: ctypes.CDLL | None = None
_library_error: str | None = None
_library_tried = False


def _kernel_dir() -> Path:
    # tomoe_core.data.cache_dir(), restated: this module must stay importable on its own (export copies it)
    root = os.environ.get("TOMOE_CACHE")
    return (Path(root) if root else Path(__file__).resolve().parent.parent / "cache") / "kernels"


def _cpu_signature() -> str:
    """What -march=native compiled for: the CPU's flags, so a cache shared between machines stays right."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return f"{platform.machine()} {platform.processor()} {flags}"


def _compile(target: Path) -> None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc/gcc) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src, out = Path(tmp) / "gather.c", Path(tmp) / target.name
        src.write_text(C_SOURCE)
        cmd = [compiler, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", str(src), "-o", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr[-800:]}")
        os.replace(out, target)  # atomic: a concurrent process sees the old file or the whole new one


def _load_library() -> ctypes.CDLL | None:
    global _library, _library_error, _library_tried
    if _library_tried:
        return _library
    _library_tried = True
    if os.environ.get("TOMOE_GATHER_KERNEL", "1") == "0":
        _library_error = "disabled by TOMOE_GATHER_KERNEL=0"
        return None
    if sys.platform != "linux":
        _library_error = f"the C kernel is built on Linux only (this is {sys.platform})"
        return None
    digest = hashlib.sha256((C_SOURCE + _cpu_signature()).encode()).hexdigest()[:16]
    target = _kernel_dir() / f"tomoe_gather_{digest}.so"
    try:
        if not target.exists():
            _compile(target)
        # torch already loaded libgomp.so.1: the library shares its OpenMP runtime and thread pool
        lib = ctypes.CDLL(str(target))
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        _library_error = str(err)
        warnings.warn(f"tomoe_core: the indexed layout's C kernel is unavailable ({err}); using the pure-torch "
                      "path (about dense speed)", RuntimeWarning, stacklevel=3)
        return None
    ptr, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    for suffix in _SUFFIX.values():
        getattr(lib, f"tomoe_gate_up_{suffix}").argtypes = [ptr, ptr, ptr, ptr, ptr, i64, i64, i64, ptr, ptr, i32]
        getattr(lib, f"tomoe_down_{suffix}").argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, ptr, i32]
    _library = lib
    return lib


def backend(weight: torch.Tensor) -> str:
    """The backend that runs for weights like `weight` (see the module docstring)."""
    if weight.device.type == "cpu" and weight.dtype in _SUFFIX and _load_library() is not None:
        return "cpu-c"
    if weight.device.type == "cuda" and TRITON_AVAILABLE:
        return "triton"
    return "torch"


def kernel_unavailable_reason() -> str | None:
    _load_library()
    return _library_error


def _checked(expert: torch.Tensor, channel_experts: torch.Tensor) -> None:
    assert expert.dtype == torch.long and channel_experts.dtype == torch.long
    assert expert.is_contiguous() and channel_experts.is_contiguous()


# -- the pure-torch reference ---------------------------------------------------------------------------
def member_mask(expert: torch.Tensor, union_masks: torch.Tensor) -> torch.Tensor:
    """(T,) expert ids, (E, U) 0/1 masks -> (T, U) 0/1 in the masks' dtype."""
    return union_masks.index_select(0, expert)


def gate_up_torch(gate, up, x, member):  # (U, D) x2, (T, D), (T, U) -> (T, U) x2 in x's dtype
    u = F.linear(x, up) * member
    return (F.linear(x, gate) * member if gate is not None else None), u


def down_torch(down_t, a, expert, expert_table, expert_valid):
    """embedding_bag reads only the token's expert rows.  expert_table (E, W) union positions
    padded with 0, expert_valid (E, W) 0/1 in a's dtype.  -> (T, D)"""
    table = expert_table.index_select(0, expert)  # (T, W)
    weights = a.gather(1, table) * expert_valid.index_select(0, expert)  # (T, W), 0 at the padding
    return F.embedding_bag(table.reshape(-1), down_t, offsets=torch.arange(0, table.numel(), table.shape[1],
                                                                          device=table.device),
                           mode="sum", per_sample_weights=weights.reshape(-1).to(down_t.dtype))


# -- dispatch -----------------------------------------------------------------------------------------------
def gate_up(gate, up, x, expert, channel_experts, union_masks, use: str | None = None):
    """-> g, u (T, U) in x's dtype (g None for a plain MLP); see the module docstring."""
    use = use or backend(up)
    if use == "torch":
        return gate_up_torch(gate, up, x, member_mask(expert, union_masks))
    _checked(expert, channel_experts)
    T, D = x.shape
    U = up.shape[0]
    if use == "triton":
        g, u = gather_triton.gate_up(gate, up, x, expert, channel_experts)
    else:
        assert use == "cpu-c" and up.is_contiguous() and (gate is None or gate.is_contiguous()), use
        lib = _load_library()
        xf = x.float().contiguous()
        u = torch.empty(T, U, dtype=torch.float32)
        g = torch.empty(T, U, dtype=torch.float32) if gate is not None else None
        getattr(lib, f"tomoe_gate_up_{_SUFFIX[up.dtype]}")(
            gate.data_ptr() if gate is not None else None, up.data_ptr(), xf.data_ptr(), expert.data_ptr(),
            channel_experts.data_ptr(), T, D, U, g.data_ptr() if g is not None else None, u.data_ptr(),
            torch.get_num_threads())
    return (g.to(x.dtype) if g is not None else None), u.to(x.dtype)  # rounded as a linear in x's dtype would


def down(down_t, a, expert, channel_experts, expert_table, expert_valid, use: str | None = None):
    """-> y (T, D) in a's dtype; see the module docstring."""
    use = use or backend(down_t)
    if use == "torch":
        return down_torch(down_t, a, expert, expert_table, expert_valid)
    _checked(expert, channel_experts)
    T, U = a.shape
    D = down_t.shape[1]
    if use == "triton":
        y = gather_triton.down(down_t, a, expert, channel_experts)
    else:
        assert use == "cpu-c" and down_t.is_contiguous(), use
        lib = _load_library()
        af = a.float().contiguous()
        y = torch.empty(T, D, dtype=torch.float32)
        getattr(lib, f"tomoe_down_{_SUFFIX[down_t.dtype]}")(
            down_t.data_ptr(), af.data_ptr(), expert.data_ptr(), channel_experts.data_ptr(), T, D, U, y.data_ptr(),
            torch.get_num_threads())
    return y.to(a.dtype)
