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

For gated MLPs with a SiLU or GELU activation the C backend runs both in one call, `mlp` (gate,
up, activation and down; threads split the channels, meet at a barrier, then split the hidden
entries), so a decode step costs one call per layer and no (T, U) tensors in torch.

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
import string
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from . import gather_triton
from .gather_triton import AVAILABLE as TRITON_AVAILABLE

MAX_EXPERTS = 63  # bits of the int64 channel_experts mask

C_SOURCE_HEAD = r"""
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* 16 float lanes (one AVX-512 register, two AVX2 ones; GCC lowers the vector type to the ISA). */
typedef float v16 __attribute__((vector_size(64), aligned(4)));
typedef uint16_t v16h __attribute__((vector_size(32), aligned(2)));
typedef uint32_t v16u __attribute__((vector_size(64)));

static inline v16 load_f32(const float* p) { return *(const v16*)p; }
static inline v16 load_bf16(const uint16_t* p) {
    v16u w = __builtin_convertvector(*(const v16h*)p, v16u) << 16;
    v16 f;
    memcpy(&f, &w, sizeof f);
    return f;
}
static inline float one_f32(float v) { return v; }
static inline float one_bf16(uint16_t v) {
    uint32_t u = ((uint32_t)v) << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}
static inline float hsum16(v16 v) {  /* once per row and token: plain code, any GCC >= 9 or clang */
    float s[16];
    memcpy(s, &v, sizeof s);
    float a = 0.f, b = 0.f, c = 0.f, d = 0.f;
    for (int i = 0; i < 16; i += 4) { a += s[i]; b += s[i + 1]; c += s[i + 2]; d += s[i + 3]; }
    return (a + b) + (c + d);
}

#define CBLOCK 64 /* channels per block of the down projection (see down_rows) */

/* act codes of tomoe_mlp: 1 silu, 2 gelu (tanh approximation), 3 gelu (erf) */
static inline float activate(float g, int act) {
    if (act == 1) return g / (1.f + expf(-g));
    if (act == 2) return 0.5f * g * (1.f + tanhf(0.7978845608028654f * (g + 0.044715f * g * g * g)));
    return 0.5f * g * (1.f + erff(g * 0.7071067811865476f));
}

static inline uint64_t wanted_of(const int64_t* expert, int64_t T) {
    uint64_t wanted = 0;
    for (int64_t t = 0; t < T; t++) wanted |= 1ULL << expert[t];
    return wanted;
}

static inline int64_t next_used(const int64_t* channel_experts, uint64_t wanted, int64_t c, int64_t end) {
    while (c < end && !((uint64_t)channel_experts[c] & wanted)) c++;
    return c;
}

static inline void thread_share(int64_t n, int64_t align, int64_t* lo, int64_t* hi) {
    int nt = 1, id = 0;
#ifdef _OPENMP
    nt = omp_get_num_threads();
    id = omp_get_thread_num();
#endif
    int64_t step = ((n + nt - 1) / nt + align - 1) / align * align;
    *lo = id * step < n ? id * step : n;
    *hi = *lo + step < n ? *lo + step : n;
}
"""

