"""Per-request sampling: the sampling step and the random generator's state.

Each request owns a CPU `torch.Generator`, seeded from `seed` (or from the OS when no seed is
given). Sampling always runs on the CPU in float64 on the float32 logits of one row, so its
result depends only on those logits and the generator state, never on the device or the
batch. One sampled token consumes exactly one uniform draw; greedy decoding
(temperature 0) consumes none. The generator state travels with an exported generation
(`encode_generator` / `decode_generator`), so a resumed generation draws the same numbers.

The step, in order: temperature scaling, top-k, top-p (nucleus: the smallest set of most
likely tokens whose probability reaches top_p), renormalisation, inverse-CDF draw. Logprobs
are those of the model's own distribution (log-softmax of the raw logits).
"""

from __future__ import annotations

import base64
import secrets

import torch

from functions.llm.params import SamplingParams, TokenLogprob


def new_generator(seed: int | None) -> torch.Generator:
    gen = torch.Generator(device="cpu")
    gen.manual_seed(secrets.randbits(63) if seed is None else seed)
    return gen


def encode_generator(gen: torch.Generator) -> str:
    return base64.b64encode(gen.get_state().numpy().tobytes()).decode("ascii")


def decode_generator(encoded: str) -> torch.Generator:
    """A CPU generator in the given state; ValueError if the bytes are not a generator state."""
    try:
        raw = base64.b64decode(encoded, validate=True)
    except (ValueError, TypeError):
        raise ValueError("generator state is not valid base64") from None
    gen = torch.Generator(device="cpu")
    expected = gen.get_state().numel()
    if len(raw) != expected:
        raise ValueError(f"generator state is {len(raw)} bytes, a CPU generator state is {expected}")
    try:
        gen.set_state(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
    except RuntimeError as exc:
        raise ValueError(f"generator state rejected: {exc}") from None
    return gen


def token_logprob(logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """Logprob of `token` under the raw distribution of one logits row, with `top` alternatives."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    alts: tuple[tuple[int, float], ...] = ()
    if top > 0:
        values, ids = torch.topk(logp, min(top, logp.numel()))
        alts = tuple((int(i), float(v)) for i, v in zip(ids.tolist(), values.tolist(), strict=True))
    return TokenLogprob(token, float(logp[token]), alts)


def choose(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator) -> int:
    """The next token for one row of float32 logits [vocab]."""
    if params.temperature == 0.0:
        return int(torch.argmax(logits))
    scores = logits.double() / params.temperature
    if 0 < params.top_k < scores.numel():
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    order = torch.argsort(probs, descending=True, stable=True)
    sorted_probs = probs[order]
    if params.top_p < 1.0:
        cum = torch.cumsum(sorted_probs, dim=0)
        keep = int(torch.searchsorted(cum, torch.tensor(params.top_p, dtype=cum.dtype))) + 1
        sorted_probs = sorted_probs[:keep]
        order = order[:keep]
    cdf = torch.cumsum(sorted_probs, dim=0)
    u = torch.rand((), generator=gen, dtype=torch.float64) * cdf[-1]
    index = min(int(torch.searchsorted(cdf, u, right=True)), cdf.numel() - 1)
    return int(order[index])
