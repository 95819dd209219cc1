"""GGUF as a source format of `sllm_knative.convert` (llama.cpp's single-file checkpoints).

`open_gguf(path)` (sllm_knative/gguf_header.py) parses and checks a GGUF file's header, metadata
and tensor table; the converter then writes, beside the loading-optimized partitions, a Hugging Face config.json,
generation_config.json and tokenizer (tokenizer.json, tokenizer_config.json with the chat
template), and streams the tensors: each one is read with pread a few rows at a time,
dequantized with the `gguf` package's own dequantizers (the ones transformers' GGUF loader
calls), un-permuted where llama.cpp permuted it, cast to the target dtype (bfloat16 unless told
otherwise) and written, so memory stays bounded by a chunk of one tensor, not by the model.

Only the architecture the function serves is accepted: `llama` (Llama, Mistral and SmolLM
files; llama.cpp writes all three as `llama`). llama.cpp's converter permutes the rows of
attn_q and attn_k per head (its rotary embedding pairs neighbouring dimensions, transformers'
pairs the two halves of a head); they are permuted back here exactly as transformers'
GGUF loader does (LlamaTensorProcessor._reverse_permute_weights), so the converted weights are
bit-identical to transformers' own GGUF load in the same dtype.

Every way a file can be wrong raises `ConversionError` naming the file and the field or tensor:
truncated anywhere, a bad magic or version, an unknown or unsupported quantization type, a
tensor whose bytes lie outside the file, a shape the configuration does not imply, an
architecture or tensor the function does not serve, a tokenizer that cannot be built. The
header parser bounds every length and count by the bytes left in the file before it allocates
or loops, so corrupted bytes cannot make it allocate without bound or spin.

Which loader, by measurement (SmolLM2-135M-Instruct.Q4_1.gguf, 98 MB, 272 tensors, into
bfloat16, on the 2-core development machine while another test suite ran; wall clock, and peak
RSS growth over a process that has imported torch and transformers):

    transformers: from_pretrained(dir, gguf_file=..., dtype=bfloat16)   14.0-14.4 s   +652 MiB
                  + AutoTokenizer.from_pretrained(dir, gguf_file=...)    3.0 s
                  (a load into memory only: nothing written yet)
    this module:  the whole conversion (parse, config and tokenizer,      2.0-2.3 s   +130 MiB
                  dequantize, write, fsync, re-read and verify)                      (+68 MiB
                                                                                      unverified)

transformers' path (for llama, its legacy GGUF loader: GGUFReader, which alone takes 2.7 s to
open this file, then every tensor dequantized and held before the model is built) needs the
whole model in memory and raises whatever numpy raises on a corrupt file. So the `gguf`
package is used directly, for its dequantizers only (the same functions transformers calls,
hence bit-identical weights), behind our own bounded parser; transformers only for what it is
the reference for, the tokenizer converter (`convert_gguf_tokenizer`), fed the metadata we
parsed. Of the 130 MiB, the verification's read window is 64 MiB (as for any conversion), the
tokenizer's metadata about 50 MiB and a dequantized chunk (CHUNK_BYTES of output) about 20 MiB.
"""


from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sllm_knative.convert import ConversionError
from sllm_knative.gguf_header import FLOATS, INTEGERS, STRING, GGUFFile, TensorInfo, open_gguf, quant_name
from sllm_knative.log import get_logger

_log = get_logger("sllm_knative.gguf_source")

MAX_HYPERPARAMETER = (1 << 31) - 1
CHUNK_BYTES = 2 << 20  # output bytes per dequantized chunk: 16 MiB cost 100 MB more peak RSS, no faster
ARCHITECTURES = ("llama",)

# GGUF tensor name -> Hugging Face name, per layer ({i}) and global.
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


# -- what the function serves ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LlamaShape:
    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    context: int
    rope_theta: float
    rms_eps: float
    tied: bool


