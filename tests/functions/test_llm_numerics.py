"""The packed forward pass (functions.llm.runner) and its batch-invariant numerics.

The exact mode's claim, checked bit for bit: the logits of a sequence do not depend on how its
tokens were chunked into steps, on decode versus prefill, or on which other sequences (of
other lengths, at other positions) share the steps.
"""

from __future__ import annotations

import functools
import random

import pytest
import torch

from functions.llm import kernels, numerics, weights
from functions.llm.runner import Feed, ModelRunner
from sllm_knative.loading import load_model
from tests.functions.conftest import NEEDS_AMX, NEEDS_KERNEL, OUR_KERNELS

VOCAB = 512


@pytest.fixture(autouse=True, scope="module")
def _restore_threads():
    threads = torch.get_num_threads()  # the exact runner pins intra-op threads to one, process-wide
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def hf_model(tiny_model):
    return load_model(tiny_model)


def _model(tiny_model, dtype: torch.dtype = torch.float32):
    """The tiny (float32) model with its weights cast to `dtype`, as the service does."""
    model = load_model(tiny_model)
    weights.cast_parameters(model, dtype)
    return model


def _runner(tiny_model, mode: str, tile_rows: int | None = 2, forward: str = "auto",
            dtype: torch.dtype = torch.float32, linear: str = kernels.TORCH) -> ModelRunner:
    return ModelRunner(_model(tiny_model, dtype), slots=6, max_len=512, mode=mode, tile_rows=tile_rows,
                       forward=forward, linear=linear)



def _scrambled_logits(runner: ModelRunner, seq: list[int], rng: random.Random) -> torch.Tensor:
    """Logits of every position of seq, fed in random chunks among random other sequences."""
    others = {s: 0 for s in range(1, 6)}
    got = []
    i = 0
    while i < len(seq):
        n = min(rng.choice([1, 1, 1, 2, 3, 7, 16]), len(seq) - i)
        feeds = [Feed(0, i, seq[i:i + n], 0)]
        for s in others:
            if rng.random() < 0.6:
                m = rng.choice([1, 1, 4, 19])
                if others[s] + m < 500:
                    feeds.append(Feed(s, others[s], [rng.randrange(3, VOCAB) for _ in range(m)],
                                      rng.choice([None, m - 1, 0])))
                    others[s] += m
        rng.shuffle(feeds)
        out = runner.step(feeds)
        got.append(out[[f.slot for f in feeds].index(0)])
        i += n
    return torch.cat(got)


@pytest.mark.parametrize("forward,tile_rows,dtype,linear", [
    pytest.param("auto", 2, torch.float32, kernels.TORCH, id="decoder"),
    pytest.param("auto", 5, torch.float32, kernels.TORCH, id="decoder-tile-5"),
    pytest.param("transformers", 2, torch.float32, kernels.TORCH, id="transformers"),
    pytest.param("auto", None, torch.bfloat16, kernels.TORCH, id="decoder-bf16"),  # the default tile: 16
    pytest.param("auto", 2, torch.bfloat16, kernels.TORCH, id="decoder-bf16-tile-2"),
    pytest.param("transformers", None, torch.bfloat16, kernels.TORCH, id="transformers-bf16"),
    pytest.param("auto", None, torch.bfloat16, kernels.AVX512_BF16, id="decoder-bf16-kernel", marks=NEEDS_KERNEL),
    pytest.param("transformers", None, torch.bfloat16, kernels.AVX512_BF16, id="transformers-bf16-kernel",
                 marks=NEEDS_KERNEL),
    pytest.param("auto", None, torch.bfloat16, kernels.AMX_BF16, id="decoder-bf16-amx", marks=NEEDS_AMX),
    pytest.param("transformers", None, torch.bfloat16, kernels.AMX_BF16, id="transformers-bf16-amx", marks=NEEDS_AMX),
])
def test_exact_logits_are_batch_invariant(tiny_model, forward, tile_rows, dtype, linear):
    runner = _runner(tiny_model, numerics.EXACT, tile_rows, forward, dtype, linear)
    assert runner.forward_kind == ("decoder" if forward == "auto" else "transformers")
    want_rows = 1 if linear in kernels.OURS else tile_rows or numerics.default_tile_rows(dtype)
    assert runner.dtype == dtype and runner.tile_rows == want_rows
    rng = random.Random(tile_rows)
    seq = [rng.randrange(3, VOCAB) for _ in range(300)]  # across two key-block boundaries (128, 256)
    whole = runner.step([Feed(0, 0, seq, 0)])[0]
    for trial in range(3):
        assert torch.equal(_scrambled_logits(runner, seq, random.Random(trial)), whole), f"trial {trial}"


