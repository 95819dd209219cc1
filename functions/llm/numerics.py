"""Numerics of the packed forward pass: batch-invariant ("exact") or plain ("fast").

Continuous batching runs the rows of many sequences through one forward pass. With the
stock kernels the result for one row depends on the others: a matrix multiply picks its
kernel (and so its summation order) by the number of rows, and attention kernels split the
keys into blocks whose size depends on the sequence length. The same token can then get
logits that differ in the last bits depending on what else was in the batch, whether its key
and value were computed in a prefill or a decode step, and how a prompt was chunked.

`exact` removes every such dependency, so the logits of a sequence are a function of its
token ids alone (bit for bit, for one torch build, device type and set of options):

* Linear layers run in fixed tiles of `tile_rows` rows (`TiledLinear`): every row goes
  through a matrix multiply of the same shape, whatever the number of rows in the step.
* Attention is computed per row against that row's own keys, in blocks of `KEY_BLOCK` (128)
  keys: each block's scores and its share of the output are matrix multiplies of one fixed
  shape ([128, d] @ [d, group] and [group, 128] @ [128, d]) whatever the context or the number
  of rows, and the blocks' shares are added in order (a sequential scan). Keys are padded to
  a multiple of `KEY_BLOCK`; the padding and the future keys are masked to -inf,
  so they add exact zeros: to the softmax, whose lane structure does not depend on the padded
  length, and to the blocks' sum. (The previous form, elementwise products and reductions
  over the whole context, was invariant too but 2.5-5x slower at 3000 tokens: it wrote a
  context x hidden temporary per row and layer.)
* Elementwise kernels must never take their scalar tail path on a real row: the step is padded
  to a multiple of `row_multiple(...)` rows (1 for the usual model shapes; the vectorized loop
  takes 32 float32 or 64 bfloat16/float16 elements per pass).
* Intra-op threads are fixed to one (set by the runner): a parallel split point that depends on
  the number of rows would otherwise move elements between vector and scalar code. (Our kernel
  below is the exception: it splits only by whole blocks of output columns and by products, so
  it runs on the instance's share of the cores with the same bits as on one.)

The same construction holds in bfloat16 (on the CPU the tiles are oneDNN matrix multiplies, AMX
where the CPU has it, of one fixed shape): tested bit for bit like float32. Its default tile is
16 rows (`default_tile_rows`): one AMX tile, and a 16-row bf16 product costs about what a 2-row
one does, so 8 decoding streams share one multiply per layer instead of four.

On a CPU with AMX or AVX512-BF16, the linear layers use one of our own kernels instead of tiles
(`functions/llm/kernels.py`, cuda_ext/src/cpu_linear.cpp: `amx-bf16` or `avx512-bf16`): every
output element has its own accumulator and a fixed instruction sequence, so a row's result is
invariant for any row count and a decoding stream is not padded to a tile. Attention's two
products then go through the same kernel too (`kernel_attention`): the scores reduce over the
head dimension, the output over the keys, each in the kernel's fixed order, so no fixed-shape
blocks are needed and a prefill's shared keys are no longer copied once per row.

`fast` uses the stock linear layers and scaled-dot-product attention: quicker on large
models, deterministic for a fixed batch composition only. tests/functions/test_llm_numerics.py
checks the exact mode bit for bit.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from functions.llm import kernels

if TYPE_CHECKING:
    from functions.llm.runner import StepBatch

EXACT = "exact"
FAST = "fast"
MODES = (EXACT, FAST)
# Keys per matrix multiply of the exact attention; key lengths are padded to a multiple of it in
# both modes (also a multiple of the widest float vector, 16 lanes).
KEY_BLOCK = 128
# torch's vectorized elementwise loop handles 2 vectors per pass: 2 x 16 float32, 2 x 32 bf16/fp16
_VECTOR_BYTES = 128


def default_tile_rows(dtype: Any, device_type: str = "cpu") -> int:
    """Rows per tile of the exact linear layers when not configured: 16 in bfloat16 on the CPU
    (one AMX tile; measured on this project's CPU, [16, 576] @ [576, 1536] takes 222 us against
    218 us for 2 rows, one thread), 2 otherwise (float32: 520 us against 213 us; CUDA unchanged)."""
    return 16 if dtype == torch.bfloat16 and device_type == "cpu" else 2


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def row_multiple(dims: list[int], itemsize: int = 4) -> int:
    """Rows per step must be a multiple of this so elementwise ops never hit a scalar tail.

    An elementwise op over `rows x dim` elements of `itemsize` bytes is vectorized in passes of
    128 bytes (32 float32, 64 bfloat16); when every dimension is a multiple of that (all common
    LLM shapes) any row count is safe. Ops of a half-precision model also run in float32 (norms,
    softmax), whose passes are shorter, so the larger pass decides.
    """
    tail = _VECTOR_BYTES // min(itemsize, 4)
    g = 0
    for d in dims:
        g = math.gcd(g, int(d))
    return tail // math.gcd(tail, g or tail)


def tiled_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tile_rows: int) -> torch.Tensor:
    """x @ weight.T + bias with every row in a matrix multiply of exactly tile_rows rows.

    x: [rows, in]; weight: [out, in] (used as a transposed view, never copied).
    """
    m, k = x.shape
    padded = round_up(max(m, 1), tile_rows)
    if padded != m:  # the runner sends whole tiles; this keeps the function usable on its own
        x = nn.functional.pad(x, (0, 0, 0, padded - m))
    # One matrix multiply per tile, all of the same shape. (A single bmm over an expanded weight
    # gives the same invariance but has no fast half-precision kernel on the CPU: over 100x
    # slower than mm in float16/bfloat16.)
    wt = weight.t()
    parts = [torch.mm(x[i:i + tile_rows], wt) if bias is None else torch.addmm(bias, x[i:i + tile_rows], wt)
             for i in range(0, padded, tile_rows)]
    y = parts[0] if len(parts) == 1 else torch.cat(parts)
    return y if padded == m else y[:m]


def linear_function(mode: str, tile_rows: int, linear: str = "torch", threads: int = 1) -> Callable[
        [torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]:
    """The linear layer of a numerics mode: (x [rows, in], weight, bias) -> [rows, out].

    `linear` is the kernel (functions/llm/kernels.py): "torch" (tiles of `tile_rows` rows in exact
    numerics, torch's own linear in fast) or one of ours, "avx512-bf16" or "amx-bf16" (invariant
    for any row count: no tiles; on `threads` threads, the same bits for any count).
    """
    if linear in kernels.OURS:
        return functools.partial(kernels.bf16_linear, threads=threads, kernel=linear)
    if mode == EXACT:
        return lambda x, w, b: tiled_linear(x, w, b, tile_rows)
    return nn.functional.linear


class TiledLinear(nn.Module):
    """nn.Linear through an exact linear function (`linear_function`); shares the weight and bias
    of the module it replaces."""

    def __init__(self, linear: nn.Linear, tile_rows: int, kernel: str = "torch", threads: int = 1) -> None:
        super().__init__()
        self.weight = linear.weight
        self.bias = linear.bias
        self.tile_rows = tile_rows
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self._linear = linear_function(EXACT, tile_rows, kernel, threads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._linear(x.reshape(-1, x.shape[-1]), self.weight, self.bias)
        return y.view(*x.shape[:-1], self.out_features)


def tile_linears(module: nn.Module, tile_rows: int, kernel: str = "torch", threads: int = 1) -> int:
    """Replace every nn.Linear under module with a TiledLinear; returns how many."""
    count = 0
    for name, child in list(module.named_children()):
        if type(child) is nn.Linear:
            setattr(module, name, TiledLinear(child, tile_rows, kernel, threads))
            count += 1
        else:
            count += tile_linears(child, tile_rows, kernel, threads)
    return count


def _attend_blocks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, masked: torch.Tensor,
                   scaling: float) -> torch.Tensor:
    """exact_attention for rows that share one key length L (a multiple of KEY_BLOCK)."""
    n, kvh, group, d = q.shape
    length = k.shape[2]
    nb, kb = length // KEY_BLOCK, k.shape[0]
    # Scores: one [KEY_BLOCK, d] @ [d, group] matrix multiply per (row, kv head, key block).
    # The query is made contiguous first: torch.matmul copies an operand it broadcasts (the
    # query over the key blocks) and views one it does not, so a transposed query would reach
    # the BLAS as a transposed matrix in one call and a plain one in another, and MKL on an AMD
    # CPU rounds the two differently. A one-column product (group 1: no grouped-query heads)
    # takes another MKL path for a single matrix than for a batch: it gets a zero second column.
    qt = q.reshape(n, kvh, 1, group, d).transpose(-1, -2)
    if group == 1:
        qt = torch.cat([qt, torch.zeros_like(qt)], dim=-1)
    s = torch.matmul(k.reshape(kb, kvh, nb, KEY_BLOCK, d), qt.contiguous())[..., :group]
    scores = s.permute(0, 1, 4, 2, 3).reshape(n, kvh, group, length) * scaling
    scores.masked_fill_(masked, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
    # Values: one [group, KEY_BLOCK] @ [KEY_BLOCK, d] per (row, kv head, key block), then the
    # blocks' partial sums added in order (cumsum is a sequential scan; a block past the row's
    # position adds an exact zero). torch.sum over the blocks would pick its grouping by count.
    parts = torch.matmul(probs.reshape(n, kvh, group, nb, KEY_BLOCK).permute(0, 1, 3, 2, 4),
                         v.reshape(kb, kvh, nb, KEY_BLOCK, d))
    return parts.cumsum(dim=2)[:, :, -1].contiguous()


def exact_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, masked: torch.Tensor,
                    scaling: float) -> torch.Tensor:
    """Attention of n query rows, each against the keys of its own sequence.

    q: [n, kv_heads, group, d]; k, v: [n or 1, kv_heads, L, d] with L a multiple of KEY_BLOCK
    (masked entries may hold anything finite); masked: bool [n, 1, 1, L], True where row i must
    not see key j (future or padding). Returns [n, kv_heads, group, d].

    Keys are taken in blocks of KEY_BLOCK, and every matrix multiply has the same shape whatever
    the number of rows or the context, so a row's result depends only on its own query, keys
    and values. Rows of one sequence (a prefill, k and v shared) each run over the blocks up to
    their own position only (the blocks after it would add exact zeros): the rows that need the
    same number of blocks go together (a 100-token prompt: one call, not 100), and each row's
    products are the same ones it would get alone.
    """
    if k.shape[0] == 1 and q.shape[0] > 1:
        visible = (~masked[:, 0, 0, :]).sum(-1).tolist()  # row i sees keys 0..position_i
        ends = [round_up(max(count, 1), KEY_BLOCK) for count in visible]
        out = []
        start = 0
        for i in range(1, len(ends) + 1):
            if i == len(ends) or ends[i] != ends[start]:
                end = ends[start]
                out.append(_attend_blocks(q[start:i], k[:, :, :end], v[:, :, :end], masked[start:i, :, :, :end],
                                          scaling))
                start = i
        return out[0] if len(out) == 1 else torch.cat(out)
    return _attend_blocks(q, k, v, masked, scaling)


def _kernel_softmax(scores: torch.Tensor, masked: torch.Tensor, scaling: float) -> torch.Tensor:
    """exact attention's softmax (as _attend_blocks): scaled in bf16, masked to -inf, in float32."""
    scores = scores * scaling
    scores.masked_fill_(masked, float("-inf"))
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(torch.bfloat16)


