"""Every MoE layout computes the masked model's function, on every family, on every code path.

Paths of `MoEMLP.forward`: batch-1 decode, few tokens (shared: whole union masked; indexed: the
gather kernels), many tokens (sorted by expert, one matmul per used expert), core + extras on
top of each. The indexed layout runs with its fastest backend (the C kernel on CPU where a
compiler exists) and with the pure-torch fallback.
"""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tomoe_core import MaskedModel, load_converted, materialise, save_converted
from tomoe_core.moe import gather_kernels
from tomoe_core.moe.layer import LAYOUTS, MoEMLP
from tiny_models import FAMILIES, tiny_ids, tiny_model

E = 4
GATHER_MIN_TOKENS = 32  # the shared layout's gather path, reachable with tiny inputs


@pytest.fixture(autouse=True)
def low_gather_threshold(monkeypatch):
    monkeypatch.setattr(MoEMLP, "shared_gather_min_tokens", GATHER_MIN_TOKENS)
    monkeypatch.setattr(MoEMLP, "indexed_grouped_min_tokens", GATHER_MIN_TOKENS)


def expert_masks(model: MaskedModel, seed: int = 0) -> list[torch.Tensor]:
    """Random (E, I) masks with a core every expert shares, an expert that is only the core,
    an expert with every channel, and channels no expert uses."""
    g = torch.Generator().manual_seed(seed)
    masks = []
    for size in model.intermediate_sizes:
        m = (torch.rand(E, size, generator=g) < 0.5).float()
        m[:, : size // 4] = 1  # core
        m[1, size // 4:] = 0  # expert 1 is the core alone
        m[2] = 1  # expert 2 has everything
        m[:, -3:] = 0  # never used: deleted by materialisation
        m[2, -3:] = 0
        masks.append(m)
    return masks


def build(family: str, dtype: torch.dtype = torch.float32):
    # cast before wrapping: MaskedMLP keeps views of the fused/transposed weights (phi3, gpt2)
    masked = MaskedModel(tiny_model(family).to(dtype), num_experts=E)
    torch.manual_seed(1)
    with torch.no_grad():  # routers that spread tokens over all experts
        for m in masked.mlps:
            m.router.weight.normal_(0, 3.0)
            m.router.to(dtype)
    masks = expert_masks(masked)
    moe = materialise(masked, masks, budget=0.5)
    masked.set_masks(masks)
    return masked, moe


def many_tokens_ids() -> torch.Tensor:
    ids = tiny_ids(batch=2, length=GATHER_MIN_TOKENS)  # 64 tokens: the grouped path in every layout
    assert ids.numel() >= GATHER_MIN_TOKENS
    return ids


@pytest.mark.parametrize("family", FAMILIES)
def test_every_layout_matches_masked_model(family):
    masked, moe = build(family)
    inputs = {"many": many_tokens_ids(), "few": tiny_ids(batch=1, length=5), "one": tiny_ids(batch=1, length=1)}
    with torch.no_grad():
        reference = {k: masked.model(input_ids=ids).logits for k, ids in inputs.items()}
        for layout in LAYOUTS:
            assert moe.set_layout(layout) == layout
            for k, ids in inputs.items():
                torch.testing.assert_close(moe(input_ids=ids).logits, reference[k], msg=f"{layout}, {k} tokens")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_layouts_match_during_cached_decode(family):
    masked, moe = build(family)
    prompt = tiny_ids(batch=1, length=6)
    with torch.no_grad():
        ref = masked.model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8,
                                    do_sample=False, pad_token_id=0)
        for layout in LAYOUTS:
            moe.set_layout(layout)
            out = moe.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8,
                               do_sample=False, pad_token_id=0)
            assert out.tolist() == ref.tolist(), layout


def test_every_expert_used_and_routing_hooks_see_the_same_choice():
    masked, moe = build("llama")
    ids = many_tokens_ids()
    seen = {}
    for layout in LAYOUTS:
        moe.set_layout(layout)
        point = moe.moe_mlps[0].routing_point
        handle = point.register_forward_hook(lambda mod, args, out, layout=layout: seen.__setitem__(layout, out[0]))
        try:
            with torch.no_grad():
                moe(input_ids=ids)
        finally:
            handle.remove()
    assert torch.bincount(seen["shared"], minlength=E).min() > 0  # the test covers every expert
    for layout in LAYOUTS:
        assert torch.equal(seen[layout], seen["shared"])