@pytest.mark.parametrize("kv_heads,group,dim,dtype,attend", [
    pytest.param(4, 2, 64, torch.float32, numerics.exact_attention, id="gqa"),
    pytest.param(16, 1, 64, torch.float32, numerics.exact_attention, id="mha"),
    pytest.param(2, 4, 128, torch.float32, numerics.exact_attention, id="wide-heads"),
    pytest.param(4, 2, 64, torch.bfloat16, numerics.exact_attention, id="bfloat16"),
    pytest.param(4, 2, 64, torch.bfloat16, numerics.kernel_attention, id="bfloat16-kernel", marks=NEEDS_KERNEL),
    pytest.param(3, 3, 64, torch.bfloat16, numerics.kernel_attention, id="smollm2-kernel", marks=NEEDS_KERNEL),
    pytest.param(3, 3, 64, torch.bfloat16, functools.partial(numerics.kernel_attention, kernel=kernels.AMX_BF16),
                 id="smollm2-amx", marks=NEEDS_AMX),
])
def test_exact_attention_is_invariant(kv_heads, group, dim, dtype, attend):
    """A row's attention output, bit for bit, whatever the padded key length, the other rows,
    and the layout (a prefill's shared keys or a decode batch's keys per row); with torch's fixed
    block products or with our kernel."""
    torch.manual_seed(0)
    k = torch.randn(1, kv_heads, 1024, dim).to(dtype)
    v = torch.randn(1, kv_heads, 1024, dim).to(dtype)
    positions = torch.tensor([0, 5, 127, 128, 130, 300, 511])
    q = torch.randn(len(positions), kv_heads, group, dim).to(dtype)
    want = None
    for length in (512, 640, 1024):
        mask = numerics.key_mask(positions, length)
        keys, values = k[:, :, :length], v[:, :, :length]
        shared = attend(q, keys, values, mask, 0.125)
        want = shared if want is None else want
        assert torch.equal(shared, want), f"padded to {length}"
        per_row = (keys.expand(len(positions), -1, -1, -1).contiguous(),
                   values.expand(len(positions), -1, -1, -1).contiguous())
        assert torch.equal(attend(q, *per_row, mask, 0.125), want), "decode layout"
        for rows in (slice(0, 1), slice(0, 3), slice(2, 7), slice(4, 5)):
            assert torch.equal(attend(q[rows], keys, values, mask[rows], 0.125), want[rows]), rows
    for i, p in enumerate(positions.tolist()):  # each row alone at its shortest padded length
        end = numerics.round_up(p + 1, numerics.KEY_BLOCK)
        alone = attend(q[i:i + 1], k[:, :, :end], v[:, :, :end],
                                         numerics.key_mask(positions[i:i + 1], end), 0.125)
        assert torch.equal(alone[0], want[i]), f"row {i} alone"
    full = numerics.fast_attention(q.float(), k[:, :, :512].float(), v[:, :, :512].float(),
                                   numerics.key_mask(positions, 512), 0.125)
    assert torch.allclose(want.float(), full, atol=1e-5 if dtype is torch.float32 else 5e-2)  # it is attention


@pytest.mark.parametrize("forward", ["auto", "transformers"])
@pytest.mark.parametrize("mode", numerics.MODES)
def test_runner_matches_transformers(tiny_model, hf_model, mode, forward):
    runner = _runner(tiny_model, mode, forward=forward)
    seq = list(range(3, 60))
    ours = runner.step([Feed(2, 0, seq, 0)])[0]
    with torch.inference_mode():
        ref = hf_model(torch.tensor([seq])).logits[0].float()
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("linear", [kernels.TORCH, *OUR_KERNELS])
@pytest.mark.parametrize("forward", ["auto", "transformers"])
@pytest.mark.parametrize("mode", numerics.MODES)
def test_bf16_runner_matches_transformers_in_bf16(tiny_model, mode, forward, linear):
    """In bfloat16 the runner computes what transformers' own modules compute in bfloat16, within
    bf16 rounding (the two sum in different orders): its distance from the float32 logits is at
    most 1.5x transformers' own bf16 distance, and it picks the same tokens."""
    runner = _runner(tiny_model, mode, None, forward=forward, dtype=torch.bfloat16, linear=linear)
    seq = list(range(3, 60))
    ours = runner.step([Feed(2, 0, seq, 0)])[0]
    ref_model = _model(tiny_model, torch.bfloat16)
    with torch.inference_mode():
        ref = ref_model(torch.tensor([seq])).logits[0].float()
        full = load_model(tiny_model)(torch.tensor([seq])).logits[0].float()
    assert ours.dtype == torch.float32 and runner.cache.k[0].dtype == torch.bfloat16
    theirs_error = (ref - full).abs().max().item()
    assert 0 < theirs_error < 0.2 * full.std().item()  # bf16 rounding: present, and small
    assert (ours - full).abs().max().item() <= 1.5 * theirs_error, ((ours - full).abs().max(), theirs_error)
    assert (ours - ref).abs().max().item() <= 1.5 * theirs_error
    assert (ours.argmax(-1) == full.argmax(-1)).float().mean() >= 0.9