def kernel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, masked: torch.Tensor,
                     scaling: float, threads: int = 1, kernel: str = kernels.AVX512_BF16) -> torch.Tensor:
    """exact_attention's contract, with both products through our `kernel` (avx512-bf16, amx-bf16).

    The kernel reduces each output in one fixed order whatever the number of rows and columns
    (functions/llm/kernels.py), so a row's scores (a sum over the head dimension) and its output
    (a sum over the keys, where masked and padded keys have probability exactly 0 and add exact
    zeros) do not depend on the other rows or on the padded length: the same invariance as
    _attend_blocks, without expanding a prefill's shared keys once per row (that broadcast copy
    was a third of a 256-token prefill). One batched call per product: per kv head for a
    prefill's rows that reach the same number of key blocks, per (row, kv head) for decode rows.
    `threads`: the kernel's (the same bits for any count); `kernel`: which of ours.
    """
    n, kvh, group, d = q.shape
    if k.shape[0] == 1 and n > 1:  # a prefill's rows share their sequence's keys
        visible = (~masked[:, 0, 0, :]).sum(-1).tolist()
        ends = [round_up(max(count, 1), KEY_BLOCK) for count in visible]
        out = torch.empty_like(q)
        start = 0
        for i in range(1, n + 1):
            if i < n and ends[i] == ends[start]:
                continue
            end = ends[start]
            out[start:i] = _kernel_heads(q[start:i].transpose(0, 1), k[0, :, :end], v[0, :, :end],
                                         masked[start:i, :, :, :end].transpose(0, 1), scaling,
                                         threads, kernel).transpose(0, 1)
            start = i
        return out
    # decode rows, each with its own keys (or one row): (row, kv head) is the batch
    length = k.shape[2]
    keys = k.expand(n, -1, -1, -1).reshape(n * kvh, length, d)
    values = v.expand(n, -1, -1, -1).reshape(n * kvh, length, d)
    mask = masked.expand(n, kvh, 1, length).reshape(n * kvh, 1, 1, length)
    return _kernel_heads(q.reshape(n * kvh, 1, group, d), keys, values, mask, scaling, threads, kernel).view(
        n, kvh, group, d)