@pytest.mark.parametrize("override", [2, "random"])
def test_routing_override_matches_masked_model(override):
    masked, moe = build("qwen2")
    ids = many_tokens_ids()
    with torch.no_grad():
        for layout in LAYOUTS:
            moe.set_layout(layout)
            masked.set_routing(override, torch.Generator().manual_seed(5))
            ref = masked.model(input_ids=ids).logits
            moe.set_routing(override, torch.Generator().manual_seed(5))
            torch.testing.assert_close(moe(input_ids=ids).logits, ref, msg=layout)


def test_union_is_core_first_and_maps_to_dense_channels():
    masked, moe = build("llama")
    masks = expert_masks(masked)
    for mlp, m in zip(moe.moe_mlps, masks):
        core = int(m.bool().all(0).sum())
        assert mlp.core_size() == core
        assert bool(m[:, mlp.union_channels[:core]].bool().all())
        for k in range(E):  # expert k's union positions name exactly its dense channels
            dense = set(mlp.union_channels[mlp.channels_of(k)].tolist())
            assert dense == set(m[k].nonzero().squeeze(-1).tolist())


def test_core_extras_reorders_an_unordered_union():
    """Conversions saved before the core-first order still get a zero-copy core."""
    masked, moe = build("llama")
    ids = many_tokens_ids()
    mlp = moe.moe_mlps[0]
    with torch.no_grad():
        ref = moe(input_ids=ids).logits
        perm = torch.randperm(mlp.union_size, generator=torch.Generator().manual_seed(0))
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(len(perm))
        mlp.up.data, mlp.gate.data, mlp.down.data = mlp.up.data[perm], mlp.gate.data[perm], mlp.down.data[:, perm]
        mlp.union_channels = mlp.union_channels[perm]
        mlp.expert_channels = inverse[mlp.expert_channels]
        moe.set_layout("shared")
        torch.testing.assert_close(moe(input_ids=ids).logits, ref)
        moe.set_layout("core+extras")
        assert sorted(mlp.union_channels[: mlp.core_size()].tolist()) == masked.mlps[0].expert_masks.bool().all(0).nonzero().squeeze(-1).tolist()
        torch.testing.assert_close(moe(input_ids=ids).logits, ref)
        assert mlp._core.up.untyped_storage().data_ptr() == mlp.up.untyped_storage().data_ptr()  # a view
        shares = torch.bincount(mlp.expert_channels, minlength=mlp.union_size)
        assert bool((shares[1:] <= shares[:-1]).all())  # most shared first
        moe.set_layout("indexed")
        torch.testing.assert_close(moe(input_ids=ids).logits, ref)


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "phi", "gpt2"])
def test_indexed_prefill_runs_the_shared_prefix_masked(family):
    """Long calls run the channels most experts share as one view for every token, masked per token
    (wider than the core), and gather only the rest per expert: still the masked model's function."""
    masked, moe = build(family)
    moe.set_layout("indexed")
    wider = [m for m in moe.moe_mlps if m._core.up.shape[0] > m.core_size()]
    assert wider, "no layer's shared prefix is wider than its core: the masked path goes untested"
    for mlp in wider:
        prefix = mlp._core.up.shape[0]
        assert prefix > mlp.core_size()
        assert mlp._core.up.untyped_storage().data_ptr() == mlp.up.untyped_storage().data_ptr()  # a view
        shares = torch.bincount(mlp.expert_channels, minlength=mlp.union_size)
        assert int(shares[:prefix].min()) >= 0.75 * mlp.num_experts
    ids = many_tokens_ids()
    with torch.no_grad():
        torch.testing.assert_close(moe(input_ids=ids).logits, masked.model(input_ids=ids).logits)


def test_layout_memory_estimates_match_what_is_built():
    _, moe = build("llama")
    for layout in LAYOUTS:
        estimates = [m.layout_extra_bytes(layout) for m in moe.moe_mlps]
        moe.set_layout(layout)
        assert [m.layout_extra_bytes() for m in moe.moe_mlps] == estimates, layout
        assert moe.layout_bytes()["layout_extra_bytes"] == sum(estimates)
    assert moe.layout_bytes()["mlp_bytes"] > 0