def _int_field(g: GGUFFile, key: str, default: int | None = None) -> int:
    if key not in g.fields:
        if default is None:
            raise ConversionError(f"{g.path}: field {key!r} is missing")
        return default
    value = g.fields[key]
    if g.types[key] not in INTEGERS or not 1 <= value <= MAX_HYPERPARAMETER:
        raise ConversionError(f"{g.path}: field {key!r} = {value!r}, expected an integer from 1 to "
                              f"{MAX_HYPERPARAMETER}")
    return int(value)


def _float_field(g: GGUFFile, key: str, default: float | None = None) -> float:
    if key not in g.fields:
        if default is None:
            raise ConversionError(f"{g.path}: field {key!r} is missing")
        return default
    value = g.fields[key]
    if g.types[key] not in FLOATS + INTEGERS or not math.isfinite(value) or value <= 0:
        raise ConversionError(f"{g.path}: field {key!r} = {value!r}, expected a positive finite number")
    return float(value)


def architecture(g: GGUFFile) -> str:
    arch = g.fields.get("general.architecture")
    if g.types.get("general.architecture") != STRING:
        raise ConversionError(f"{g.path}: field 'general.architecture' is missing or not a string")
    if arch not in ARCHITECTURES:
        raise ConversionError(f"{g.path}: field 'general.architecture' = {arch!r}: the function serves "
                              f"{', '.join(ARCHITECTURES)} models only")
    return str(arch)


