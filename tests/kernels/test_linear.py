"""kernels/linear.py and kernels/kernel_choice.py: every kernel this machine can run computes what
F.linear computes, and the choice never offers a kernel the machine cannot run."""

import pytest
import torch
import torch.nn.functional as F

from mixserve.kernels.capability import CpuCapability, cpu_capability
from mixserve.kernels.kernel_choice import LinearKernelChooser
from mixserve.kernels.linear import linear, linear_kernels_for, pack_weight

SHAPES = [(1, 48, 64), (3, 100, 72), (17, 256, 128), (32, 64, 1024)]  # (T, out, in)
DTYPES = [torch.float32, torch.bfloat16]
# (dtype, kernel) for every kernel this machine runs: the reference everywhere, fast paths where supported
RUNNABLE = [(d, k) for d in DTYPES for k in linear_kernels_for(d, "cpu")]
# float32: summation order differs between kernels (sums of up to 1024 products); bfloat16: bit-identical
TOLERANCE = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.bfloat16: dict(rtol=0, atol=0)}


def _randn(*shape, seed, dtype):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _cap(*flags, isa="AVX512", onednn=True) -> CpuCapability:
    return CpuCapability("test cpu", isa, frozenset(flags), onednn)


@pytest.mark.parametrize("dtype,kernel", RUNNABLE, ids=[f"{str(d)[6:]}-{k}" for d, k in RUNNABLE])
@pytest.mark.parametrize("t,out_features,in_features", SHAPES)
def test_every_runnable_kernel_equals_f_linear(dtype, kernel, t, out_features, in_features):
    w = _randn(out_features, in_features, seed=1, dtype=dtype)
    x = _randn(t, in_features, seed=2, dtype=dtype)
    packed = pack_weight(w, kernel)
    assert packed.kernel == kernel and (packed.out_features, packed.in_features) == (out_features, in_features)
    out = linear(x, packed)
    assert out.dtype == dtype and out.shape == (t, out_features)
    torch.testing.assert_close(out, F.linear(x, w), **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype,kernel", RUNNABLE, ids=[f"{str(d)[6:]}-{k}" for d, k in RUNNABLE])
def test_every_runnable_kernel_is_within_rounding_of_float32_math(dtype, kernel):
    w = _randn(96, 80, seed=5, dtype=dtype)
    x = _randn(5, 80, seed=6, dtype=dtype)
    out = linear(x, pack_weight(w, kernel)).float()
    torch.testing.assert_close(out, x.float() @ w.float().T, rtol=2**-7, atol=1e-2)


@pytest.mark.parametrize("dtype,kernel", RUNNABLE, ids=[f"{str(d)[6:]}-{k}" for d, k in RUNNABLE])
def test_non_contiguous_weight_gives_the_same_result(dtype, kernel):
    w = _randn(64, 40, seed=9, dtype=dtype).T  # [40, 64] view, not contiguous
    x = _randn(6, 64, seed=10, dtype=dtype)
    torch.testing.assert_close(linear(x, pack_weight(w, kernel)), F.linear(x, w.contiguous()), **TOLERANCE[dtype])


def test_reference_is_always_offered_first():
    for dtype in (*DTYPES, torch.float16):
        assert linear_kernels_for(dtype, "cpu")[0] == "reference"
    assert linear_kernels_for(torch.bfloat16, "cuda") == ["reference"]


def test_bf16_packing_is_not_offered_on_an_avx2_only_cpu():
    """The crash this rule prevents: 'mkldnn_reorder_linear_weight: bf16 path needs the cpu support
    avx_ne_convert or avx512bw, avx512vl and avx512dq'."""
    avx2 = _cap("avx2", isa="AVX2")
    assert linear_kernels_for(torch.bfloat16, "cpu", avx2) == ["reference"]
    assert linear_kernels_for(torch.float32, "cpu", avx2) == ["reference", "onednn"]
    assert not avx2.native_bf16 and not avx2.onednn_bf16_packing


def test_bf16_packing_is_offered_with_avx512_or_avx_ne_convert():
    assert "onednn" in linear_kernels_for(torch.bfloat16, "cpu", _cap("avx512bw", "avx512vl", "avx512dq"))
    assert "onednn" in linear_kernels_for(torch.bfloat16, "cpu", _cap("avx2", "avx_ne_convert", isa="AVX2"))
    assert linear_kernels_for(torch.float32, "cpu", _cap("avx2", isa="AVX2", onednn=False)) == ["reference"]


def test_the_probe_agrees_with_torch_and_the_processor():
    cap = cpu_capability()
    assert cap.isa == torch.backends.cpu.get_cpu_capability()
    if cap.isa != "AVX512":
        assert not any(f.startswith(("avx512", "amx")) for f in cap.flags)
    assert set(cap.summary()["flags"]) >= {"avx2", "avx512f", "avx512_bf16", "amx_bf16"}


def test_the_chooser_picks_a_runnable_kernel_and_remembers_it_per_shape():
    chooser = LinearKernelChooser("auto", rows=(1, 4), repeats=2)
    candidates = linear_kernels_for(torch.float32, "cpu")
    w = _randn(64, 32, seed=11, dtype=torch.float32)
    packed = chooser.pack(w)
    assert packed.kernel in candidates
    described = chooser.report["64x32 float32"]
    assert described.startswith(packed.kernel)
    if len(candidates) > 1:  # timed: the report names every candidate's time
        assert all(f"{k} " in described for k in candidates)
    again = LinearKernelChooser("auto").pack(_randn(64, 32, seed=12, dtype=torch.float32))
    assert again.kernel == packed.kernel  # the same shape gets the same kernel in the whole process
    x = _randn(3, 32, seed=13, dtype=torch.float32)
    torch.testing.assert_close(linear(x, packed), F.linear(x, w), rtol=1e-5, atol=1e-5)


def test_a_forced_kernel_is_used_where_it_runs_and_the_reference_elsewhere():
    w = _randn(16, 16, seed=14, dtype=torch.bfloat16)
    assert LinearKernelChooser("reference").pack(w).kernel == "reference"
    expected = "onednn" if "onednn" in linear_kernels_for(torch.bfloat16, "cpu") else "reference"
    assert LinearKernelChooser("onednn").pack(w).kernel == expected


def test_an_unknown_kernel_mode_is_a_clear_error():
    with pytest.raises(ValueError, match="linear kernel must be one of auto, reference, onednn"):
        LinearKernelChooser("amx")
    with pytest.raises(ValueError, match="unknown linear kernel 'amx'"):
        pack_weight(torch.zeros(2, 2), "amx")