# One instantiation per weight type ($WT, $SFX); float32 accumulation throughout.
C_SOURCE_TEMPLATE = r"""
/* g = gate_row . x and u = up_row . x; gate_row may be NULL. Two accumulators per matrix so the
   FMAs do not wait on one another; x stays in L1 for every row of the call. */
static inline void dot2_$SFX(const $WT* grow, const $WT* urow, const float* x, int64_t D, float* g, float* u) {
    v16 au0 = {0}, au1 = {0}, ag0 = {0}, ag1 = {0};
    int64_t d = 0;
    for (; d + 32 <= D; d += 32) {
        v16 x0 = load_f32(x + d), x1 = load_f32(x + d + 16);
        au0 += load_$SFX(urow + d) * x0;
        au1 += load_$SFX(urow + d + 16) * x1;
        if (grow) {
            ag0 += load_$SFX(grow + d) * x0;
            ag1 += load_$SFX(grow + d + 16) * x1;
        }
    }
    for (; d + 16 <= D; d += 16) {
        v16 x0 = load_f32(x + d);
        au0 += load_$SFX(urow + d) * x0;
        if (grow) ag0 += load_$SFX(grow + d) * x0;
    }
    float su = hsum16(au0 + au1), sg = hsum16(ag0 + ag1);
    for (; d < D; d++) {
        su += one_$SFX(urow[d]) * x[d];
        if (grow) sg += one_$SFX(grow[d]) * x[d];
    }
    *u = su;
    *g = sg;
}

/* Phase 1 over channels [c0, c1): for each channel some token's expert uses, each such token's
   dot products. act == 0: g and u out (0 where the token's expert does not use the channel);
   act > 0: a = act(g) * u into out_up only, and only where used (phase 2 reads nothing else). */
static void channels_$SFX(const $WT* gate, const $WT* up, const float* x, const int64_t* expert,
                          const int64_t* channel_experts, uint64_t wanted, int64_t T, int64_t D, int64_t U,
                          int64_t c0, int64_t c1, int act, float* out_gate, float* out_up) {
    if (act == 0) {
        for (int64_t t = 0; t < T; t++) {
            memset(out_up + t * U + c0, 0, sizeof(float) * (c1 - c0));
            if (gate) memset(out_gate + t * U + c0, 0, sizeof(float) * (c1 - c0));
        }
    }
    for (int64_t c = next_used(channel_experts, wanted, c0, c1); c < c1;
         c = next_used(channel_experts, wanted, c + 1, c1)) {
        uint64_t users = (uint64_t)channel_experts[c];
        const $WT* urow = up + c * D;
        const $WT* grow = gate ? gate + c * D : 0;
        for (int64_t t = 0; t < T; t++) {
            if (!((users >> expert[t]) & 1ULL)) continue;
            float g, u;
            dot2_$SFX(grow, urow, x + t * D, D, &g, &u);
            if (act) {
                out_up[t * U + c] = activate(g, act) * u;
            } else {
                out_up[t * U + c] = u;
                if (gate) out_gate[t * U + c] = g;
            }
        }
    }
}

/* Phase 2 over hidden entries [d0, d1): out[t] = sum over the token's channels c of a[t, c] * down_t[c].
   Channels go in blocks of CBLOCK (the block's rows stay in cache while every token of the call
   uses them); a token adds its rows four at a time, so out[t] is loaded and stored once per four. */
static void down_rows_$SFX(const $WT* down_t, const float* a, const int64_t* expert,
                           const int64_t* channel_experts, int64_t T, int64_t D, int64_t U,
                           int64_t d0, int64_t d1, float* out) {
    for (int64_t t = 0; t < T; t++)
        for (int64_t d = d0; d < d1; d++) out[t * D + d] = 0.f;
    for (int64_t b0 = 0; b0 < U; b0 += CBLOCK) {
        int64_t b1 = b0 + CBLOCK < U ? b0 + CBLOCK : U;
        for (int64_t t = 0; t < T; t++) {
            float* yt = out + t * D;
            const $WT* rows[4];
            float coef[4];
            int n = 0;
            for (int64_t c = b0; c < b1; c++) {
                if (!(((uint64_t)channel_experts[c] >> expert[t]) & 1ULL)) continue;
                rows[n] = down_t + c * D;
                coef[n++] = a[t * U + c];
                if (n == 4) {
                    const $WT *r0 = rows[0], *r1 = rows[1], *r2 = rows[2], *r3 = rows[3];
                    float a0 = coef[0], a1 = coef[1], a2 = coef[2], a3 = coef[3];
                    _Pragma("omp simd")
                    for (int64_t d = d0; d < d1; d++)
                        yt[d] += a0 * one_$SFX(r0[d]) + a1 * one_$SFX(r1[d])
                               + a2 * one_$SFX(r2[d]) + a3 * one_$SFX(r3[d]);
                    n = 0;
                }
            }
            for (int i = 0; i < n; i++) {
                const $WT* r = rows[i];
                float ai = coef[i];
                _Pragma("omp simd")
                for (int64_t d = d0; d < d1; d++) yt[d] += ai * one_$SFX(r[d]);
            }
        }
    }
}

void tomoe_gate_up_$SFX(const $WT* gate, const $WT* up, const float* x, const int64_t* expert,
                        const int64_t* channel_experts, int64_t T, int64_t D, int64_t U,
                        float* out_gate, float* out_up, int nthreads) {
    uint64_t wanted = wanted_of(expert, T);
    _Pragma("omp parallel num_threads(nthreads) if(nthreads > 1)")
    {
        int64_t c0, c1;
        thread_share(U, 16, &c0, &c1);
        channels_$SFX(gate, up, x, expert, channel_experts, wanted, T, D, U, c0, c1, 0, out_gate, out_up);
    }
}

void tomoe_down_$SFX(const $WT* down_t, const float* a, const int64_t* expert, const int64_t* channel_experts,
                     int64_t T, int64_t D, int64_t U, float* out, int nthreads) {
    _Pragma("omp parallel num_threads(nthreads) if(nthreads > 1)")
    {
        int64_t d0, d1;
        thread_share(D, 16, &d0, &d1);
        down_rows_$SFX(down_t, a, expert, channel_experts, T, D, U, d0, d1, out);
    }
}

/* The whole gated expert MLP in one call: threads split the channels, meet at a barrier, then
   split the hidden entries. scratch: T x U floats, written and read only where used. */
void tomoe_mlp_$SFX(const $WT* gate, const $WT* up, const $WT* down_t, const float* x, const int64_t* expert,
                    const int64_t* channel_experts, int64_t T, int64_t D, int64_t U, int act,
                    float* scratch, float* out, int nthreads) {
    uint64_t wanted = wanted_of(expert, T);
    _Pragma("omp parallel num_threads(nthreads) if(nthreads > 1)")
    {
        int64_t lo, hi;
        thread_share(U, 16, &lo, &hi);
        channels_$SFX(gate, up, x, expert, channel_experts, wanted, T, D, U, lo, hi, act, 0, scratch);
        _Pragma("omp barrier")
        thread_share(D, 16, &lo, &hi);
        down_rows_$SFX(down_t, scratch, expert, channel_experts, T, D, U, lo, hi, out);
    }
}
"""

