"""The linear layers' kernel: torch's products, or our batch-invariant bf16 ones (AVX512-BF16, AMX).

Exact numerics needs every row of a linear layer computed the same way whatever the other rows
of the step. With torch's products that means one fixed row count per product (`numerics.
tiled_linear`), so one decoding stream pays for a whole tile: without AMX 3x one row ([1, 576]
@ [576, 1536], one thread: 151 us for one row, 471 us for 16 padded rows), and even with AMX
oneDNN re-lays the weight out on every call. Our kernels (cuda_ext/src/cpu_linear.cpp) give
each output its own float32 accumulator and the same instruction sequence for any row count:
batch invariant by construction, no padding, the weights read in place once per call.

* `avx512-bf16`: one `vdpbf16ps` per 32 values of k. One row in about 40 us, 32 rows in about
  what oneDNN takes.
* `amx-bf16`: AMX tile products (TDPBF16PS), the weight loaded as the A tiles where it lies and
  the rows packed as the B tiles. On a 2026-12-07 host with AMX, one thread: 32 rows 145 us
  against 610 for `avx512-bf16`, 256 rows 0.79 against 4.5 ms, one row 71 against 66 us. Other
  bits than `avx512-bf16` (another summation order), so the numerics fingerprint names it.

`--linear auto` (the default) picks, for exact numerics in bf16 on the CPU, `amx-bf16` where the
CPU lists `amx_bf16` and this process may use the tiles, else `avx512-bf16` where it lists
`avx512_bf16`, when the extension runs them (`runnable`); otherwise torch. `--linear
torch|avx512-bf16|amx-bf16` overrides. The choice is plain logic over its inputs (`choose`,
table-tested). `bf16_linear` and `bf16_bmm` are the thin adapters over the extension, and
`rms_norm` and `rotary` those over its elementwise steps, which the lean decoder runs beside our
kernels (cuda_ext/src/cpu_norm.cpp).

Threads: unlike torch's products, the kernel may use several threads in exact numerics. It
splits a call by whole blocks of weight rows (output columns) and by products of a batched call,
never along k, so every output element keeps its accumulator and instruction sequence and the
result is the same bits for any thread count. The runner passes the instance's compute share
(`default_threads`: the `threads` setting, else every usable core) while torch keeps one intra-op
thread. The threads are the caller's plus a persistent pool of workers in the extension, which
spin for 200 us after a call (a step's next call finds them awake) and then sleep; calls under
2^18 flops stay on the caller. A forked child gets a new pool. docs/function.md has the numbers.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from typing import Any

AUTO = "auto"
TORCH = "torch"
AVX512_BF16 = "avx512-bf16"
AMX_BF16 = "amx-bf16"
OURS = (AVX512_BF16, AMX_BF16)  # the extension's kernels
LINEARS = (TORCH, *OURS)
SETTINGS = (AUTO, *LINEARS)


@dataclasses.dataclass(frozen=True)
class LinearChoice:
    """The linear kernel and why it was chosen (for logs and /health/ready)."""

    linear: str
    reason: str

    def report(self) -> dict[str, str]:
        return {"linear": self.linear, "linear_reason": self.reason}


def runnable() -> frozenset[str]:
    """Our kernels that run here: the extension has them, the CPU has the instructions, and (AMX)
    Linux grants this process the tiles."""
    try:
        from cuda_ext import _C
    except ImportError:
        return frozenset()
    have = set()
    if _C.bf16_linear_supported():
        have.add(AVX512_BF16)
        if _C.amx_linear_supported():
            have.add(AMX_BF16)
    return frozenset(have)


def built() -> bool:
    """Whether the AVX512-BF16 kernel runs here."""
    return AVX512_BF16 in runnable()


_CANNOT = {AVX512_BF16: "built without it, or no AVX512-BF16",
           AMX_BF16: "built without it, no AMX-BF16, or Linux did not grant the tiles"}


def choose(setting: str, mode: str, device: str, dtype: str, flags: Iterable[str],
           runs: Iterable[str]) -> LinearChoice:
    """The kernel for `setting` under numerics `mode` ("exact", "fast"), on `device`, computing in
    `dtype` (a torch dtype's name), given the CPU's flags and which of our kernels run here
    (`runnable()`)."""
    if setting not in SETTINGS:
        raise ValueError(f"linear = {setting!r}, must be one of {', '.join(SETTINGS)}")
    if setting == TORCH:
        return LinearChoice(TORCH, "set by --linear / SLLM_LINEAR")
    have, ok = set(flags), set(runs)

    def missing(kernel: str) -> list[str]:
        return [why for bad, why in (
            (not device.startswith("cpu"), f"the device is {device}, not the cpu"),
            (dtype != "bfloat16", f"the compute dtype is {dtype}, not bfloat16"),
            (kernel not in ok, f"the loader extension cannot run it on this CPU ({_CANNOT[kernel]})")) if bad]

    if setting in OURS:
        if why_not := missing(setting):
            raise ValueError(f"linear = {setting} cannot run: {'; '.join(why_not)}")
        return LinearChoice(setting, "set by --linear / SLLM_LINEAR")
    if mode != "exact":
        return LinearChoice(TORCH, "fast numerics: torch's own products, on every intra-op thread")
    if why_not := missing(AVX512_BF16):
        return LinearChoice(TORCH, why_not[0])
    if "amx_bf16" in have and not missing(AMX_BF16):
        return LinearChoice(AMX_BF16, "amx_bf16: tile products, 4x avx512-bf16 on a prefill and about as fast "
                                      "on one row")
    if "avx512_bf16" not in have:
        return LinearChoice(TORCH, "the CPU does not list avx512_bf16")
    why = "amx_bf16 listed, but its tiles cannot be used here; " if "amx_bf16" in have else ""
    return LinearChoice(AVX512_BF16, f"{why}avx512_bf16: one row need not pay for a 16-row tile")


def default_threads(setting: int | None) -> int:
    """The kernel's threads: the `threads` setting (the instance's compute share, SLLM_THREADS)
    when given, else every core this process may run on."""
    return setting if setting is not None else len(os.sched_getaffinity(0))


def bf16_linear(x: Any, weight: Any, bias: Any | None, threads: int = 1, kernel: str = AVX512_BF16) -> Any:
    """x [rows, in] @ weight [out, in]^T (+ bias [out]) with our `kernel` (one of OURS), as a new
    bf16 tensor [rows, out], on up to `threads` threads. Every row is computed independently of
    the others, and the bits do not depend on `threads`."""
    import torch

    from cuda_ext import _C

    _check(x, weight, bias, 2)
    x = x.contiguous()
    bias = None if bias is None else bias.contiguous()
    y = torch.empty((x.shape[0], weight.shape[0]), dtype=torch.bfloat16)
    _C.bf16_linear(x.data_ptr(), weight.data_ptr(), 0 if bias is None else bias.data_ptr(), y.data_ptr(),
                   x.shape[0], weight.shape[0], weight.shape[1], threads=threads, amx=_amx(kernel, "bf16_linear"))
    return y


def bf16_bmm(x: Any, weight: Any, threads: int = 1, kernel: str = AVX512_BF16) -> Any:
    """x [batch, rows, in] @ weight [batch, out, in]^T, product by product, as bf16_linear: a new
    bf16 tensor [batch, rows, out]. One call for many small products (exact attention's, one per
    head), on up to `threads` threads. x is made contiguous; the weight is read where it lies when
    each product's [out, in] is (any distance between products: a decode row's keys in the KV
    cache), else copied first."""
    import torch

    from cuda_ext import _C

    _check(x, weight, None, 3)
    if x.shape[0] != weight.shape[0]:
        raise ValueError(f"bf16_bmm: x {tuple(x.shape)} and weight {tuple(weight.shape)} differ in batch")
    x = x.contiguous()
    batch, rows, inner = x.shape
    out = weight.shape[1]
    rows_in_place = weight.stride(2) == 1 and (out == 1 or weight.stride(1) == inner)
    if not rows_in_place or (batch > 1 and weight.stride(0) < out * inner):  # overlapping products: copied
        weight = weight.contiguous()
    y = torch.empty((batch, rows, out), dtype=torch.bfloat16)
    _C.bf16_linear(x.data_ptr(), weight.data_ptr(), 0, y.data_ptr(), rows, out, inner, batch,
                   threads=threads, amx=_amx(kernel, "bf16_bmm"), w_stride=weight.stride(0) if batch > 1 else 0)
    return y


def rms_norm(x: Any, weight: Any, eps: float) -> Any:
    """LlamaRMSNorm of bf16 rows x [rows, n] with weight [n] in one call of the extension
    (`_C.rms_norm_bf16`: float32 inside, torch's roundings, each row on its own): a new bf16
    tensor. Where our linear kernels run (`runnable()`); the decoder uses it beside them."""
    import torch

    from cuda_ext import _C

    if not (x.dtype is torch.bfloat16 and weight.dtype is torch.bfloat16 and x.is_cpu and x.dim() == 2
            and weight.shape == x.shape[1:]):
        raise ValueError(f"rms_norm takes bf16 cpu x [rows, n] and weight [n], got x {tuple(x.shape)} {x.dtype} "
                         f"on {x.device}, weight {tuple(weight.shape)} {weight.dtype}")
    x, weight = x.contiguous(), weight.contiguous()
    y = torch.empty_like(x)
    _C.rms_norm_bf16(x.data_ptr(), weight.data_ptr(), y.data_ptr(), x.shape[0], x.shape[1], eps)
    return y


def rotary(x: Any, cos: Any, sin: Any) -> Any:
    """The rotary position embedding of bf16 x [rows, heads, d] with cos, sin [rows, 1, d] (or
    [rows, d]), x * cos + rotate_half(x) * sin with each product and the sum rounded to bf16 as
    torch's ops round them, in one call of the extension (`_C.rotary_bf16`); d a multiple of 32."""
    import torch

    from cuda_ext import _C

    rows, heads, d = x.shape
    if not (x.dtype is torch.bfloat16 and cos.dtype is torch.bfloat16 and sin.dtype is torch.bfloat16 and x.is_cpu
            and cos.numel() == sin.numel() == rows * d and d % 32 == 0):
        raise ValueError(f"rotary takes bf16 cpu x [rows, heads, d] (d a multiple of 32) and cos, sin of rows x d, "
                         f"got x {tuple(x.shape)} {x.dtype}, cos {tuple(cos.shape)} {cos.dtype}, "
                         f"sin {tuple(sin.shape)} {sin.dtype}")
    x, cos, sin = x.contiguous(), cos.contiguous(), sin.contiguous()
    y = torch.empty_like(x)
    _C.rotary_bf16(x.data_ptr(), cos.data_ptr(), sin.data_ptr(), y.data_ptr(), rows, heads, d)
    return y


def _amx(kernel: str, what: str) -> bool:
    """Whether `kernel` (one of OURS) is the AMX one; any other name is refused (torch's tiles
    are not computed here: `kernel="torch"` once ran the AVX512 kernel without a word)."""
    if kernel == AMX_BF16:
        return True
    if kernel == AVX512_BF16:
        return False
    raise ValueError(f"{what}: kernel = {kernel!r}, must be one of {', '.join(sorted(OURS))}")


def _check(x: Any, weight: Any, bias: Any | None, dims: int) -> None:
    """The adapters' contract, checked on every call (they are on the engine's hot path, about
    400 calls a step: the common case is a handful of attribute reads; the messages are built
    only for a failure)."""
    import torch

    bf16 = torch.bfloat16
    if (x.dtype is bf16 and weight.dtype is bf16 and (bias is None or bias.dtype is bf16) and x.is_cpu
            and weight.is_cpu and x.dim() == dims and weight.dim() == dims and x.shape[-1] == weight.shape[-1]
            and (bias is None or bias.shape == weight.shape[:1]) and (dims != 2 or weight.is_contiguous())):
        return
    if x.dtype != bf16 or weight.dtype != bf16 or (bias is not None and bias.dtype != bf16):
        raise ValueError(f"bf16_linear takes bfloat16 tensors, got x {x.dtype}, weight {weight.dtype}"
                         f"{'' if bias is None else f', bias {bias.dtype}'}")
    if not (x.is_cpu and weight.is_cpu):
        raise ValueError(f"bf16_linear runs on the cpu, got x on {x.device}, weight on {weight.device}")
    if x.dim() != dims or weight.dim() != dims or x.shape[-1] != weight.shape[-1]:
        shape = "[rows, in] and weight [out, in]" if dims == 2 else "[batch, rows, in] and weight [batch, out, in]"
        raise ValueError(f"bf16_linear: x {tuple(x.shape)} @ weight {tuple(weight.shape)}^T: need x {shape} "
                         f"with the same in")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bf16_linear: bias {tuple(bias.shape)} for weight {tuple(weight.shape)}")
    raise ValueError("bf16_linear: the weight must be contiguous (a row-major [out, in] tensor)")
