"""The linear layers' kernel (functions/llm/kernels.py, cuda_ext/src/cpu_linear.cpp).

The choice is plain logic, tested table-driven. Our two kernels (AVX512-BF16 and AMX) are each
tested where this CPU runs it (otherwise skipped, with the reason): each row's output is the same
bits whatever the other rows, whatever the shape's remainders, and it is the product (against
float64, within bf16 rounding, and as close as torch's own bf16 product). Their threads change no
bit either: odd shapes, two Python threads calling at once, a forked child, and the real model's
steps."""

from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path

import pytest
import torch

from functions.llm import kernels, numerics
from functions.llm.runner import Feed, ModelRunner
from sllm_knative.loading import load_model
from tests.functions.conftest import NEEDS_AMX, NEEDS_KERNEL, OUR_KERNELS, Server

AMX = {"fpu", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}
AVX512_BF16 = {"fpu", "avx512f", "avx512_bf16"}
AVX2 = {"fpu", "avx", "avx2", "fma"}
BOTH = {kernels.AVX512_BF16, kernels.AMX_BF16}  # our kernels that run
ONLY_AVX512 = {kernels.AVX512_BF16}
NONE: set[str] = set()


@pytest.mark.parametrize("setting,mode,device,dtype,flags,runs,linear,why", [
    pytest.param("auto", "exact", "cpu", "bfloat16", AVX512_BF16, ONLY_AVX512, "avx512-bf16", "avx512_bf16: one row",
                 id="avx512"),
    pytest.param("auto", "exact", "cpu", "bfloat16", AMX, BOTH, "amx-bf16", "tile products", id="amx"),
    pytest.param("auto", "exact", "cpu", "bfloat16", AMX, ONLY_AVX512, "avx512-bf16", "its tiles cannot be used",
                 id="amx-not-granted"),
    pytest.param("auto", "exact", "cpu", "bfloat16", AVX2, NONE, "torch", "cannot run it", id="avx2"),
    pytest.param("auto", "exact", "cpu", "bfloat16", AVX2, ONLY_AVX512, "torch", "does not list avx512_bf16",
                 id="avx2-flags"),
    pytest.param("auto", "exact", "cpu", "float32", AMX, BOTH, "torch", "dtype is float32", id="float32"),
    pytest.param("auto", "exact", "cuda", "bfloat16", AMX, BOTH, "torch", "device is cuda", id="cuda"),
    pytest.param("auto", "exact", "cpu", "bfloat16", AVX512_BF16, NONE, "torch", "cannot run it", id="not-built"),
    pytest.param("auto", "fast", "cpu", "bfloat16", AMX, BOTH, "torch", "fast numerics", id="fast"),
    pytest.param("torch", "exact", "cpu", "bfloat16", AMX, BOTH, "torch", "set by --linear", id="torch"),
    pytest.param("avx512-bf16", "exact", "cpu", "bfloat16", AMX, BOTH, "avx512-bf16", "set by --linear",
                 id="forced-avx512-on-amx"),
    pytest.param("amx-bf16", "exact", "cpu", "bfloat16", AMX, BOTH, "amx-bf16", "set by --linear", id="forced-amx"),
    pytest.param("avx512-bf16", "fast", "cpu", "bfloat16", AVX512_BF16, ONLY_AVX512, "avx512-bf16", "set by --linear",
                 id="forced-in-fast"),
])
def test_choose(setting, mode, device, dtype, flags, runs, linear, why):
    choice = kernels.choose(setting, mode, device, dtype, flags, runs)
    assert choice.linear == linear
    assert why in choice.reason
    assert choice.report() == {"linear": linear, "linear_reason": choice.reason}