def _kernel_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                  scaling: float, threads: int, kernel: str) -> torch.Tensor:
    """Attention of B independent heads: q [B, m, group, d] against k, v [B, L, d]; mask [B or 1,
    m, 1, L] (True: not visible), the same for a row's whole group. Returns [B, m, group, d]."""
    b, m, group, d = q.shape
    length = k.shape[1]
    scores = kernels.bf16_bmm(q.reshape(b, m * group, d), k, threads, kernel)  # [B, m * group, L]
    probs = _kernel_softmax(scores.view(b, m, group, length), mask, scaling)
    out = kernels.bf16_bmm(probs.view(b, m * group, length), v.transpose(1, 2), threads, kernel)  # [B, m*group, d]
    return out.view(b, m, group, d)


def fast_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, masked: torch.Tensor,
                   scaling: float) -> torch.Tensor:
    """Same contract as exact_attention, with torch's scaled-dot-product attention."""
    n, kvh, group, d = q.shape
    length = k.shape[2]
    if k.shape[0] == 1:  # one sequence: its rows are the queries of one attention call
        out = nn.functional.scaled_dot_product_attention(
            q.permute(1, 2, 0, 3).reshape(1, kvh * group, n, d), k, v,
            attn_mask=~masked.reshape(1, 1, n, length), scale=scaling, enable_gqa=group > 1)
        return out.reshape(kvh, group, n, d).permute(2, 0, 1, 3)
    out = nn.functional.scaled_dot_product_attention(
        q.reshape(n, kvh * group, 1, d), k, v, attn_mask=~masked, scale=scaling, enable_gqa=group > 1)
    return out.reshape(n, kvh, group, d)