C_SOURCE = C_SOURCE_HEAD + "".join(string.Template(C_SOURCE_TEMPLATE).substitute(WT=wt, SFX=sfx)
                                   for wt, sfx in (("float", "f32"), ("uint16_t", "bf16")))


_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}
_library: ctypes.CDLL | None = None
_library_error: str | None = None
_library_tried = False


def _kernel_dir() -> Path:
    # tomoe_core.infra.locations.cache_dir(), restated: this module must stay importable on its own (export copies it)
    root = os.environ.get("TOMOE_CACHE")
    return (Path(root) if root else Path(__file__).resolve().parents[2] / "cache") / "kernels"


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
        cmd = [compiler, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", str(src), "-o", str(out), "-lm"]
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
        getattr(lib, f"tomoe_mlp_{suffix}").argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i32, ptr, ptr,
                                                         i32]
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


# -- the whole expert MLP in one call (C backend, gated MLPs) ------------------------------------------
_ACT_REFERENCES = {  # code in the C source -> the function it computes
    1: F.silu,
    2: lambda z: F.gelu(z, approximate="tanh"),
    3: F.gelu,
}


def activation_code(act) -> int:
    """The C kernel's code for the activation module `act` (1 silu, 2 gelu-tanh, 3 gelu-erf), found by
    evaluating it rather than by its class name (every family names its activations differently);
    0 when it is none of them (the two-call path then applies it in torch)."""
    z = torch.linspace(-8, 8, 513)
    try:
        with torch.no_grad():
            got = act(z)
    except Exception:  # an activation that cannot run on a plain CPU tensor: not one we fuse
        return 0
    for code, ref in _ACT_REFERENCES.items():
        if got.shape == z.shape and torch.allclose(got, ref(z), atol=1e-6, rtol=1e-5):
            return code
    return 0


def mlp(gate, up, down_t, x, expert, channel_experts, act_code: int):
    """The gated expert MLP of T tokens in one C call: y[t] = sum over the token's channels c of
    act(gate_c . x_t) * (up_c . x_t) * down_t[c].  gate, up, down_t (U, D) contiguous; x (T, D).
    -> y (T, D) in x's dtype. Only the "cpu-c" backend; callers check `backend` and `act_code`."""
    _checked(expert, channel_experts)
    assert act_code in _ACT_REFERENCES and gate is not None, act_code
    assert up.is_contiguous() and gate.is_contiguous() and down_t.is_contiguous()
    lib = _load_library()
    T, D = x.shape
    U = up.shape[0]
    xf = x.float().contiguous()
    scratch = torch.empty(T, U, dtype=torch.float32)
    y = torch.empty(T, D, dtype=torch.float32)
    getattr(lib, f"tomoe_mlp_{_SUFFIX[up.dtype]}")(
        gate.data_ptr(), up.data_ptr(), down_t.data_ptr(), xf.data_ptr(), expert.data_ptr(),
        channel_experts.data_ptr(), T, D, U, act_code, scratch.data_ptr(), y.data_ptr(), torch.get_num_threads())
    return y.to(x.dtype)