@pytest.mark.parametrize("setting,device,dtype,runs,message", [
    pytest.param("gemm", "cpu", "bfloat16", BOTH,
                 "linear = 'gemm', must be one of auto, torch, avx512-bf16, amx-bf16", id="unknown"),
    pytest.param("avx512-bf16", "cuda:0", "bfloat16", BOTH, "the device is cuda:0", id="forced-on-cuda"),
    pytest.param("amx-bf16", "cpu", "float32", BOTH, "the compute dtype is float32", id="forced-in-float32"),
    pytest.param("avx512-bf16", "cpu", "bfloat16", NONE, r"cannot run it on this CPU \(built without it, or no AVX",
                 id="forced-unsupported"),
    pytest.param("amx-bf16", "cpu", "bfloat16", ONLY_AVX512, "Linux did not grant the tiles", id="amx-not-granted"),
])
def test_choose_refuses(setting, device, dtype, runs, message):
    with pytest.raises(ValueError, match=message):
        kernels.choose(setting, "exact", device, dtype, AMX, runs)


def test_the_kernels_that_run_here_are_what_the_extension_reports():
    """runnable() is the extension's own answer: AMX only with the AVX512-BF16 kernel, and the
    AVX512-BF16 kernel wherever the CPU lists avx512_bf16 (the extension is built with it here)."""
    from cuda_ext import _C
    from functions.llm import dtypes

    runs = kernels.runnable()
    assert (kernels.AVX512_BF16 in runs) == bool(_C.bf16_linear_supported()) == kernels.built()
    assert (kernels.AMX_BF16 in runs) == bool(_C.amx_linear_supported())
    assert kernels.AMX_BF16 not in runs or kernels.AVX512_BF16 in runs
    assert (kernels.AVX512_BF16 in runs) == ("avx512_bf16" in dtypes.cpu_flags())


@pytest.mark.parametrize("kernel", OUR_KERNELS)
@pytest.mark.parametrize("rows,out,inner,bias", [
    pytest.param(40, 1536, 576, False, id="smollm2-mlp"),
    pytest.param(37, 576, 1536, False, id="smollm2-down"),
    pytest.param(19, 7, 45, True, id="remainders-and-bias"),  # out % 4, inner % 32, rows % 4
    pytest.param(9, 3, 32, True, id="one-k-block"),
    pytest.param(5, 5, 1, False, id="inner-1"),
    pytest.param(35, 40, 70, True, id="amx-partial-tiles"),  # rows % 16, out % 32 > 16, inner % 32
])
def test_each_row_is_the_same_bits_whatever_the_others(rows, out, inner, bias, kernel):
    torch.manual_seed(rows)
    x = torch.randn(rows, inner).bfloat16()
    w = (torch.randn(out, inner) / inner ** 0.5).bfloat16()
    b = torch.randn(out).bfloat16() if bias else None

    def linear(rows_x):
        return kernels.bf16_linear(rows_x, w, b, kernel=kernel)

    y = linear(x)
    assert y.dtype == torch.bfloat16 and y.shape == (rows, out)
    for i in range(rows):
        assert torch.equal(linear(x[i:i + 1])[0], y[i]), f"row {i} alone"
    for lo, hi in ((0, 2), (1, 4), (3, 8), (rows - 5, rows)):
        assert torch.equal(linear(x[lo:hi]), y[lo:hi]), (lo, hi)
    shuffled = torch.randperm(rows)
    assert torch.equal(linear(x[shuffled]), y[shuffled])
    # It is the product: within bf16 rounding of float64's, as close as torch's own bf16 linear.
    exact = x.double() @ w.double().t() + (0 if b is None else b.double())
    ours = (y.double() - exact).abs().max().item()
    theirs = (torch.nn.functional.linear(x, w, b).double() - exact).abs().max().item()
    assert ours <= max(1.5 * theirs, 1e-2 * exact.abs().max().item()), (ours, theirs)


@pytest.mark.parametrize("kernel", OUR_KERNELS)
def test_special_values_and_empty_input(kernel):
    w = torch.ones(4, 64).bfloat16()
    x = torch.zeros(3, 64).bfloat16()
    x[0, 5] = float("nan")
    x[1, 7] = float("inf")
    y = kernels.bf16_linear(x, w, None, kernel=kernel)
    assert torch.isnan(y[0]).all() and torch.isinf(y[1]).all() and (y[2] == 0).all()
    assert kernels.bf16_linear(torch.zeros(0, 64).bfloat16(), w, None, kernel=kernel).shape == (0, 4)
    # a non-contiguous input is made contiguous; the result is the same
    wide = torch.randn(6, 128).bfloat16()
    assert torch.equal(kernels.bf16_linear(wide[:, ::2], w, None, kernel=kernel),
                       kernels.bf16_linear(wide[:, ::2].contiguous(), w, None, kernel=kernel))


