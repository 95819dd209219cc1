"""The linear layers' kernel (functions/llm/kernels.py, cuda_ext/src/cpu_linear.cpp).

The choice is plain logic, tested table-driven. The AVX512-BF16 kernel is tested where this CPU
runs it (otherwise skipped, with the reason): each row's output is the same bits whatever the
other rows, whatever the shape's remainders, and it is the product (against float64, within bf16
rounding, and as close as torch's own bf16 product)."""

from __future__ import annotations

import pytest
import torch

from functions.llm import kernels
from tests.functions.conftest import NEEDS_KERNEL

AMX = {"fpu", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}
AVX512_BF16 = {"fpu", "avx512f", "avx512_bf16"}
AVX2 = {"fpu", "avx", "avx2", "fma"}


@pytest.mark.parametrize("setting,mode,device,dtype,flags,supported,linear,why", [
    pytest.param("auto", "exact", "cpu", "bfloat16", AVX512_BF16, True, "avx512-bf16", "without AMX", id="avx512"),
    pytest.param("auto", "exact", "cpu", "bfloat16", AMX, True, "torch", "has AMX", id="amx-keeps-tiles"),
    pytest.param("auto", "exact", "cpu", "bfloat16", AVX2, True, "torch", "does not list avx512_bf16", id="avx2"),
    pytest.param("auto", "exact", "cpu", "float32", AVX512_BF16, True, "torch", "dtype is float32", id="float32"),
    pytest.param("auto", "exact", "cuda", "bfloat16", AVX512_BF16, True, "torch", "device is cuda", id="cuda"),
    pytest.param("auto", "exact", "cpu", "bfloat16", AVX512_BF16, False, "torch", "cannot run it", id="not-built"),
    pytest.param("auto", "fast", "cpu", "bfloat16", AVX512_BF16, True, "torch", "fast numerics", id="fast"),
    pytest.param("torch", "exact", "cpu", "bfloat16", AVX512_BF16, True, "torch", "set by --linear", id="torch"),
    pytest.param("avx512-bf16", "exact", "cpu", "bfloat16", AMX, True, "avx512-bf16", "set by --linear",
                 id="forced-on-amx"),
    pytest.param("avx512-bf16", "fast", "cpu", "bfloat16", AVX512_BF16, True, "avx512-bf16", "set by --linear",
                 id="forced-in-fast"),
])
def test_choose(setting, mode, device, dtype, flags, supported, linear, why):
    choice = kernels.choose(setting, mode, device, dtype, flags, supported)
    assert choice.linear == linear
    assert why in choice.reason
    assert choice.report() == {"linear": linear, "linear_reason": choice.reason}


@pytest.mark.parametrize("setting,device,dtype,supported,message", [
    pytest.param("gemm", "cpu", "bfloat16", True, "linear = 'gemm', must be one of auto, torch, avx512-bf16",
                 id="unknown"),
    pytest.param("avx512-bf16", "cuda:0", "bfloat16", True, "the device is cuda:0", id="forced-on-cuda"),
    pytest.param("avx512-bf16", "cpu", "float32", True, "the compute dtype is float32", id="forced-in-float32"),
    pytest.param("avx512-bf16", "cpu", "bfloat16", False, "cannot run it on this CPU", id="forced-unsupported"),
])
def test_choose_refuses(setting, device, dtype, supported, message):
    with pytest.raises(ValueError, match=message):
        kernels.choose(setting, "exact", device, dtype, AVX512_BF16, supported)


