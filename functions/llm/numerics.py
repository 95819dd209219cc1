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
* Attention is computed per row against that row's own keys, with elementwise products and
  reductions over the head dimension (scores) and the key dimension (values). Keys are padded
  to a multiple of `KEY_PAD`; the padding and the future keys are masked to -inf, so they add
  exact zeros to sums whose lane structure does not depend on the padded length.
* Elementwise kernels must never take their scalar tail path on a real row: the step is padded
  to a multiple of `row_multiple(...)` rows (1 for the usual model shapes).
* Intra-op threads are fixed to one (set by the runner): a parallel split point that depends on
  the number of rows would otherwise move elements between vector and scalar code.

`fast` uses the stock linear layers and scaled-dot-product attention: quicker on large
models, deterministic for a fixed batch composition only. tests/functions/test_llm_numerics.py
checks the exact mode bit for bit.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from functions.llm.runner import StepBatch

EXACT = "exact"
FAST = "fast"
MODES = (EXACT, FAST)
KEY_PAD = 16  # a multiple of the widest float vector (AVX-512: 16 lanes)
_VECTOR_TAIL = 32  # torch's vectorized elementwise loop handles 2 vectors of 16 floats per pass
_ATTN_ELEMENTS = 1 << 22  # bound on the temporary product tensor of the exact attention


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def row_multiple(dims: list[int]) -> int:
    """Rows per step must be a multiple of this so elementwise ops never hit a scalar tail.

    An elementwise op over `rows x dim` floats is vectorized in passes of 32 elements; when
    every dimension is a multiple of 32 (all common LLM shapes) any row count is safe.
    """
    g = 0
    for d in dims:
        g = math.gcd(g, int(d))
    return _VECTOR_TAIL // math.gcd(_VECTOR_TAIL, g or _VECTOR_TAIL)


class TiledLinear(nn.Module):
    """nn.Linear whose rows always go through a matrix multiply of `tile_rows` rows.

    Shares the weight and bias of the module it replaces (no copy).
    """

    def __init__(self, linear: nn.Linear, tile_rows: int) -> None:
        super().__init__()
        self.weight = linear.weight
        self.bias = linear.bias
        self.tile_rows = tile_rows
        self.in_features = linear.in_features
        self.out_features = linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = x.shape[-1]
        rows = x.reshape(-1, k)
        m = rows.shape[0]
        padded = round_up(max(m, 1), self.tile_rows)
        if padded != m:  # the runner sends whole tiles; this keeps the module usable on its own
            rows = nn.functional.pad(rows, (0, 0, 0, padded - m))
        tiles = padded // self.tile_rows
        w = self.weight.t().expand(tiles, k, self.out_features)
        x3 = rows.view(tiles, self.tile_rows, k)
        y = torch.baddbmm(self.bias, x3, w) if self.bias is not None else torch.bmm(x3, w)
        y = y.view(padded, self.out_features)
        return (y if padded == m else y[:m]).view(*x.shape[:-1], self.out_features)


def tile_linears(module: nn.Module, tile_rows: int) -> int:
    """Replace every nn.Linear under module with a TiledLinear; returns how many."""
    count = 0
    for name, child in list(module.named_children()):
        if type(child) is nn.Linear:
            setattr(module, name, TiledLinear(child, tile_rows))
            count += 1
        else:
            count += tile_linears(child, tile_rows)
    return count


def exact_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, masked: torch.Tensor,
                    scaling: float) -> torch.Tensor:
    """Attention of n query rows, each against the keys of its own sequence.

    q: [n, kv_heads, group, d]; k, v: [n or 1, kv_heads, L, d] with L a multiple of KEY_PAD
    (masked entries may hold anything finite); masked: bool [n, 1, 1, L], True where row i must
    not see key j (future or padding). Returns [n, kv_heads, group, d].
    """
    n, kvh, group, d = q.shape
    per_row = kvh * group * k.shape[2] * d
    step = max(1, _ATTN_ELEMENTS // max(per_row, 1))
    if n > step:  # bound the temporary; rows are independent, so chunking changes no bit
        return torch.cat([exact_attention(q[i:i + step], k if k.shape[0] == 1 else k[i:i + step],
                                          v if v.shape[0] == 1 else v[i:i + step], masked[i:i + step], scaling)
                          for i in range(0, n, step)])
    # contiguous(): the reductions below must run over a contiguous last dimension
    scores = torch.mul(q.unsqueeze(3), k.unsqueeze(2)).contiguous().sum(-1)  # [n, kvh, group, L]
    scores = scores * scaling
    scores.masked_fill_(masked, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
    return torch.mul(probs.unsqueeze(-1), v.unsqueeze(2)).contiguous().sum(-2)


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


def packed_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: Any, scaling: float | None = None, dropout: float = 0.0,
                     **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention-interface function for a packed step (see runner.StepBatch).

    query: [1, heads, T, d]; key, value: [1, kv_heads, T, d] for the T new rows of the step
    (rotary already applied). Writes the new keys and values into each row's KV-cache slot,
    then attends every row to its own sequence.
    """
    batch: StepBatch = kwargs["sllm_batch"]
    layer = module.layer_idx
    cache_k, cache_v = batch.cache.k[layer], batch.cache.v[layer]
    t, d = query.shape[2], query.shape[3]
    kvh = key.shape[1]
    cache_k[batch.slots, :, batch.positions] = key[0].transpose(0, 1).to(cache_k.dtype)
    cache_v[batch.slots, :, batch.positions] = value[0].transpose(0, 1).to(cache_v.dtype)
    q = query[0].transpose(0, 1).reshape(t, kvh, -1, d)
    scale = module.scaling if scaling is None else scaling
    attend = exact_attention if batch.mode == EXACT else fast_attention
    parts = []
    if batch.decode is not None:
        dec = batch.decode
        k = cache_k[dec.slots, :, :dec.length]
        v = cache_v[dec.slots, :, :dec.length]
        parts.append((dec.rows, attend(q if dec.rows is None else q[dec.rows], k, v, dec.masked, scale)))
    for seg in batch.prefills:
        k = cache_k[seg.slot, :, :seg.length].unsqueeze(0)
        v = cache_v[seg.slot, :, :seg.length].unsqueeze(0)
        parts.append((slice(seg.row, seg.row + seg.count),
                      attend(q[seg.row: seg.row + seg.count], k, v, seg.masked, scale)))
    if len(parts) == 1 and parts[0][0] is None:  # every row is a decode row: no scatter needed
        out = parts[0][1]
    else:
        out = torch.zeros_like(q)  # padding rows attend to nothing; their output is never used
        for rows, o in parts:
            out[rows] = o
    return out.reshape(1, t, -1, d), None