@pytest.mark.parametrize("rows,out,inner", [(1, 1536, 576), (40, 576, 1536), (19, 7, 45)])
def test_the_two_kernels_are_the_same_product(rows, out, inner):
    """AMX and AVX512-BF16 sum in other orders, so their bits may differ, but each is within bf16
    rounding of the other (one float32 sum rounded to bf16 either way)."""
    if not {kernels.AVX512_BF16, kernels.AMX_BF16} <= kernels.runnable():
        pytest.skip("needs both kernels: this CPU has no AMX-BF16, or its tiles are not granted")
    x, w, b = _operands(rows, out, inner, 1, True, seed=rows + out)
    amx = kernels.bf16_linear(x[0], w[0], b, kernel=kernels.AMX_BF16).double()
    avx = kernels.bf16_linear(x[0], w[0], b, kernel=kernels.AVX512_BF16).double()
    assert ((amx - avx).abs() <= 2 ** -7 * torch.maximum(amx.abs(), avx.abs()) + 1e-6).all()


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


@pytest.mark.parametrize("kernel", [kernels.TORCH, "amx", ""])
def test_a_kernel_that_is_not_ours_is_refused(kernel):
    x, w = torch.zeros(2, 64).bfloat16(), torch.zeros(4, 64).bfloat16()
    with pytest.raises(ValueError, match=rf"bf16_linear: kernel = {kernel!r}, must be one of"):
        kernels.bf16_linear(x, w, None, kernel=kernel)
    with pytest.raises(ValueError, match=rf"bf16_bmm: kernel = {kernel!r}, must be one of"):
        kernels.bf16_bmm(x[None], w[None], kernel=kernel)


@NEEDS_KERNEL
def test_the_extension_checks_its_sizes():
    from cuda_ext import _C

    with pytest.raises(ValueError, match="need m >= 0, n >= 1, k >= 1"):
        _C.bf16_linear(0, 0, 0, 0, 1, 0, 8)


@NEEDS_KERNEL
@pytest.mark.parametrize("threads", [0, -1, -(2 ** 40), 257])
def test_a_bad_thread_count_is_refused_with_the_value(threads):
    from cuda_ext import _C

    x, w = torch.zeros(2, 64).bfloat16(), torch.zeros(4, 64).bfloat16()
    message = rf"threads = {threads}: need 1 <= threads <= 256"
    with pytest.raises(ValueError, match=message):
        kernels.bf16_linear(x, w, None, threads=threads)
    with pytest.raises(ValueError, match=message):
        kernels.bf16_bmm(x[None], w[None], threads=threads)
    with pytest.raises(ValueError, match=message):
        _C.bf16_linear(x.data_ptr(), w.data_ptr(), 0, 0, 2, 4, 64, 1, threads=threads)


def _operands(rows: int, out: int, inner: int, batch: int, bias: bool, seed: int) -> tuple:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, rows, inner, generator=g).bfloat16()
    w = (torch.randn(batch, out, inner, generator=g) / inner ** 0.5).bfloat16()
    return x, w, torch.randn(out, generator=g).bfloat16() if bias else None


def _product(x, w, b, threads, kernel=kernels.AVX512_BF16):
    """kernels.bf16_linear for one product, bf16_bmm for a batch."""
    return kernels.bf16_linear(x[0], w[0], b, threads=threads, kernel=kernel)[None] if x.shape[0] == 1 else (
        kernels.bf16_bmm(x, w, threads=threads, kernel=kernel))


