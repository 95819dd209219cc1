"""The compute dtype (functions/llm/dtypes.py): bf16 where the CPU multiplies bf16 natively,
float32 otherwise, the checkpoint's on CUDA, or what --dtype says; the weights cast to it tensor
by tensor; reported by /health/ready and the ready log line; and exact numerics in bf16 on the
real model, bit for bit."""

from __future__ import annotations

import random

import httpx
import pytest
import torch

from functions.llm import dtypes, kernels, numerics, weights
from functions.llm.runner import Feed, ModelRunner
from sllm_knative.loading import load_model
from tests.functions.conftest import OUR_KERNELS, Server

AMX = {"fpu", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}
AVX512_BF16 = {"fpu", "avx512f", "avx512_bf16"}
AVX2 = {"fpu", "avx", "avx2", "fma"}


@pytest.mark.parametrize("setting,device,checkpoint,flags,dtype,why", [
    pytest.param("auto", "cpu", "float32", AMX, "bfloat16", "natively (amx_bf16)", id="amx"),
    pytest.param("auto", "cpu", "float16", AVX512_BF16, "bfloat16", "natively (avx512_bf16)", id="avx512-bf16"),
    pytest.param("auto", "cpu", "bfloat16", AVX2, "float32", "no native bf16", id="avx2-bf16-checkpoint"),
    pytest.param("auto", "cpu", "float16", AVX2, "float32", "no native bf16", id="avx2-fp16-checkpoint"),
    pytest.param("auto", "cpu", "float32", set(), "float32", "no native bf16", id="no-flags"),
    pytest.param("auto", "cuda", "float16", AMX, "float16", "cuda: the checkpoint", id="cuda-keeps-checkpoint"),
    pytest.param("auto", "cuda:1", "bfloat16", AVX2, "bfloat16", "cuda: the checkpoint", id="cuda-n"),
    pytest.param("float32", "cpu", "bfloat16", AMX, "float32", "set by --dtype", id="override-float32"),
    pytest.param("float16", "cpu", "float16", AMX, "float16", "set by --dtype", id="override-float16"),
    pytest.param("bfloat16", "cpu", "float32", AVX2, "bfloat16", "set by --dtype", id="override-bf16-emulated"),
    pytest.param("float32", "cuda", "float16", AMX, "float32", "set by --dtype", id="override-cuda"),
])
def test_choose(setting, device, checkpoint, flags, dtype, why):
    choice = dtypes.choose(setting, device, checkpoint, flags)
    assert choice.dtype == dtype
    assert why in choice.reason
    assert choice.report() == {"dtype": dtype, "dtype_reason": choice.reason}


def test_choose_refuses_an_unknown_setting():
    with pytest.raises(ValueError, match="dtype = 'int8', must be one of auto, bfloat16, float32, float16"):
        dtypes.choose("int8", "cpu", "float32", AMX)


@pytest.mark.parametrize("text,flags", [
    pytest.param("processor\t: 0\nflags\t\t: fpu avx512_bf16 amx_bf16\nbugs\t\t: spectre\n\nprocessor\t: 1\n"
                 "flags\t\t: fpu\n", {"fpu", "avx512_bf16", "amx_bf16"}, id="x86-first-processor"),
    pytest.param("processor\t: 0\nFeatures\t: fp asimd bf16\n", {"fp", "asimd", "bf16"}, id="arm64"),
    pytest.param("processor\t: 0\n", set(), id="no-flags-line"),
])
def test_cpu_flags(tmp_path, text, flags):
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    assert dtypes.cpu_flags(path) == flags
    assert dtypes.cpu_flags(tmp_path / "absent") == frozenset()


def test_native_bf16_prefers_amx():
    assert dtypes.native_bf16(AMX) == "amx_bf16"
    assert dtypes.native_bf16(AVX512_BF16) == "avx512_bf16"
    assert dtypes.native_bf16(AVX2 | {"bf16"}) is None  # arm's bf16 is not one of the x86 flags we know


def test_cast_parameters_tensor_by_tensor_keeps_ties(tmp_path):
    from sllm_knative.models import ModelSpec, build_model

    path = build_model(tmp_path / "tied", ModelSpec(tie_word_embeddings=True))
    model = load_model(path)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    inv_freq = model.model.rotary_emb.inv_freq.clone()
    assert weights.checkpoint_dtype(model) == "float32"
    count = weights.cast_parameters(model, torch.bfloat16)
    assert count == len(before)  # each shared parameter once
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    for name, p in model.named_parameters():
        assert p.dtype == torch.bfloat16
        assert torch.equal(p, before[name].to(torch.bfloat16)), name
    assert weights.checkpoint_dtype(model) == "bfloat16"
    assert torch.equal(model.model.rotary_emb.inv_freq, inv_freq)  # buffers keep float32
    assert weights.cast_parameters(model, torch.bfloat16) == 0  # nothing to do