def test_feed_validation(tiny_model):
    runner = _runner(tiny_model, numerics.EXACT)
    with pytest.raises(ValueError, match="at least one token"):
        runner.step([Feed(0, 0, [], None)])
    with pytest.raises(ValueError, match="exceed max_len"):
        runner.step([Feed(0, 506, list(range(3, 13)), None)])
    with pytest.raises(ValueError, match="numerics"):
        ModelRunner(load_model(tiny_model), slots=1, max_len=64, mode="approximate")
    with pytest.raises(ValueError, match="forward"):
        ModelRunner(load_model(tiny_model), slots=1, max_len=64, forward="fastest")


def test_lean_decoder_support():
    from functions.llm.decoder import unsupported

    class Cfg:
        model_type, hidden_act, rope_parameters, mlp_bias = "llama", "silu", {"rope_type": "default"}, False

    class Model:
        config, model, lm_head = Cfg(), type("Inner", (), {"layers": []})(), None

    assert unsupported(Model()) is None
    for field, value, why in [("model_type", "gpt2", "model_type"), ("hidden_act", "gelu", "hidden_act"),
                              ("rope_parameters", {"rope_type": "yarn"}, "rope_type"), ("mlp_bias", True, "mlp_bias")]:
        m = Model()
        m.config = type("C", (Cfg,), {field: value})()
        assert why in unsupported(m)


@pytest.mark.parametrize("dims,itemsize,multiple", [
    pytest.param([4096, 11008, 128, 4096], 4, 1, id="llama-7b"),
    pytest.param([64, 128, 16, 64], 4, 2, id="tiny"),
    pytest.param([100, 300, 25], 4, 32, id="odd"),
    pytest.param([48, 96], 4, 2, id="multiple-of-16"),
    pytest.param([4096, 11008, 128, 4096], 2, 1, id="llama-7b-bf16"),
    pytest.param([576, 1536, 64, 576], 2, 1, id="smollm2-135m-bf16"),
    pytest.param([64, 128, 16, 64], 2, 4, id="tiny-bf16"),
    pytest.param([48, 96], 2, 4, id="multiple-of-16-bf16"),
])
def test_row_multiple(dims, itemsize, multiple):
    assert numerics.row_multiple(dims, itemsize) == multiple


@pytest.mark.parametrize("dtype,device,rows", [
    (torch.bfloat16, "cpu", 16), (torch.float32, "cpu", 2), (torch.float16, "cpu", 2),
    (torch.bfloat16, "cuda", 2),  # the GPU path keeps its tile
])
def test_default_tile_rows(dtype, device, rows):
    assert numerics.default_tile_rows(dtype, device) == rows


def test_tiled_linear_is_a_linear():
    torch.manual_seed(0)
    lin = torch.nn.Linear(24, 40)
    tiled = numerics.TiledLinear(lin, 4)
    x = torch.randn(3, 7, 24)
    torch.testing.assert_close(tiled(x), lin(x))
    assert tiled.weight is lin.weight  # shared, not copied
    rows = torch.randn(13, 24)
    assert torch.equal(tiled(rows)[5], tiled(torch.cat([rows[5:6], rows[:3]]))[0])  # a row is a row


def test_converted_checkpoint_serves_the_same_logits(tiny_model, tmp_path):
    """The function loads the loading-optimised format through sllm_knative.loading: same bits."""
    from sllm_knative.convert import convert

    ckpt = convert(tiny_model, tmp_path / "ckpt", partitions=2)
    seq = list(range(3, 40))
    a = _runner(tiny_model, numerics.EXACT).step([Feed(0, 0, seq, 0)])[0]
    b = ModelRunner(load_model(ckpt), slots=2, max_len=256).step([Feed(1, 0, seq, 0)])[0]
    assert torch.equal(a, b)


@pytest.mark.parametrize("mode,threads,expected", [
    (numerics.FAST, 1, 1),
    (numerics.EXACT, 3, 1),  # exact numerics keeps one intra-op thread whatever it is given
])
def test_the_engine_thread_computes_with_the_threads_it_is_given(tiny_model, mode, threads, expected):
    import threading

    runner = ModelRunner(load_model(tiny_model), slots=2, max_len=64, mode=mode, threads=threads)
    seen: list[int] = []

    def engine_thread() -> None:
        torch.set_num_threads(2)  # what the thread had before: the runner's setting replaces it
        runner.bind_thread()
        seen.append(torch.get_num_threads())

    t = threading.Thread(target=engine_thread)
    t.start()
    t.join()
    assert seen == [expected]