def llama_shape(g: GGUFFile) -> LlamaShape:
    arch = architecture(g)
    a = arch + "."
    for key in (a + "expert_count", a + "expert_used_count"):
        if key in g.fields and g.fields[key] not in (0, None):
            raise ConversionError(f"{g.path}: field {key!r} = {g.fields[key]!r}: mixture-of-experts models "
                                  f"are not served")
    scaling = g.fields.get(a + "rope.scaling.type", "none")
    if scaling != "none":
        raise ConversionError(f"{g.path}: field {a + 'rope.scaling.type'!r} = {scaling!r}: only the default "
                              f"rotary embedding is served")
    tokens = g.fields.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise ConversionError(f"{g.path}: field 'tokenizer.ggml.tokens' is missing or empty")
    vocab = _int_field(g, a + "vocab_size", len(tokens))
    if len(tokens) > vocab:
        raise ConversionError(f"{g.path}: field 'tokenizer.ggml.tokens' has {len(tokens)} tokens, more than the "
                              f"model's {a + 'vocab_size'!r} = {vocab}")
    layers = _int_field(g, a + "block_count")
    per_layer = len(_LAYER_TENSORS)
    if layers * per_layer > len(g.tensors):
        raise ConversionError(f"{g.path}: field {a + 'block_count'!r} = {layers}, but the file holds only "
                              f"{len(g.tensors)} tensors")
    hidden = _int_field(g, a + "embedding_length")
    heads = _int_field(g, a + "attention.head_count")
    kv_heads = _int_field(g, a + "attention.head_count_kv", heads)
    if heads % kv_heads:
        raise ConversionError(f"{g.path}: field {a + 'attention.head_count_kv'!r} = {kv_heads} does not divide "
                              f"the {heads} attention heads")
    head_dim = _int_field(g, a + "rope.dimension_count", hidden // heads or 1)
    if head_dim % 2:
        raise ConversionError(f"{g.path}: field {a + 'rope.dimension_count'!r} = {head_dim} is odd")
    names = {t.name for t in g.tensors}
    return LlamaShape(
        layers=layers, hidden=hidden, ffn=_int_field(g, a + "feed_forward_length"), heads=heads,
        kv_heads=kv_heads, head_dim=head_dim, vocab=vocab,
        context=_int_field(g, a + "context_length"), rope_theta=_float_field(g, a + "rope.freq_base", 10000.0),
        rms_eps=_float_field(g, a + "attention.layer_norm_rms_epsilon"), tied="output.weight" not in names)


@dataclasses.dataclass(frozen=True)
class PlannedTensor:
    info: TensorInfo
    hf_name: str
    permute_heads: int  # 0: rows as stored; else llama.cpp's per-head permutation over this many heads


def plan_tensors(g: GGUFFile, s: LlamaShape) -> list[PlannedTensor]:
    """Every tensor the model needs, under its Hugging Face name, with the shape checked."""
    expected: dict[str, tuple[str, tuple[int, ...], int]] = {
        "token_embd.weight": (_GLOBAL_TENSORS["token_embd.weight"], (s.vocab, s.hidden), 0),
        "output_norm.weight": (_GLOBAL_TENSORS["output_norm.weight"], (s.hidden,), 0),
    }
    if not s.tied:
        expected["output.weight"] = (_GLOBAL_TENSORS["output.weight"], (s.vocab, s.hidden), 0)
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    shapes = {
        "attn_norm.weight": ((s.hidden,), 0), "attn_q.weight": ((q, s.hidden), s.heads),
        "attn_k.weight": ((kv, s.hidden), s.kv_heads), "attn_v.weight": ((kv, s.hidden), 0),
        "attn_output.weight": ((s.hidden, q), 0), "ffn_norm.weight": ((s.hidden,), 0),
        "ffn_gate.weight": ((s.ffn, s.hidden), 0), "ffn_up.weight": ((s.ffn, s.hidden), 0),
        "ffn_down.weight": ((s.hidden, s.ffn), 0),
    }
    for i in range(s.layers):
        for suffix, (shape, permute) in shapes.items():
            expected[f"blk.{i}.{suffix}"] = (f"model.layers.{i}.{_LAYER_TENSORS[suffix]}", shape, permute)
    by_name = {t.name: t for t in g.tensors}
    out = []
    for name, (hf_name, shape, permute) in expected.items():
        t = by_name.get(name)
        if t is None:
            raise ConversionError(f"{g.path}: tensor {name!r} is missing")
        if t.shape != shape:
            raise ConversionError(f"{g.path}: tensor {name!r} has shape {list(t.shape)}, the configuration "
                                  f"implies {list(shape)}")
        out.append(PlannedTensor(t, hf_name, permute))
    extra = sorted(set(by_name) - set(expected))
    if extra:
        raise ConversionError(f"{g.path}: tensor {extra[0]!r} is not part of a {architecture(g)} model the function "
                              f"serves ({len(extra)} such tensors)")
    return out


# -- tensor data -------------------------------------------------------------------------------


def tensor_chunks(g: GGUFFile, t: PlannedTensor, dtype: str, chunk_bytes: int = CHUNK_BYTES) -> Iterator[Any]:
    """The tensor's bytes in the target dtype, a few rows at a time (whole heads when permuted)."""
    import numpy as np
    import torch
    from gguf.constants import GGMLQuantizationType
    from gguf.quants import dequantize

    info = t.info
    qtype = GGMLQuantizationType(info.ggml_type)
    torch_dtype = getattr(torch, dtype)
    limit = float(torch.finfo(torch_dtype).max)
    cols = info.shape[-1]
    out_row = cols * torch_dtype.itemsize
    unit = info.rows // t.permute_heads if t.permute_heads else 1
    step = max(unit, chunk_bytes // out_row // unit * unit)
    with open(g.path, "rb", buffering=0) as f:
        for r0 in range(0, info.rows, step):
            n = min(step, info.rows - r0)
            start = info.offset + r0 * info.row_bytes
            raw = bytearray(n * info.row_bytes)  # writable, so torch can take the float32 values as they are
            got = os.preadv(f.fileno(), [raw], start)
            if got != len(raw):
                raise ConversionError(f"{g.path}: tensor {info.name!r}: truncated at offset {start + got} "
                                      f"(the file changed while it was converted)")
            with np.errstate(all="ignore"):  # a corrupt scale overflows; reported below, by tensor and row
                values = dequantize(np.frombuffer(raw, dtype=np.uint8).reshape(n, info.row_bytes), qtype)
            values = values.reshape(n, cols)
            if t.permute_heads:
                # llama.cpp's rows per head: (dim/2 pairs, 2) -> transformers': (2 halves, dim/2)
                values = values.reshape(n // unit, unit // 2, 2, cols).swapaxes(1, 2).reshape(n, cols)
            values = np.ascontiguousarray(values, dtype=np.float32)
            # min and max carry a NaN through; one comparison then catches NaN, infinity and
            # values the target dtype cannot hold (numpy: torch.isfinite is 100x slower here)
            if not (-limit <= values.min() and values.max() <= limit):
                bad = ~(np.abs(values) <= limit)
                row = r0 + int(np.nonzero(bad.any(axis=1))[0][0])
                what = "NaN or infinite" if not np.isfinite(values).all() else f"too large for {dtype}"
                raise ConversionError(f"{g.path}: tensor {info.name!r}: row {row} dequantizes to values {what}")
            out = torch.from_numpy(values).to(torch_dtype)
            yield out.view(torch.uint8).numpy().reshape(-1)


# -- config and tokenizer ----------------------------------------------------------------------


def write_config(g: GGUFFile, s: LlamaShape, dtype: str, out: Path) -> None:
    """config.json and generation_config.json as transformers builds them from the GGUF."""
    from transformers import GenerationConfig, LlamaConfig

    ids = {name: _token_id(g, key) for name, key in (("bos_token_id", "bos_token_id"),
                                                        ("eos_token_id", "eos_token_id"),
                                                        ("pad_token_id", "padding_token_id"))}
    kwargs: dict[str, Any] = dict(
        vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.ffn, num_hidden_layers=s.layers,
        num_attention_heads=s.heads, num_key_value_heads=s.kv_heads, head_dim=s.head_dim,
        max_position_embeddings=s.context, rms_norm_eps=s.rms_eps, rope_theta=s.rope_theta,
        tie_word_embeddings=s.tied, architectures=["LlamaForCausalLM"], **ids)
    config = LlamaConfig(**kwargs)
    config.dtype = dtype
    config.save_pretrained(str(out))
    gen = {k: v for k, v in ids.items() if v is not None}
    if gen:
        GenerationConfig(**gen).save_pretrained(str(out))


def _token_id(g: GGUFFile, key: str) -> int | None:
    full = f"tokenizer.ggml.{key}"
    if full not in g.fields:
        return None
    value = g.fields[full]
    n = len(g.fields.get("tokenizer.ggml.tokens") or ())
    if g.types[full] not in INTEGERS or not 0 <= value < n:
        raise ConversionError(f"{g.path}: field {full!r} = {value!r} is not a token id (the vocabulary has {n})")
    return int(value)


def _tokenizer_inputs(g: GGUFFile) -> tuple[dict[str, Any], dict[str, Any]]:
    """transformers' `get_gguf_tokenizer` on our parsed metadata: (tokenizer_dict, tokenizer_config)."""
    try:
        from transformers.integrations.gguf import GGUF_TOKENIZER_MAPPING
    except ImportError:  # transformers 4
        from transformers.integrations.ggml import GGUF_TOKENIZER_MAPPING  # type: ignore[attr-defined,no-redef]

    kinds = {"tokens": (list, str), "merges": (list, str), "token_type": (list, int), "scores": (list, float),
             "tokenizer_type": (str, None), "pre_tokenizer_type": (str, None), "chat_template": (str, None),
             "add_bos_token": (bool, None), "add_eos_token": (bool, None), "add_prefix_space": (bool, None)}
    grouped: dict[str, dict[str, Any]] = {}
    for group, renames in GGUF_TOKENIZER_MAPPING.items():
        grouped[group] = {}
        for key, name in renames.items():
            full = f"tokenizer.{key}"
            if full not in g.fields:
                continue
            value = g.fields[full]
            kind, element = kinds.get(name, (None, None))
            if kind is not None and not _is_a(value, kind, element):
                raise ConversionError(f"{g.path}: field {full!r} has the wrong type "
                                      f"({type(value).__name__}, expected {kind.__name__}"
                                      f"{f' of {element.__name__}' if element else ''})")
            grouped[group][name] = value
    tokenizer, config = grouped["tokenizer"], grouped["tokenizer_config"]
    tokens = tokenizer.get("tokens")
    if not tokens:
        raise ConversionError(f"{g.path}: field 'tokenizer.ggml.tokens' is missing or empty")
    for name in ("token_type", "scores"):
        if name in tokenizer and len(tokenizer[name]) != len(tokens):
            raise ConversionError(f"{g.path}: field 'tokenizer.ggml.{name}' has {len(tokenizer[name])} entries "
                                  f"for {len(tokens)} tokens")
    for i, merge in enumerate(tokenizer.get("merges", ())):
        if len(merge.split(" ")) != 2:
            raise ConversionError(f"{g.path}: field 'tokenizer.ggml.merges'[{i}] = {merge[:40]!r} is not two "
                                  f"tokens separated by one space")
    if tokenizer.get("tokenizer_type") == "llama":
        config.setdefault("add_bos_token", True)
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        token_id = _token_id(g, key)
        config[name] = tokens[token_id] if token_id is not None else None
    template = config.get("chat_template")
    if template is not None:
        import jinja2

        try:
            jinja2.Environment().parse(template)
        except jinja2.TemplateError as exc:
            raise ConversionError(f"{g.path}: field 'tokenizer.chat_template' is not a valid Jinja template "
                                  f"({exc})") from None
    return tokenizer, config


def _is_a(value: Any, kind: type, element: type | None) -> bool:
    if element is None:
        return isinstance(value, kind)
    if not isinstance(value, list):
        return False
    if element is float:  # scores: float32 arrays; integers are numbers too
        return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    return all(isinstance(v, element) and not isinstance(v, bool) for v in value)


def write_tokenizer(g: GGUFFile, out: Path) -> None:
    """tokenizer.json and tokenizer_config.json (with the chat template), as transformers builds
    them from the GGUF (AutoTokenizer.from_pretrained(..., gguf_file=...))."""
    try:
        from transformers.integrations.gguf import convert_gguf_tokenizer
    except ImportError:  # transformers 4
        from transformers.integrations.ggml import convert_gguf_tokenizer  # type: ignore[attr-defined,no-redef]
    from transformers import PreTrainedTokenizerFast

    tokenizer_dict, tokenizer_config = _tokenizer_inputs(g)
    arch = architecture(g)
    try:
        backend, extra = convert_gguf_tokenizer(arch, tokenizer_dict)
        tok = PreTrainedTokenizerFast(tokenizer_object=backend, **tokenizer_config, **extra)
    except Exception as exc:  # the converter's and the tokenizers library's errors, on untrusted metadata
        raise ConversionError(f"{g.path}: fields 'tokenizer.ggml.*': cannot build the tokenizer "
                              f"({type(exc).__name__}: {exc})") from None
    tok.save_pretrained(str(out), save_jinja_files=False)


def output_bytes(path: str | os.PathLike[str], dtype: str = "bfloat16") -> int:
    """At least what converting the file writes: its tensors dequantized to `dtype`, with room for
    the alignment padding, the index, the config and the tokenizer (what a tier reserves)."""
    g = open_gguf(path)
    itemsize = 4 if dtype == "float32" else 2
    return sum(math.prod(t.shape) * itemsize + 4096 for t in g.tensors) + 4 * g.data_start + (1 << 20)


def describe(g: GGUFFile) -> dict[str, str]:
    """Index metadata: where the checkpoint came from."""
    counts: dict[str, int] = {}
    for t in g.tensors:
        counts[quant_name(t.ggml_type)] = counts.get(quant_name(t.ggml_type), 0) + 1
    return {"source_format": "gguf", "source_file": g.path.name,
            "source_quantization": ",".join(f"{k}:{v}" for k, v in sorted(counts.items()))}
