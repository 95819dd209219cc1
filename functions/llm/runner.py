"""The packed forward pass: one forward for the new rows of many sequences.

A step feeds each scheduled sequence some of its tokens (a prefill chunk, or the one token
of a decode step). The rows are packed into one batch, each with its own position, and run
through the model together; attention (`numerics.attend_step`) writes each row's key and
value into its sequence's slot of the KV cache and attends the row to its own sequence only.
Only the rows whose logits are wanted reach the LM head.

Two forward paths compute the same thing:
* "decoder": the lean loop of decoder.py for the Llama family (Llama, Mistral, Qwen2);
* "transformers": the model's own modules, with attention routed to `numerics.packed_attention`
  through the transformers attention interface (any decoder that uses that interface).

The KV cache is one tensor per layer for keys and one for values, `[slots + 1, kv_heads,
max_len, head_dim]`: slot i is the cache of whichever sequence holds it, the last slot is the
scratch target of padding rows.
"""

from __future__ import annotations

import dataclasses
import math
import mmap
from collections.abc import Sequence
from typing import Any

import torch
from transformers import AttentionInterface

from functions.llm import decoder, kernels, numerics

_ATTN_NAME = "sllm_packed"
FORWARDS = ("auto", "transformers")  # auto: the lean decoder forward when the model supports it
AttentionInterface.register(_ATTN_NAME, numerics.packed_attention)


@dataclasses.dataclass(frozen=True)
class Feed:
    """Tokens of one sequence for one step.

    slot: its KV-cache slot; start: position of tokens[0]; logits_from: index into tokens
    from which logits are returned (len(tokens) - 1 for the next-token row only; None for none).
    """

    slot: int
    start: int
    tokens: Sequence[int]
    logits_from: int | None


@dataclasses.dataclass
class PrefillSegment:
    """Consecutive rows of one sequence; attends to its cache slot (keys 0..length-1)."""

    slot: int
    row: int
    count: int
    length: int
    masked: torch.Tensor


@dataclasses.dataclass
class DecodeGroup:
    """Single rows of different sequences, attended together against their caches.

    rows: row indices into the step, or None when the group is the first `count` rows.
    slots: their cache slots as a tensor (gathered), or a slice when they are consecutive (a view).
    """

    rows: torch.Tensor | None
    count: int
    slots: torch.Tensor | slice
    length: int
    masked: torch.Tensor


@dataclasses.dataclass
class StepBatch:
    """What the attention function needs to know about a step (shared by all layers)."""

    mode: str
    cache: KVCache
    slots: torch.Tensor
    positions: torch.Tensor
    decode: DecodeGroup | None
    prefills: list[PrefillSegment]
    linear: str = "torch"  # the kernel (functions/llm/kernels.py); ours compute exact attention too
    kernel_threads: int = 1  # our kernel's threads (the same bits for any count)