@NEEDS_KERNEL
@pytest.mark.parametrize("rows,out,inner,bias", [
    pytest.param(40, 1536, 576, False, id="smollm2-mlp"),
    pytest.param(37, 576, 1536, False, id="smollm2-down"),
    pytest.param(19, 7, 45, True, id="remainders-and-bias"),  # out % 4, inner % 32, rows % 4
    pytest.param(9, 3, 32, True, id="one-k-block"),
    pytest.param(5, 5, 1, False, id="inner-1"),
])
def test_each_row_is_the_same_bits_whatever_the_others(rows, out, inner, bias):
    torch.manual_seed(rows)
    x = torch.randn(rows, inner).bfloat16()
    w = (torch.randn(out, inner) / inner ** 0.5).bfloat16()
    b = torch.randn(out).bfloat16() if bias else None
    y = kernels.bf16_linear(x, w, b)
    assert y.dtype == torch.bfloat16 and y.shape == (rows, out)
    for i in range(rows):
        assert torch.equal(kernels.bf16_linear(x[i:i + 1], w, b)[0], y[i]), f"row {i} alone"
    for lo, hi in ((0, 2), (1, 4), (3, 8), (rows - 5, rows)):
        assert torch.equal(kernels.bf16_linear(x[lo:hi], w, b), y[lo:hi]), (lo, hi)
    shuffled = torch.randperm(rows)
    assert torch.equal(kernels.bf16_linear(x[shuffled], w, b), y[shuffled])
    # It is the product: within bf16 rounding of float64's, as close as torch's own bf16 linear.
    exact = x.double() @ w.double().t() + (0 if b is None else b.double())
    ours = (y.double() - exact).abs().max().item()
    theirs = (torch.nn.functional.linear(x, w, b).double() - exact).abs().max().item()
    assert ours <= max(1.5 * theirs, 1e-2 * exact.abs().max().item()), (ours, theirs)


@NEEDS_KERNEL
def test_special_values_and_empty_input():
    w = torch.ones(4, 64).bfloat16()
    x = torch.zeros(3, 64).bfloat16()
    x[0, 5] = float("nan")
    x[1, 7] = float("inf")
    y = kernels.bf16_linear(x, w, None)
    assert torch.isnan(y[0]).all() and torch.isinf(y[1]).all() and (y[2] == 0).all()
    assert kernels.bf16_linear(torch.zeros(0, 64).bfloat16(), w, None).shape == (0, 4)
    # a non-contiguous input is made contiguous; the result is the same
    wide = torch.randn(6, 128).bfloat16()
    assert torch.equal(kernels.bf16_linear(wide[:, ::2], w, None), kernels.bf16_linear(wide[:, ::2].contiguous(), w, None))


@NEEDS_KERNEL
@pytest.mark.parametrize("x,w,b,message", [
    pytest.param(torch.zeros(2, 8), torch.zeros(4, 8).bfloat16(), None, "takes bfloat16 tensors, got x torch.float32",
                 id="float32-x"),
    pytest.param(torch.zeros(2, 8).bfloat16(), torch.zeros(4, 9).bfloat16(), None, r"x \(2, 8\) @ weight \(4, 9\)",
                 id="inner-mismatch"),
    pytest.param(torch.zeros(2, 8).bfloat16(), torch.zeros(4, 8).bfloat16(), torch.zeros(3).bfloat16(),
                 r"bias \(3,\) for weight \(4, 8\)", id="bias-shape"),
    pytest.param(torch.zeros(2, 8).bfloat16(), torch.zeros(8, 4).bfloat16().t(), None, "must be contiguous",
                 id="transposed-weight"),
])
def test_bad_input_is_refused_with_what_is_wrong(x, w, b, message):
    with pytest.raises(ValueError, match=message):
        kernels.bf16_linear(x, w, b)


@NEEDS_KERNEL
def test_the_extension_checks_its_sizes():
    from cuda_ext import _C

    with pytest.raises(ValueError, match="need m >= 0, n >= 1, k >= 1"):
        _C.bf16_linear(0, 0, 0, 0, 1, 0, 8)


@NEEDS_KERNEL
def test_bmm_is_each_product_alone():
    torch.manual_seed(3)
    x = torch.randn(5, 6, 64).bfloat16()
    w = torch.randn(5, 130, 64).bfloat16()
    y = kernels.bf16_bmm(x, w)
    assert y.shape == (5, 6, 130)
    for b in range(5):
        assert torch.equal(y[b], kernels.bf16_linear(x[b], w[b], None)), b
    # strided views are made contiguous first (attention passes transposed values)
    wt = torch.randn(5, 64, 130).bfloat16()
    assert torch.equal(kernels.bf16_bmm(x, wt.transpose(1, 2)), kernels.bf16_bmm(x, wt.transpose(1, 2).contiguous()))
    with pytest.raises(ValueError, match=r"differ in batch"):
        kernels.bf16_bmm(x, w[:4])
    with pytest.raises(ValueError, match=r"need x \[batch, rows, in\]"):
        kernels.bf16_bmm(x[0], w[0])