def key_mask(positions: torch.Tensor, length: int) -> torch.Tensor:
    """bool [n, 1, 1, length]: True where key j is after row i's position."""
    keys = torch.arange(length, device=positions.device)
    return (keys[None, :] > positions[:, None])[:, None, None, :]


def attend_step(batch: StepBatch, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                scaling: float) -> torch.Tensor:
    """One layer's attention for all rows of a packed step.

    q: [T, heads, d]; k, v: [T, kv_heads, d] (rotary applied). Writes k and v into each row's
    KV-cache slot at its position, then attends each row to its own sequence. Returns [T, heads, d].
    """
    cache_k, cache_v = batch.cache.k[layer], batch.cache.v[layer]
    t, heads, d = q.shape
    kvh = k.shape[1]
    cache_k[batch.slots, :, batch.positions] = k.to(cache_k.dtype)
    cache_v[batch.slots, :, batch.positions] = v.to(cache_v.dtype)
    q4 = q.view(t, kvh, heads // kvh, d)
    attend: Callable[..., torch.Tensor] = fast_attention if batch.mode != EXACT else (
        functools.partial(kernel_attention, threads=batch.kernel_threads, kernel=batch.linear)
        if batch.linear in kernels.OURS else exact_attention)
    parts = []
    if batch.decode is not None:
        dec = batch.decode
        keys = cache_k[dec.slots, :, :dec.length]  # a view when the slots are consecutive
        values = cache_v[dec.slots, :, :dec.length]
        rows = slice(0, dec.count) if dec.rows is None else dec.rows
        parts.append((rows, attend(q4[rows], keys, values, dec.masked, scaling)))
    for seg in batch.prefills:
        keys = cache_k[seg.slot, :, :seg.length].unsqueeze(0)
        values = cache_v[seg.slot, :, :seg.length].unsqueeze(0)
        parts.append((slice(seg.row, seg.row + seg.count),
                      attend(q4[seg.row: seg.row + seg.count], keys, values, seg.masked, scaling)))
    # Rows in no group are padding: their output is never used, zeros keep it finite.
    if len(parts) == 1 and isinstance(parts[0][0], slice) and parts[0][0].start == 0:
        out = parts[0][1]  # one group over the leading rows: no scatter
        if out.shape[0] < t:
            out = torch.cat([out, out.new_zeros((t - out.shape[0], *out.shape[1:]))])
    else:
        out = torch.zeros_like(q4)
        for rows, o in parts:
            out[rows] = o
    return out.view(t, heads, d)


def packed_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: Any, scaling: float | None = None, dropout: float = 0.0,
                     **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention-interface function for a packed step (the generic forward path).

    query: [1, heads, T, d]; key, value: [1, kv_heads, T, d]. Returns ([1, T, heads, d], None).
    """
    out = attend_step(kwargs["sllm_batch"], module.layer_idx, query[0].transpose(0, 1), key[0].transpose(0, 1),
                      value[0].transpose(0, 1), module.scaling if scaling is None else scaling)
    return out.unsqueeze(0), None
