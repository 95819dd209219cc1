"""The decoder's elementwise steps in the extension (cuda_ext/src/cpu_norm.cpp, kernels.rms_norm
and kernels.rotary): RMSNorm and the rotary embedding, one call each instead of about 15 torch ops
a layer. Each row's result is the same bits whatever the other rows (batch invariant); the rotary
embedding is torch's own formula bit for bit, and RMSNorm is within two bf16 steps of it and
mostly its bits (its sum of squares is added in another order); bad input is refused with what
is wrong. Where this CPU runs our kernels (otherwise skipped, with the reason)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from functions.llm import decoder, kernels, numerics
from functions.llm.runner import Feed, ModelRunner
from sllm_knative.models import TINY, build_model
from tests.functions.conftest import NEEDS_KERNEL

pytestmark = NEEDS_KERNEL
EPS = 1e-5


def torch_norm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + EPS)
    return w * x32.to(torch.bfloat16)


def torch_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


@pytest.mark.parametrize("n", [1, 15, 16, 17, 576, 577, 1536, 2048])
def test_rms_norm_is_within_two_bf16_steps_of_torch_s_and_mostly_its_bits(n):
    torch.manual_seed(n)
    x = (torch.randn(64, n) * torch.logspace(-3, 3, 64)[:, None]).bfloat16()  # rows of every scale
    w = torch.randn(n).bfloat16()
    ours, theirs = kernels.rms_norm(x, w, EPS), torch_norm(x, w)
    assert ours.dtype == torch.bfloat16 and ours.shape == x.shape
    # a last-place difference in r can move bf16(x * r) by one step (at most 2^-7 relative) and
    # the product with w rounds once more: two steps at most
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=2 ** -6, atol=0.0)
    assert (ours == theirs).float().mean().item() > 0.99


@pytest.mark.parametrize("heads,d", [(1, 32), (9, 64), (3, 64), (4, 128)])
def test_rotary_is_torch_s_formula_bit_for_bit(heads, d):
    torch.manual_seed(d + heads)
    x = torch.randn(33, heads, d).bfloat16()
    pos = torch.arange(33).float()[:, None] * torch.logspace(0, -4, d // 2)[None, :]
    emb = torch.cat((pos, pos), dim=-1)
    cos, sin = emb.cos().bfloat16()[:, None, :], emb.sin().bfloat16()[:, None, :]
    assert torch.equal(kernels.rotary(x, cos, sin), torch_rotary(x, cos, sin))


@pytest.mark.parametrize("rows", [1, 2, 7, 64])
def test_every_row_is_the_same_bits_alone_or_among_others(rows):
    torch.manual_seed(rows)
    x, w = torch.randn(rows, 576).bfloat16(), torch.randn(576).bfloat16()
    q, cs = torch.randn(rows, 9, 64).bfloat16(), torch.randn(rows, 2, 64).bfloat16()
    norm, rot = kernels.rms_norm(x, w, EPS), kernels.rotary(q, cs[:, 0], cs[:, 1])
    for r in range(rows):
        assert torch.equal(kernels.rms_norm(x[r:r + 1].clone(), w, EPS), norm[r:r + 1])
        assert torch.equal(kernels.rotary(q[r:r + 1].clone(), cs[r:r + 1, 0], cs[r:r + 1, 1]), rot[r:r + 1])


def test_no_rows_is_no_rows():
    assert kernels.rms_norm(torch.zeros(0, 8).bfloat16(), torch.ones(8).bfloat16(), EPS).shape == (0, 8)
    empty = torch.zeros(0, 2, 32).bfloat16()
    assert kernels.rotary(empty, torch.zeros(0, 32).bfloat16(), torch.zeros(0, 32).bfloat16()).shape == (0, 2, 32)


@pytest.mark.parametrize("x,w,message", [
    pytest.param(torch.zeros(2, 8), torch.zeros(8).bfloat16(), r"rms_norm takes bf16 cpu x \[rows, n\].*float32",
                 id="float32-x"),
    pytest.param(torch.zeros(2, 8).bfloat16(), torch.zeros(9).bfloat16(), r"weight \(9,\)", id="weight-size"),
    pytest.param(torch.zeros(2, 2, 8).bfloat16(), torch.zeros(8).bfloat16(), r"x \(2, 2, 8\)", id="3-d"),
])
def test_rms_norm_refuses_bad_input(x, w, message):
    with pytest.raises(ValueError, match=message):
        kernels.rms_norm(x, w, EPS)


@pytest.mark.parametrize("x,cos,message", [
    pytest.param(torch.zeros(2, 1, 48).bfloat16(), torch.zeros(2, 48).bfloat16(), r"d a multiple of 32.*\(2, 1, 48\)",
                 id="d-48"),
    pytest.param(torch.zeros(2, 1, 64).bfloat16(), torch.zeros(3, 64).bfloat16(), r"cos \(3, 64\)", id="cos-rows"),
    pytest.param(torch.zeros(2, 1, 64), torch.zeros(2, 64).bfloat16(), r"x \(2, 1, 64\) torch.float32",
                 id="float32-x"),
])
def test_rotary_refuses_bad_input(x, cos, message):
    with pytest.raises(ValueError, match=message):
        kernels.rotary(x, cos, cos)


def test_the_extension_checks_its_sizes():
    from cuda_ext import _C

    with pytest.raises(ValueError, match=r"rms_norm_bf16: rows = -1, n = 8: need rows >= 0, n >= 1"):
        _C.rms_norm_bf16(0, 0, 0, -1, 8, EPS)
    with pytest.raises(ValueError, match=r"rotary_bf16: rows = 1, heads = 1, d = 48: need .* multiple of 32"):
        _C.rotary_bf16(0, 0, 0, 0, 1, 1, 48)


HEAD32 = dataclasses.replace(TINY, hidden_size=128, dtype="bfloat16")  # 4 heads of 32


@pytest.mark.parametrize("spec,linear,want", [
    (HEAD32, kernels.AVX512_BF16, decoder.OURS),
    (HEAD32, kernels.TORCH, decoder.TORCH),  # torch's products: torch's elementwise ops
    (dataclasses.replace(TINY, dtype="bfloat16"), kernels.AVX512_BF16, decoder.TORCH),  # heads of 16
])
def test_the_runner_uses_them_beside_our_linear_kernels_and_says_so(tmp_path, spec, linear, want):
    """A small model in exact bf16: with our linear kernel and heads of a multiple of 32 the
    decoder's norms and rotations are ours, and the numerics fingerprint says it (an instance
    computing them with torch's ops is other numerics for a resume); the logits stay close to
    those of torch's elementwise ops."""
    from sllm_knative.loading import load_model

    model = load_model(build_model(tmp_path / "m", spec, seed=3))
    runner = ModelRunner(model, slots=2, max_len=64, mode=numerics.EXACT, linear=linear)
    assert runner.elementwise == want and runner.fingerprint()["elementwise"] == want
    if want == decoder.OURS:
        prompt = list(range(5, 29))
        ours = runner.step([Feed(0, 0, prompt, 0)])[0]
        runner._lean.elementwise = decoder.TORCH  # the same step with torch's norms and rotations
        theirs = runner.step([Feed(1, 0, prompt, 0)])[0]
        assert ours is not None and theirs is not None
        assert (ours - theirs).abs().max().item() <= 0.05 * theirs.abs().max().item()


def test_the_decoder_refuses_an_unknown_choice(tmp_path):
    from sllm_knative.loading import load_model

    model = load_model(build_model(tmp_path / "m", seed=3))
    with pytest.raises(ValueError, match=r"elementwise = 'fused', must be one of torch, ours"):
        decoder.DecoderForward(model, numerics.linear_function(numerics.EXACT, 1), "fused")