class KVCache:
    def __init__(self, layers: int, slots: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        shape = (slots + 1, kv_heads, numerics.round_up(max_len, numerics.KEY_BLOCK), head_dim)
        # zeros: padded key positions must hold finite values (they are masked, then multiplied by 0)
        self.k = [_zeros(shape, dtype, device) for _ in range(layers)]
        self.v = [_zeros(shape, dtype, device) for _ in range(layers)]
        self.slots = slots
        self.scratch = slots
        self.max_len = max_len

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero tensor. On the CPU, from an anonymous memory map: the kernel hands out zero pages
    on first touch, so a cache of hundreds of MB costs nothing until used (torch.zeros writes
    every byte up front, about 0.25 s for 0.8 GB on the instance's cold path)."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if nbytes == 0:
        return torch.zeros(shape, dtype=dtype)
    buf = mmap.mmap(-1, nbytes)  # private, anonymous, page-aligned; the tensor keeps it alive
    return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).view(shape)


def _text_config(config: Any) -> Any:
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


class ModelRunner:
    """Owns the model, the KV cache and the numerics; runs one packed step at a time.

    Not thread-safe: the engine thread is its only caller.
    """

    def __init__(self, model: Any, *, slots: int, max_len: int, mode: str = numerics.EXACT,
                 tile_rows: int | None = None, forward: str = "auto", threads: int | None = None,
                 linear: str = kernels.TORCH) -> None:
        if mode not in numerics.MODES:
            raise ValueError(f"numerics = {mode!r}, must be one of {', '.join(numerics.MODES)}")
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype  # the compute dtype: the service casts the weights to it
        if linear not in kernels.LINEARS:
            raise ValueError(f"linear = {linear!r}, must be one of {', '.join(kernels.LINEARS)}")
        if linear in kernels.OURS:
            if self.device.type != "cpu" or self.dtype != torch.bfloat16:
                raise ValueError(f"linear = {linear} computes bfloat16 on the cpu, not {self.dtype} on {self.device}")
            tile_rows = 1  # any row count is invariant: nothing to pad
        if tile_rows is None:
            tile_rows = numerics.default_tile_rows(self.dtype, self.device.type)
        if tile_rows < 1:
            raise ValueError(f"tile_rows = {tile_rows}, must be at least 1")
        if forward not in FORWARDS:
            raise ValueError(f"forward = {forward!r}, must be one of {', '.join(FORWARDS)}")
        cfg = _text_config(model.config)
        window = getattr(cfg, "sliding_window", None)
        if window and window < min(max_len, getattr(cfg, "max_position_embeddings", max_len)):
            raise ValueError(f"sliding_window = {window} is shorter than the context; sliding-window attention "
                             f"is not supported: pass a max-model-len of at most {window}")
        self.model = model
        self.mode = mode
        self.tile_rows = tile_rows
        self.linear = linear
        heads = cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        self.vocab_size = cfg.vocab_size
        self.max_len = min(max_len, getattr(cfg, "max_position_embeddings", max_len))
        if mode == numerics.EXACT and self.max_len > 65536:
            raise ValueError(f"max_len = {self.max_len}: exact numerics supports at most 65536 positions")
        self.row_multiple = 1
        if mode == numerics.EXACT:  # whole tiles for the linear layers, no scalar tails elsewhere
            self.row_multiple = math.lcm(tile_rows, numerics.row_multiple(
                [cfg.hidden_size, getattr(cfg, "intermediate_size", cfg.hidden_size), head_dim, heads * head_dim],
                self.dtype.itemsize))
        if threads is not None and threads < 1:
            raise ValueError(f"threads = {threads}, must be at least 1")
        # exact: one intra-op thread (see numerics: a thread split point must not depend on the batch);
        # fast: `threads` (the instance's share of its node), else torch's default (every core)
        self.threads = 1 if mode == numerics.EXACT else threads
        # Our kernel's threads, in either mode: the instance's share (`threads`), else every usable
        # core. Its split never changes a result bit (numerics.py), so exact numerics may use them.
        self.kernel_threads = kernels.default_threads(threads) if linear in kernels.OURS else None
        kthreads = self.kernel_threads or 1
        why_not = decoder.unsupported(model)
        self.forward_kind = "decoder" if forward == "auto" and why_not is None else "transformers"
        # RMSNorm and the rotary embedding: one call of the extension each beside our linear kernels
        # (the same roundings as torch's ops; docs/function.md, "The elementwise steps")
        self.elementwise = (decoder.OURS if self.forward_kind == "decoder" and linear in kernels.OURS
                            and head_dim % 32 == 0 else decoder.TORCH)
        if self.forward_kind == "decoder":
            self._lean = decoder.DecoderForward(model, numerics.linear_function(mode, tile_rows, linear, kthreads),
                                                self.elementwise)
        else:
            if not getattr(model, "_supports_attention_backend", False):
                raise ValueError(f"{type(model).__name__} does not route attention through the transformers "
                                 "attention interface; it cannot be served with continuous batching")
            model.config._attn_implementation = _ATTN_NAME
            if mode == numerics.EXACT or linear != kernels.TORCH:
                numerics.tile_linears(model, tile_rows, linear, kthreads)
        self.bind_thread()
        self.cache = KVCache(cfg.num_hidden_layers, slots, kv_heads, self.max_len, head_dim, self.dtype,
                             self.device)

    def bind_thread(self) -> None:
        """Apply the intra-op thread setting to the calling thread (OpenMP settings are per thread)."""
        if self.threads is not None:
            torch.set_num_threads(self.threads)

    @property
    def slots(self) -> int:
        return self.cache.slots

    def fingerprint(self) -> dict[str, Any]:
        """What must match between two instances for exact resumption (see docs/function.md).

        Not the kernel's thread count: the kernel computes the same bits on any number of threads
        (tests/functions/test_llm_kernels.py checks it on the real model)."""
        return {"mode": self.mode, "tile_rows": self.tile_rows, "linear": self.linear, "forward": self.forward_kind,
                "elementwise": self.elementwise,
                "device": self.device.type,
                "dtype": str(self.dtype).removeprefix("torch."), "torch": torch.__version__.split("+")[0]}

    @torch.inference_mode()
    def step(self, feeds: Sequence[Feed]) -> list[torch.Tensor | None]:
        """Run one packed step; per feed, float32 CPU logits [rows, vocab] from logits_from on."""
        if not feeds:
            return []
        tokens: list[int] = []
        slots: list[int] = []
        positions: list[int] = []
        keep: list[int] = []
        decode_rows: list[int] = []
        prefills: list[PrefillSegment] = []
        for f in feeds:
            n = len(f.tokens)
            if n == 0:
                raise ValueError(f"slot {f.slot}: a feed needs at least one token")
            if f.start + n > self.max_len:
                raise ValueError(f"slot {f.slot}: positions {f.start}..{f.start + n - 1} exceed max_len {self.max_len}")
            row = len(tokens)
            tokens.extend(f.tokens)
            slots.extend([f.slot] * n)
            positions.extend(range(f.start, f.start + n))
            if f.logits_from is not None:
                keep.extend(range(row + f.logits_from, row + n))
            if n == 1:
                decode_rows.append(row)
            else:
                length = numerics.round_up(f.start + n, numerics.KEY_BLOCK)
                pos = torch.arange(f.start, f.start + n, device=self.device)
                prefills.append(PrefillSegment(f.slot, row, n, length, numerics.key_mask(pos, length)))
        pad = numerics.round_up(len(tokens), self.row_multiple) - len(tokens)
        tokens += [0] * pad
        slots += [self.cache.scratch] * pad
        positions += [0] * pad
        dev = self.device
        slots_t = torch.tensor(slots, device=dev)
        pos_t = torch.tensor(positions, device=dev)
        decode = None
        if decode_rows:
            n = len(decode_rows)
            length = numerics.round_up(max(positions[r] for r in decode_rows) + 1, numerics.KEY_BLOCK)
            first = slots[decode_rows[0]]
            consecutive = all(slots[r] == first + i for i, r in enumerate(decode_rows))
            if decode_rows[-1] == n - 1:  # the first n rows of the step
                dec_slots = slice(first, first + n) if consecutive else slots_t[:n]
                decode = DecodeGroup(None, n, dec_slots, length, numerics.key_mask(pos_t[:n], length))
            else:
                rows_t = torch.tensor(decode_rows, device=dev)
                dec_slots = slice(first, first + n) if consecutive else slots_t[rows_t]
                decode = DecodeGroup(rows_t, n, dec_slots, length, numerics.key_mask(pos_t[rows_t], length))
        batch = StepBatch(mode=self.mode, cache=self.cache, slots=slots_t, positions=pos_t, decode=decode,
                          prefills=prefills, linear=self.linear, kernel_threads=self.kernel_threads or 1)
        kept = len(keep)
        keep = keep or [0]
        keep += keep[-1:] * (numerics.round_up(len(keep), self.row_multiple) - len(keep))
        tokens_t = torch.tensor(tokens, device=dev)
        keep_t = torch.tensor(keep, device=dev)
        if self.forward_kind == "decoder":
            out = self._lean(tokens_t, pos_t, batch, keep_t)
        else:
            out = self.model(input_ids=tokens_t.unsqueeze(0), position_ids=pos_t.unsqueeze(0), use_cache=False,
                             logits_to_keep=keep_t, sllm_batch=batch).logits[0]
        logits = out[:kept].float().cpu() if kept else None
        result: list[torch.Tensor | None] = []
        at = 0
        for f in feeds:
            if f.logits_from is None:
                result.append(None)
                continue
            n = len(f.tokens) - f.logits_from
            assert logits is not None
            result.append(logits[at: at + n])
            at += n
        return result