def test_uses_pick_the_fastest_layout_that_fits():
    _, moe = build("llama")
    packed = sum(m.layout_extra_bytes("packed") for m in moe.moe_mlps)
    core = sum(m.layout_extra_bytes("core+extras") for m in moe.moe_mlps)
    assert core < packed
    assert moe.set_layout("decode", memory_limit_bytes=0) == "indexed"  # copy-free: fits anywhere
    assert moe.set_layout("auto") == "indexed"
    assert moe.set_layout("prefill", memory_limit_bytes=packed) == "core+extras"
    assert moe.set_layout("prefill", memory_limit_bytes=core - 1) == "indexed"
    assert moe.set_layout("memory") == "indexed"
    assert moe.layout == "indexed"
    with pytest.raises(ValueError, match="unknown layout"):
        moe.set_layout("fast")


def test_save_load_with_layout_reproduces(tmp_path):
    masked, moe = build("phi3")
    ids = many_tokens_ids()
    moe.set_layout("core+extras")  # permutes nothing (from_masks is core-first) but builds copies
    save_converted(moe, tmp_path / "conv")
    with torch.no_grad():
        ref = masked.model(input_ids=ids).logits
        for layout in (*LAYOUTS, "decode", "prefill"):
            loaded, _, _ = load_converted(tmp_path / "conv", layout=layout, load_tokenizer=False)
            torch.testing.assert_close(loaded(input_ids=ids).logits, ref, msg=layout)


def test_load_state_dict_refreshes_derived_weights():
    _, moe = build("llama")
    ids = many_tokens_ids()
    moe.set_layout("packed")
    with torch.no_grad():
        for mlp in moe.moe_mlps:
            state = mlp.state_dict()
            state["up"] = state["up"] * 2
            mlp.load_state_dict(state)  # the packed copies must follow
        packed = moe(input_ids=ids).logits
        moe.set_layout("shared")
        torch.testing.assert_close(packed, moe(input_ids=ids).logits)


def test_bfloat16_layouts_follow_dtype():
    masked, moe = build("llama")
    ids = many_tokens_ids()
    moe.set_layout("packed")
    moe = moe.to(torch.bfloat16)
    mlp = moe.moe_mlps[0]
    assert mlp._blocks[0].up.dtype == torch.bfloat16
    with torch.no_grad():
        ref = masked.model.float()(input_ids=ids).logits
        out = moe(input_ids=ids).logits.float()
    assert (out - ref).abs().mean() < 0.05 * ref.abs().mean()


def test_conversions_saved_without_union_ids_recover_them(tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    import tomoe_core.convert.dense
    from tomoe_core.moe.atomic import atomic_write_json, sha256_file

    masked, moe = build("llama")
    folder = save_converted(moe, tmp_path / "conv", metadata={"model": "tiny-llama"})
    weights = folder / "model.safetensors"
    state = {k: v for k, v in load_file(str(weights)).items() if not k.endswith("union_channels")}
    save_file(state, str(weights), metadata={"format": "pt"})
    meta = json.loads((folder / "tomoe.json").read_text())
    atomic_write_json(folder / "tomoe.json", {**meta, "weights_sha256": sha256_file(weights)})
    dense = tiny_model("llama")  # the same seed: the model the conversion was made from
    monkeypatch.setattr(tomoe_core.convert.dense, "load_dense", lambda name, **kw: (dense, None))
    loaded, _, _ = load_converted(folder, layout="core+extras", load_tokenizer=False)
    for a, b in zip(loaded.moe_mlps, moe.moe_mlps):
        assert sorted(a.union_channels.tolist()) == sorted(b.union_channels.tolist())
    ids = many_tokens_ids()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, masked.model(input_ids=ids).logits)


# -- the indexed layout ------------------------------------------------------------------------------------
@pytest.fixture(params=["fastest", "torch"])
def gather_backend(request, monkeypatch):
    """The indexed layout on its fastest backend here, and on the pure-torch fallback."""
    if request.param == "torch":
        monkeypatch.setattr(MoEMLP, "gather_backend", "torch")
    return request.param