@pytest.mark.parametrize("extra,env,setting", [
    pytest.param((), None, "auto", id="auto"),
    pytest.param(("--dtype", "float32"), None, "float32", id="flag-float32"),
    pytest.param((), {"SLLM_DTYPE": "bfloat16"}, "bfloat16", id="env-bfloat16"),
])
def test_the_server_reports_its_dtype(tiny_model, tmp_path, extra, env, setting):
    """A real server process: /health/ready's compute section and the ready log line name the
    dtype, why, and the tile; the KV cache (sized in the log) follows the dtype; it serves."""
    import os

    want = dtypes.choose(setting, "cpu", "float32", dtypes.cpu_flags())
    linear = kernels.choose("auto", "exact", "cpu", want.dtype, dtypes.cpu_flags(), kernels.runnable())
    tile_rows = 1 if linear.linear in kernels.OURS else numerics.default_tile_rows(getattr(torch, want.dtype))
    log = tmp_path / "server.log"
    server = Server(tiny_model, log, *extra, env=None if env is None else {**os.environ, **env})
    try:
        compute = server.wait_ready()["compute"]
        assert compute["dtype"] == want.dtype and compute["dtype_reason"] == want.reason
        assert compute["dtype_setting"] == setting
        assert compute["tile_rows"] == tile_rows
        assert (compute["linear"], compute["linear_reason"], compute["linear_setting"]) == (
            linear.linear, linear.reason, "auto")
        r = httpx.post(f"{server.url}/v1/completions", json={"model": "tiny", "prompt": "hello", "max_tokens": 4,
                                                            "temperature": 0, "ignore_eos": True}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    finally:
        server.stop()
    ready = [line for line in log.read_text().splitlines() if "msg=ready " in line]
    assert len(ready) == 1, log.read_text()[-2000:]
    assert (f'dtype={want.dtype} dtype_reason="{want.reason}" tile_rows={tile_rows} linear={linear.linear} '
            f'linear_reason="{linear.reason}" ') in ready[0], ready


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    from tests.checkpoint.gguf_files import converted_smollm2

    return converted_smollm2(tmp_path_factory)[0]


def _scrambled(runner: ModelRunner, seq: list[int], rng: random.Random) -> torch.Tensor:
    """Logits of every position of seq, fed in random chunks among other sequences."""
    others = dict.fromkeys(range(1, 4), 0)
    got = []
    i = 0
    while i < len(seq):
        n = min(rng.choice([1, 1, 2, 5, 17]), len(seq) - i)
        feeds = [Feed(0, i, seq[i:i + n], 0)]
        for s in others:
            if rng.random() < 0.6:
                m = rng.choice([1, 1, 3, 21])
                feeds.append(Feed(s, others[s], [rng.randrange(3, 49152) for _ in range(m)], rng.choice([None, m - 1])))
                others[s] += m
        rng.shuffle(feeds)
        out = runner.step(feeds)
        got.append(out[[f.slot for f in feeds].index(0)])
        i += n
    return torch.cat(got)


@pytest.mark.parametrize("linear", [kernels.TORCH, *OUR_KERNELS])
def test_exact_bf16_is_bit_for_bit_on_the_real_model(smollm2, linear):
    """SmolLM2-135M in bf16 (its converted checkpoint's dtype): exact numerics gives every
    position's logits bit for bit whatever the chunking and the company, with torch's 16-row
    tiles or our kernel; fast numerics, on the same feeds, does not (so the comparison can tell)."""
    rng = random.Random(7)
    seq = [rng.randrange(3, 49152) for _ in range(140)]  # across the first key-block boundary
    fast_differs = None
    for mode in (numerics.EXACT, numerics.FAST):
        runner = ModelRunner(load_model(smollm2), slots=4, max_len=512, mode=mode, threads=1,
                             linear=linear if mode == numerics.EXACT else kernels.TORCH)
        assert runner.dtype == torch.bfloat16
        whole = runner.step([Feed(0, 0, seq, 0)])[0]
        scrambled = _scrambled(runner, seq, random.Random(1))
        if mode == numerics.EXACT:
            assert runner.tile_rows == (16 if linear == kernels.TORCH else 1)
            assert runner.fingerprint()["linear"] == linear
            # with our kernels, RMSNorm and the rotary embedding are the extension's too
            assert runner.elementwise == ("torch" if linear == kernels.TORCH else "ours")
            assert torch.equal(scrambled, whole)
        else:
            fast_differs = not torch.equal(scrambled, whole)
    assert fast_differs