# The kernel calls a shape under 2^18 flops (2 rows out in batch) small and keeps it on the caller;
# the others are split: by blocks of 16 weight rows for one input row, 8 for two, 4 for more.
@pytest.mark.parametrize("kernel", OUR_KERNELS)
@pytest.mark.parametrize("rows,out,inner,batch,bias", [
    pytest.param(1, 1537, 576, 1, True, id="one-row-lm-head-like"),    # out % 16 = 1: a padded last block
    pytest.param(2, 1000, 333, 1, False, id="two-rows"),               # out % 8, inner % 32
    pytest.param(3, 250, 576, 1, True, id="three-rows"),               # rows % 4, out % 4
    pytest.param(5, 999, 64, 1, False, id="five-rows"),
    pytest.param(33, 575, 1536, 1, True, id="33-rows"),                # one row in the last row block
    pytest.param(33, 1, 4096, 1, False, id="one-weight-row"),           # one block: nothing to split
    pytest.param(3, 130, 64, 27, False, id="batch-decode-attention"),  # batches split by products
    pytest.param(96, 128, 64, 3, False, id="batch-prefill-attention"),  # 3 products, split by blocks too
    pytest.param(1, 77, 95, 2, False, id="small-stays-on-the-caller"),
])
def test_the_same_bits_on_any_number_of_threads(rows, out, inner, batch, bias, kernel):
    x, w, b = _operands(rows, out, inner, batch, bias, seed=rows * out + inner)
    one = _product(x, w, b, threads=1, kernel=kernel)
    assert one.shape == (batch, rows, out)
    for threads in (2, 3, 4, 7):
        got = _product(x, w, b, threads=threads, kernel=kernel)
        assert torch.equal(got.view(torch.int16), one.view(torch.int16)), threads
    # and each row is still its own: a row alone, on two threads, is the same bits
    assert torch.equal(_product(x[:, -1:], w, b, threads=2, kernel=kernel), one[:, -1:])


def _workers() -> int:
    """The kernel pool's threads in this process (named sllm-linear)."""
    return sum((task / "comm").read_text().strip() == "sllm-linear" for task in Path("/proc/self/task").iterdir())