def test_the_c_kernel_runs_where_a_compiler_exists():
    """Otherwise every 'fastest' test below would silently test the fallback twice."""
    if not (shutil.which("cc") or shutil.which("gcc")) or os.environ.get("TOMOE_GATHER_KERNEL") == "0":
        pytest.skip("no C compiler: the indexed layout runs its pure-torch fallback")
    assert gather_kernels.backend(torch.zeros(2, 2)) == "cpu-c", gather_kernels.kernel_unavailable_reason()
    assert gather_kernels.backend(torch.zeros(2, 2, dtype=torch.bfloat16)) == "cpu-c"


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 3, 16])
def test_gather_kernels_match_the_torch_reference(gated, dtype, tokens):
    backend = gather_kernels.backend(torch.zeros(1, dtype=dtype))
    if backend == "torch":
        pytest.skip("no compiled backend here")
    g = torch.Generator().manual_seed(tokens)
    E, U, D = 11, 203, 37  # odd sizes: every loop tail of the C kernel runs
    masks = torch.rand(E, U, generator=g) < 0.4
    masks[:, 0] = True
    masks[3] = False  # an expert with a single channel
    masks[3, 5] = True
    bits = (masks.long() << torch.arange(E)[:, None]).sum(0)  # (U,)
    widths = masks.sum(1)
    table = torch.zeros(E, int(widths.max()), dtype=torch.long)
    valid = torch.zeros(E, int(widths.max()), dtype=dtype)
    for k in range(E):
        table[k, : widths[k]] = masks[k].nonzero().squeeze(-1)
        valid[k, : widths[k]] = 1
    gate = torch.randn(U, D, generator=g).to(dtype) if gated else None
    up, down_t = torch.randn(U, D, generator=g).to(dtype), torch.randn(U, D, generator=g).to(dtype)
    x = torch.randn(tokens, D, generator=g).to(dtype)
    expert = torch.randint(E, (tokens,), generator=g)
    expert[0] = 3
    union_masks = masks.to(dtype)
    ref_g, ref_u = gather_kernels.gate_up(gate, up, x, expert, bits, union_masks, use="torch")
    out_g, out_u = gather_kernels.gate_up(gate, up, x, expert, bits, union_masks, use=backend)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_u, ref_u, **tol)
    assert (out_u[~masks[expert]] == 0).all()  # outside the token's expert: exactly zero
    if gated:
        torch.testing.assert_close(out_g, ref_g, **tol)
    a = torch.randn(tokens, U, generator=g).to(dtype) * union_masks[expert]
    ref_y = gather_kernels.down(down_t, a, expert, bits, table, valid, use="torch")
    torch.testing.assert_close(gather_kernels.down(down_t, a, expert, bits, table, valid, use=backend), ref_y, **tol)
    dense_y = (a.float() @ down_t.float()).to(dtype)  # the reference itself against a plain matmul
    torch.testing.assert_close(ref_y, dense_y, **tol)


@pytest.mark.parametrize("act_name", ["silu", "gelu_pytorch_tanh", "gelu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,threads", [(1, 1), (1, 2), (5, 2), (16, 1)])
def test_fused_expert_mlp_kernel_matches_the_two_call_reference(act_name, dtype, tokens, threads):
    """tomoe_mlp (gate, up, activation and down in one C call) against the torch reference."""
    from transformers.activations import ACT2FN

    if gather_kernels.backend(torch.zeros(1, dtype=dtype)) != "cpu-c":
        pytest.skip("no C kernel here")
    act = ACT2FN[act_name]
    code = gather_kernels.activation_code(act)
    assert code > 0, act_name
    g = torch.Generator().manual_seed(tokens)
    E, U, D = 9, 131, 45  # odd sizes: every loop tail runs
    masks = torch.rand(E, U, generator=g) < 0.5
    masks[:, 0] = True
    bits = (masks.long() << torch.arange(E)[:, None]).sum(0)
    gate, up, down_t = (torch.randn(U, D, generator=g).to(dtype) for _ in range(3))
    x = torch.randn(tokens, D, generator=g).to(dtype)
    expert = torch.randint(E, (tokens,), generator=g)
    member = masks[expert].float()  # (T, U)
    a = act(x.float() @ gate.float().t()) * (x.float() @ up.float().t()) * member
    ref = (a @ down_t.float()).to(dtype)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = gather_kernels.mlp(gate, up, down_t, x, expert, bits, code)
    finally:
        torch.set_num_threads(before)
    tol = dict(rtol=2e-2, atol=5e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out, ref, **tol)


def test_activation_codes_recognise_what_they_compute():
    assert gather_kernels.activation_code(torch.nn.SiLU()) == 1
    assert gather_kernels.activation_code(torch.nn.GELU(approximate="tanh")) == 2
    assert gather_kernels.activation_code(torch.nn.GELU()) == 3
    assert gather_kernels.activation_code(torch.nn.ReLU()) == 0  # not fused: the two-call path applies it


@pytest.mark.parametrize("family", FAMILIES)
def test_indexed_layout_matches_masked_model(family, gather_backend):
    masked, moe = build(family)
    assert moe.set_layout("indexed") == "indexed"
    batch = tiny_ids(batch=8, length=3)  # batch-8 decode steps: several experts in one kernel call
    with torch.no_grad():
        for ids in (tiny_ids(batch=1, length=1), tiny_ids(batch=1, length=5), batch, many_tokens_ids()):
            torch.testing.assert_close(moe(input_ids=ids).logits, masked.model(input_ids=ids).logits)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_indexed_greedy_decode_matches_masked_model(family, dtype, gather_backend):
    """Greedy tokens with a KV cache, batch 1 and a batch of 3, identical to the masked model."""
    masked, moe = build(family, dtype)
    assert moe.layout == "indexed" and moe.moe_mlps[0].up.dtype == dtype
    for prompt in (tiny_ids(batch=1, length=6), tiny_ids(batch=3, length=6, seed=1)):
        kw = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False, pad_token_id=0)
        with torch.no_grad():
            ref = masked.model.generate(input_ids=prompt, **kw)
            out = moe.generate(input_ids=prompt, **kw)
        assert out.tolist() == ref.tolist(), (family, dtype, prompt.shape)


@pytest.mark.parametrize("family", FAMILIES)
def test_gated_families_decode_with_one_fused_call_per_layer(family, monkeypatch):
    """Where the C kernel runs, a decode step of a gated SiLU/GELU MLP is one `gather_kernels.mlp` call."""
    from tomoe_core.moe import layer as routing

    _, moe = build(family)
    moe.set_layout("indexed")
    mlp0 = moe.moe_mlps[0]
    if gather_kernels.backend(mlp0.up) != "cpu-c":
        pytest.skip("no C kernel here")
    fused = mlp0.gate is not None and mlp0.up_bias is None and mlp0._indexed.act_code > 0
    calls = []
    real = routing.gather_mlp
    monkeypatch.setattr(routing, "gather_mlp", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        moe(input_ids=tiny_ids(batch=1, length=1))
    assert len(calls) == (len(moe.moe_mlps) if fused else 0), (family, mlp0._indexed.act_code)
    if mlp0.gate is not None and mlp0.up_bias is None:
        assert fused, f"{family}: a gated MLP whose activation the kernel does not know ({type(mlp0.act).__name__})"


def test_indexed_layout_keeps_one_copy_of_the_weights():
    _, moe = build("llama")
    moe.set_layout("shared")
    union_bytes = moe.layout_bytes()["mlp_bytes"]
    moe.set_layout("indexed")
    for mlp in moe.moe_mlps:
        down_t = mlp._indexed.down_t
        assert down_t.is_contiguous() and down_t.shape == (mlp.union_size, mlp.up.shape[1])  # channel rows
        assert down_t.untyped_storage().data_ptr() == mlp.down.untyped_storage().data_ptr()  # no copy
        assert mlp._core.up.untyped_storage().data_ptr() == mlp.up.untyped_storage().data_ptr()
    sizes = moe.layout_bytes()
    assert sizes["mlp_bytes"] == union_bytes
    assert sizes["layout_extra_bytes"] == sum(m.layout_extra_bytes("indexed") for m in moe.moe_mlps)
    moe.set_layout("packed")  # leaving the layout restores the saved (D, U) storage
    assert all(m.down.is_contiguous() for m in moe.moe_mlps)


def test_indexed_decode_never_reads_back_to_the_host(monkeypatch):
    """No .item()/.tolist()/int() of a tensor in a decode step of the MoE layers (a sync per layer on CUDA)."""
    _, moe = build("qwen3")
    moe.set_layout("indexed")
    mlps = moe.moe_mlps
    xs = [torch.randn(n, 1, mlps[0].up.shape[1]) for n in (1, 8)]

    def boom(*args, **kwargs):
        raise AssertionError("host read of a tensor during an indexed decode step")

    for name in ("item", "tolist", "__int__", "__index__", "__bool__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, boom)
    with torch.no_grad():
        for x in xs:
            for mlp in mlps:
                mlp(x)


def test_save_in_indexed_layout_and_reload(tmp_path):
    masked, moe = build("gemma3_text")
    moe.set_layout("indexed")  # down is stored transposed in memory; the file keeps (D, U)
    save_converted(moe, tmp_path / "conv")
    ids = many_tokens_ids()
    with torch.no_grad():
        ref = masked.model(input_ids=ids).logits
        loaded, _, _ = load_converted(tmp_path / "conv", load_tokenizer=False)
        assert loaded.layout == "indexed"  # the default ("auto") layout
        torch.testing.assert_close(loaded(input_ids=ids).logits, ref)
        torch.testing.assert_close(loaded(input_ids=ids[:, :1]).logits, masked.model(input_ids=ids[:, :1]).logits)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_indexed_layout_matches_masked_model(dtype):
    masked, moe = build("llama")
    masked.model.to("cuda", dtype)
    moe = moe.to("cuda", dtype)
    assert moe.layout == "indexed"
    backend = gather_kernels.backend(moe.moe_mlps[0].up)
    prompt = tiny_ids(batch=2, length=6).cuda()
    kw = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert moe.generate(input_ids=prompt, **kw).tolist() == masked.model.generate(input_ids=prompt, **kw).tolist(), backend
        ids = tiny_ids(batch=4, length=1).cuda()
        out = moe(input_ids=ids).logits.float()
        MoEMLP.gather_backend = "torch"
        try:
            ref = moe(input_ids=ids).logits.float()
        finally:
            MoEMLP.gather_backend = None
        torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)


TRITON_CHECK = """
import torch
from tomoe_core.moe import gather_kernels as gk, gather_triton as gt
assert gt.AVAILABLE
g = torch.Generator().manual_seed(0)
for gated in (True, False):
    for dtype in (torch.float32, torch.bfloat16):
        E, U, D, T = 11, 203, 100, 3  # sizes that are not multiples of the block sizes
        masks = torch.rand(E, U, generator=g) < 0.4
        bits = (masks.long() << torch.arange(E)[:, None]).sum(0)
        widths = masks.sum(1)
        table = torch.zeros(E, int(widths.max()), dtype=torch.long)
        valid = torch.zeros(E, int(widths.max()), dtype=dtype)
        for k in range(E):
            table[k, : widths[k]] = masks[k].nonzero().squeeze(-1)
            valid[k, : widths[k]] = 1
        gate = torch.randn(U, D, generator=g).to(dtype) if gated else None
        up, down_t = torch.randn(U, D, generator=g).to(dtype), torch.randn(U, D, generator=g).to(dtype)
        x, expert = torch.randn(T, D, generator=g).to(dtype), torch.randint(E, (T,), generator=g)
        ref_g, ref_u = gk.gate_up(gate, up, x, expert, bits, masks.to(dtype), use="torch")
        out_g, out_u = gt.gate_up(gate, up, x, expert, bits)
        tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else {}
        torch.testing.assert_close(out_u.to(dtype), ref_u, **tol)
        if gated:
            torch.testing.assert_close(out_g.to(dtype), ref_g, **tol)
        a = torch.randn(T, U, generator=g).to(dtype) * masks.to(dtype)[expert]
        ref_y = gk.down(down_t, a, expert, bits, table, valid, use="torch")
        torch.testing.assert_close(gt.down(down_t, a, expert, bits).to(dtype), ref_y, **tol)
print("triton kernels match")
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (its interpreter runs the kernels on CPU)")
def test_triton_kernels_match_the_torch_reference_in_the_interpreter():
    """The CUDA kernels' logic, run by Triton's CPU interpreter (no GPU needed; slow, so tiny sizes)."""
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", TRITON_CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "triton kernels match" in proc.stdout, proc.stderr[-2000:]


def test_releasing_a_mapped_weight_keeps_its_values(tmp_path):
    """The indexed layout drops the file pages of the down matrix it re-stores; the data must survive."""
    from safetensors.torch import load_file, save_file

    from tomoe_core.moe.atomic import file_mapping_of, release_file_pages

    big = torch.randn(512, 1024)  # 2 MiB: whole pages inside
    save_file({"w": big}, str(tmp_path / "w.safetensors"))
    mapped = load_file(str(tmp_path / "w.safetensors"))["w"]
    inside = (mapped.data_ptr() // 4096 + 1) * 4096
    assert file_mapping_of(inside, inside + 4096) == str(tmp_path / "w.safetensors")  # the path under test
    release_file_pages(mapped)
    assert torch.equal(mapped, big)  # re-read from the file
    anon = big.clone()
    assert file_mapping_of(anon.data_ptr(), anon.data_ptr() + 4096) is None  # never dropped: not a file
    release_file_pages(anon)
    assert torch.equal(anon, big)