@pytest.mark.parametrize("kernel", OUR_KERNELS)
def test_two_python_threads_at_once(kernel):
    """Calls from two Python threads at once (the GIL is released in the kernel) each get their own
    product, bit for bit; the pool serves one multi-threaded call at a time."""
    shapes = [(32, 576, 576), (1, 1536, 576), (7, 333, 1536)]
    cases = []
    for i, (rows, out, inner) in enumerate(shapes):
        x, w, b = _operands(rows, out, inner, 1, True, seed=i)
        cases.append((x[0], w[0], b, kernels.bf16_linear(x[0], w[0], b, kernel=kernel)))
    errors: list[str] = []
    start = threading.Barrier(2)

    def hammer(name: str, order: list[int]) -> None:
        start.wait()
        for n in range(60):
            x, w, b, want = cases[order[n % len(order)]]
            if not torch.equal(kernels.bf16_linear(x, w, b, threads=2, kernel=kernel), want):
                errors.append(f"{name}: call {n}")

    threads = [threading.Thread(target=hammer, args=(f"t{i}", order)) for i, order in enumerate(([0, 1, 2], [2, 0, 1]))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a call never returned"
    assert errors == []
    assert _workers() >= 1


@NEEDS_KERNEL
def test_an_idle_pool_leaves_the_cores_alone():
    """Workers spin a moment after a call (the next call of a step finds them awake), then sleep:
    half a second without calls costs this process almost no CPU (a spinning worker: 0.5 s)."""
    x, w, b = _operands(32, 576, 576, 1, False, seed=9)
    for _ in range(20):
        kernels.bf16_linear(x[0], w[0], b, threads=3)
    assert _workers() >= 2
    time.sleep(0.05)
    before = time.process_time()
    time.sleep(0.5)
    assert time.process_time() - before < 0.05


def _wait_child(pid: int, timeout: float) -> int | None:
    """The child's exit code, or None if it is still running after timeout (then it is killed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    return None


@pytest.mark.parametrize("kernel", OUR_KERNELS)
def test_a_forked_child_runs_the_kernel_on_threads(kernel):
    """The pool's threads do not survive fork(): the child (the zygote forks instances) gets a new
    pool on its first call instead of waiting forever for the old one. Forked while another thread
    is making multi-threaded calls too, so a fork can land in the middle of one. With AMX the child
    keeps the parent's grant of the tiles."""
    x, w, b = _operands(32, 576, 576, 1, True, seed=5)
    x, w = x[0], w[0]
    want = kernels.bf16_linear(x, w, b, threads=2, kernel=kernel)
    assert _workers() >= 1
    stop = threading.Event()

    def busy() -> None:
        while not stop.is_set():
            kernels.bf16_linear(x, w, b, threads=2, kernel=kernel)

    background = threading.Thread(target=busy)
    background.start()
    try:
        for _ in range(5):
            pid = os.fork()
            if pid == 0:  # the child: only our kernel, no torch op that could start OpenMP threads
                code = 1
                try:
                    ok = all(torch.equal(kernels.bf16_linear(x, w, b, threads=2, kernel=kernel), want) for _ in range(3))
                    code = 0 if ok and _workers() >= 1 else 2
                finally:
                    os._exit(code)
            assert _wait_child(pid, timeout=60) == 0
    finally:
        stop.set()
        background.join()


@NEEDS_KERNEL
def test_health_ready_reports_the_kernel_threads(tiny_model, tmp_path):
    """/health/ready's compute section: the kernel runs on --threads when given, else on every
    usable core; torch stays on one intra-op thread in exact numerics; null with torch's products."""
    from functions.llm import dtypes

    cases = {("--threads", "2"): 2, (): len(os.sched_getaffinity(0)), ("--threads", "3", "--linear", "torch"): None}
    ours = kernels.choose("auto", "exact", "cpu", "bfloat16", dtypes.cpu_flags(), kernels.runnable()).linear
    servers = {extra: Server(tiny_model, tmp_path / f"{i}.log", "--dtype", "bfloat16", *extra)
               for i, extra in enumerate(cases)}
    try:
        for extra, server in servers.items():
            compute = server.wait_ready()["compute"]
            assert compute["linear"] == (kernels.TORCH if "torch" in extra else ours), compute
            assert (compute["numerics"], compute["threads"]) == ("exact", 1), compute
            assert compute["kernel_threads"] == cases[extra], (extra, compute)
    finally:
        for server in servers.values():
            server.stop()


# The real model: the same logits bit for bit with the kernel on 1, 2 or 3 threads.
@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    from tests.checkpoint.gguf_files import converted_smollm2

    return converted_smollm2(tmp_path_factory)[0]


@pytest.mark.parametrize("kernel", OUR_KERNELS)
def test_the_real_model_is_the_same_bits_on_any_number_of_kernel_threads(smollm2, kernel):
    """SmolLM2-135M in exact bf16 with our kernel: a prefill, chunked prefills among decode rows, and
    eight decode rows, with the kernel on 1, 2 and 3 threads (torch on one intra-op thread): the
    logits are equal bit for bit, and the numerics fingerprint does not name the thread count."""
    rng = random.Random(11)
    prompts = [[rng.randrange(3, 49152) for _ in range(n)] for n in (140, 33, 9, 20, 20, 20, 20, 20)]
    results = {}
    fingerprints = {}
    model = load_model(smollm2)
    for threads in (1, 2, 3):
        runner = ModelRunner(model, slots=8, max_len=512, mode=numerics.EXACT, threads=threads,
                             linear=kernel)
        assert (runner.threads, runner.kernel_threads) == (1, threads)
        got = [runner.step([Feed(0, 0, prompts[0], 0)])[0]]                      # a 140-row prefill
        got += runner.step([Feed(s, 0, prompts[s], len(prompts[s]) - 1) for s in range(1, 8)])
        for i in range(3):                                                       # decode rows among a chunk
            got += runner.step([Feed(s, len(prompts[s]) + i, [prompts[s][i]], 0) for s in range(1, 8)]
                               + [Feed(0, 140 + 5 * i, prompts[1][5 * i:5 * i + 5], 0)])
        results[threads] = got
        fingerprints[threads] = runner.fingerprint()
    assert len(results[1]) == 1 + 7 + 3 * 8
    for threads in (2, 3):
        assert all(torch.equal(a, b) for a, b in zip(results[1], results[threads], strict=True)), threads
        assert fingerprints[threads] == fingerprints[1]
    assert not any("thread" in key for key in fingerprints[1])


@pytest.mark.parametrize("kernel", OUR_KERNELS)
def test_bmm_is_each_product_alone(kernel):
    torch.manual_seed(3)
    x = torch.randn(5, 6, 64).bfloat16()
    w = torch.randn(5, 130, 64).bfloat16()
    y = kernels.bf16_bmm(x, w, kernel=kernel)
    assert y.shape == (5, 6, 130)
    for b in range(5):
        assert torch.equal(y[b], kernels.bf16_linear(x[b], w[b], None, kernel=kernel)), b
    # strided views are made contiguous first (attention passes transposed values)
    wt = torch.randn(5, 64, 130).bfloat16()
    assert torch.equal(kernels.bf16_bmm(x, wt.transpose(1, 2), kernel=kernel),
                       kernels.bf16_bmm(x, wt.transpose(1, 2).contiguous(), kernel=kernel))
    with pytest.raises(ValueError, match=r"differ in batch"):
        kernels.bf16_bmm(x, w[:4])
    with pytest.raises(ValueError, match=r"need x \[batch, rows, in\]"):
        kernels.bf16_bmm(x[0], w[0])


@pytest.mark.parametrize("kernel", OUR_KERNELS)
def test_bmm_reads_products_apart_in_place(kernel):
    """A decode row's keys in the KV cache: per (slot, head) the first `length` rows of a longer
    block. The kernel reads each product where it lies (w_stride) and computes the bits of the
    contiguous copy; a stride under one product's size is refused by the extension."""
    from cuda_ext import _C

    torch.manual_seed(4)
    cache = torch.randn(3, 2, 96, 64).bfloat16()  # [slots, kv heads, max len, d]
    keys = cache[:, :, :40].reshape(6, 40, 64)  # a view: products 96 * 64 elements apart
    assert keys.data_ptr() == cache.data_ptr() and keys.stride(0) == 96 * 64
    x = torch.randn(6, 3, 64).bfloat16()
    assert torch.equal(kernels.bf16_bmm(x, keys, kernel=kernel), kernels.bf16_bmm(x, keys.contiguous(), kernel=kernel))
    overlapping = torch.randn(64 * 64).bfloat16().as_strided((6, 40, 64), (64, 64, 1))  # products overlap: copied
    assert torch.equal(kernels.bf16_bmm(x, overlapping, kernel=kernel),
                       kernels.bf16_bmm(x, overlapping.contiguous(), kernel=kernel))
    y = torch.empty(6, 3, 40).bfloat16()
    for stride, batch in ((40 * 64 - 1, 6), (96 * 64, 1)):
        with pytest.raises(ValueError, match=rf"w_stride = {stride}: need 0 \(packed\) or, for batch >= 2"):
            _C.bf16_linear(x.data_ptr(), keys.data_ptr(), 0, y.data_ptr(), 3, 40, 64, batch, w_stride=stride)


def _rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@NEEDS_AMX
def test_a_long_context_product_gives_its_packed_rows_back():
    """AMX packs the rows of a call 16 at a time, zero-padded (a decode row's attention over 64k
    keys packs 2 MiB per head); the packing is kept between calls up to 64 MiB and given back
    above that, and such a call is still each row on its own."""
    g = torch.Generator().manual_seed(12)
    x = torch.randn(17, 17, 65536, generator=g).bfloat16()  # packed: 17 x 2 x 2048 x 1 KiB = 68 MiB
    w = (torch.randn(17, 16, 65536, generator=g) / 256).bfloat16()
    before = _rss_bytes()
    y = kernels.bf16_bmm(x, w, kernel=kernels.AMX_BF16)
    grown = _rss_bytes() - before
    assert grown < 32 << 20, f"the call kept {grown >> 20} MiB"
    assert torch.equal(kernels.bf16_linear(x[3, 5:6], w[3], None, kernel=kernels.AMX_BF16), y[3, 5:6])
