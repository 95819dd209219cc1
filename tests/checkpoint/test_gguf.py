"""GGUF as a source format: the real SmolLM2-135M-Instruct (Q4_1) converted once, against
transformers' own GGUF load; tiny synthetic GGUF files for the dtypes, the CLI and every way a
file can be wrong (truncated, unknown or unsupported quantization, an architecture the function
does not serve, corrupted bytes)."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sllm_knative import format as fmt
from sllm_knative.convert import ConversionError, convert
from sllm_knative.loading import load_model, load_state_dict
from tests.checkpoint.gguf_files import (
    CHAT_TEMPLATE,
    converted_smollm2,
    smollm2_path,
    tensor_type_offset,
    write_tiny_gguf,
)

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, in a small village,"]
TEXTS = [
    "Hello world!", "  leading spaces and\ttabs\n\nnew lines  ", "naïve café, Zürich, 東京, emoji 🤖👍",
    "def f(x):\n    return x ** 2  # code", "<|im_start|>user\nhi<|im_end|>\n", "1234567890 3.14159 -42",
]
CHAT = [{"role": "system", "content": "You answer in one short sentence."},
        {"role": "user", "content": "What is the capital of France?"}]


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


# -- the real model, converted once ------------------------------------------------------------


@pytest.fixture(scope="module")
def real_gguf() -> Path:
    return smollm2_path()


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[Path, int]:
    """The real file converted through the CLI in a child process: (checkpoint, peak RSS growth)."""
    return converted_smollm2(tmp_path_factory)


def test_the_result_is_a_checkpoint_with_config_and_tokenizer(converted: tuple[Path, int]) -> None:
    ckpt, _ = converted
    names = {p.name for p in ckpt.iterdir()}
    assert {fmt.INDEX_NAME, "partition-0.bin", "config.json", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= names
    index = fmt.read_index(ckpt)
    assert index.metadata["source_format"] == "gguf"
    assert index.metadata["source_quantization"] == "F32:61,Q4_1:210,Q8_0:1"
    assert {t.dtype for t in index.tensors} == {"bfloat16"}
    assert len(index.tensors) == 272  # 30 layers of 9, the embedding and the final norm; lm_head is tied
    config = json.loads((ckpt / "config.json").read_text())
    assert (config["model_type"], config["dtype"], config["tie_word_embeddings"]) == ("llama", "bfloat16", True)
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_key_value_heads"]) == (30, 576, 3)
    assert json.loads((ckpt / "generation_config.json").read_text())["eos_token_id"] == 2
    assert "<|im_start|>" in json.loads((ckpt / "tokenizer_config.json").read_text())["chat_template"]
    assert not _leftovers(ckpt.parent)


def test_conversion_streams_with_memory_bounded_by_a_tensor(converted: tuple[Path, int]) -> None:
    """Peak RSS grows by less than the largest tensor (the embedding in bfloat16, 57 MB) + 128 MiB,
    the bound the Hugging Face conversion keeps (test_convert.py): not by the model (269 MB in
    bfloat16, 538 MB dequantized to float32). Measured: 130-150 MiB, of which the verification's
    read window is 64 MiB, the tokenizer's metadata about 60 MiB, a dequantized chunk about 20 MiB."""
    ckpt, growth = converted
    largest = 49152 * 576 * 2
    total = fmt.read_index(ckpt).total_bytes
    assert total > largest + (128 << 20)  # a converter holding the model would exceed the bound
    assert growth < largest + (128 << 20), f"peak RSS grew by {growth >> 20} MiB"


def test_equals_transformers_own_gguf_load(converted: tuple[Path, int], real_gguf: Path) -> None:
    """Weights, logits, tokenizer and chat template against transformers' own load of the GGUF
    (dequantized, q/k un-permuted) in bfloat16; and a real answer. One test, so the reference
    (15-20 s to load) is loaded once even when xdist spreads the tests over workers."""
    pytest.importorskip("accelerate", reason="transformers' GGUF loading needs accelerate (a dev extra)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt, _ = converted
    ref_model = AutoModelForCausalLM.from_pretrained(str(real_gguf.parent), gguf_file=real_gguf.name,
                                                     dtype=torch.bfloat16).eval()
    ref_tok = AutoTokenizer.from_pretrained(str(real_gguf.parent), gguf_file=real_gguf.name)
    ours, tok = load_model(ckpt), AutoTokenizer.from_pretrained(str(ckpt))
    _check_weights_and_logits(ours, ref_model, ref_tok)
    _check_tokenizer(tok, ref_tok)
    ids: Any = tok.apply_chat_template(CHAT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = ours.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])


def _check_weights_and_logits(ours: Any, ref_model: Any, ref_tok: Any) -> None:
    assert next(ours.parameters()).dtype == torch.bfloat16
    # The weights are bit-identical: same dequantizer, same un-permutation of q/k, same cast.
    ref_sd = ref_model.state_dict()
    for name, t in ours.state_dict().items():
        assert torch.equal(t, ref_sd[name]), name
    for prompt in PROMPTS:
        ids = ref_tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            got, want = ours(ids).logits, ref_model(ids).logits
        torch.testing.assert_close(got, want)  # bfloat16 tolerances
        assert torch.equal(got.argmax(-1), want.argmax(-1)), prompt


def _check_tokenizer(tok: Any, ref: Any) -> None:
    """Round trips, the same ids and specials as transformers' tokenizer from the GGUF, and the
    chat template rendering a system + user conversation with the generation prompt."""
    assert json.loads(tok.backend_tokenizer.to_str()) == json.loads(ref.backend_tokenizer.to_str())
    for text in TEXTS:
        ids = tok(text).input_ids
        assert ids == ref(text).input_ids, text
        assert tok.decode(ids) == text
    assert (tok.bos_token, tok.eos_token, tok.eos_token_id, tok.pad_token) == \
           (ref.bos_token, ref.eos_token, ref.eos_token_id, ref.pad_token) == \
           ("<|im_start|>", "<|im_end|>", 2, "<|im_end|>")
    rendered = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert rendered == ref.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert rendered == ("<|im_start|>system\nYou answer in one short sentence.<|im_end|>\n"
                        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    assert tok(rendered).input_ids == ref(rendered).input_ids


def test_a_truncated_copy_is_refused(real_gguf: Path, tmp_path: Path) -> None:
    size = real_gguf.stat().st_size
    for cut, named in ((size - 4096, "tensor 'blk.9.attn_v.weight'"),  # the last tensor's data
                       (size // 2, "tensor 'blk.15.attn_output.weight'"),
                       (1 << 20, "field 'tokenizer.ggml.merges' claims 48900 elements"),
                       (600_000, "field 'tokenizer.ggml.tokens'[38914]")):
        bad = tmp_path / f"cut-{cut}.gguf"
        with open(real_gguf, "rb") as src, open(bad, "wb") as out:
            shutil.copyfileobj(src, out, cut)
            out.truncate(cut)
        dst = tmp_path / "out.sllm"
        with pytest.raises(ConversionError, match="truncated") as err:
            convert(bad, dst)
        assert str(bad) in str(err.value) and named in str(err.value), err.value
        assert not dst.exists() and not _leftovers(tmp_path)
        bad.unlink()


# -- tiny synthetic files ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.mark.parametrize("dtype", [None, "float16", "float32"])
def test_each_dtype_equals_transformers_load(tiny: Path, tmp_path: Path, dtype: str | None) -> None:
    pytest.importorskip("accelerate", reason="transformers' GGUF loading needs accelerate (a dev extra)")
    from transformers import AutoModelForCausalLM

    want = getattr(torch, dtype or "bfloat16")
    ref = AutoModelForCausalLM.from_pretrained(str(tiny.parent), gguf_file=tiny.name, dtype=want).state_dict()
    sd = load_state_dict(convert(tiny, tmp_path / "out", dtype=dtype))
    assert sd.keys() == ref.keys() - {"lm_head.weight"}  # tied: the loader ties it to the embedding
    for name, t in sd.items():
        assert t.dtype == want and torch.equal(t, ref[name]), name


def test_cli_takes_dtype_and_a_directory_holding_one_gguf(tiny: Path, tmp_path: Path) -> None:
    """The loader converts what it downloads as a directory: one GGUF and nothing else is a source."""
    src = tmp_path / "store-copy"
    src.mkdir()
    shutil.copy(tiny, src / "model.gguf")
    exe = Path(sys.executable).parent / "sllm-knative"
    r = subprocess.run([str(exe), "convert", str(src), str(tmp_path / "c"), "--dtype", "float16"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "convert:" in r.stderr  # progress
    assert {t.dtype for t in fmt.read_index(tmp_path / "c").tensors} == {"float16"}
    shutil.copy(tiny, src / "other.gguf")
    r = subprocess.run([str(exe), "convert", str(src), str(tmp_path / "d"), "--no-progress"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "holds 2 GGUF files" in r.stderr
    assert not (tmp_path / "d").exists()


def test_dtype_is_for_gguf_sources_only(tiny_src: Path, tiny: Path, tmp_path: Path) -> None:
    from sllm_knative import convert as library
    from sllm_knative.commands import convert as command

    assert command.GGUF_DTYPES == library.GGUF_DTYPES  # the CLI's copy keeps `--help` free of imports
    with pytest.raises(ValueError, match="only GGUF sources"):
        convert(tiny_src, tmp_path / "a", dtype="bfloat16")
    with pytest.raises(ValueError, match="must be one of"):
        convert(tiny, tmp_path / "b", dtype="int8")
    assert not list(tmp_path.iterdir())


def _patched(tiny: Path, tmp: Path, edit: Callable[[bytearray], None]) -> Path:
    raw = bytearray(tiny.read_bytes())
    edit(raw)
    out = tmp / "bad.gguf"
    out.write_bytes(bytes(raw))
    return out


def _set_type(name: str, ggml_type: int) -> Callable[[bytearray], None]:
    def edit(raw: bytearray) -> None:
        struct.pack_into("<I", raw, tensor_type_offset(bytes(raw), name), ggml_type)
    return edit


def _set_u64(at: int, value: int) -> Callable[[bytearray], None]:
    def edit(raw: bytearray) -> None:
        struct.pack_into("<Q", raw, at, value)
    return edit


def _set_u32(at: int, value: int) -> Callable[[bytearray], None]:
    def edit(raw: bytearray) -> None:
        struct.pack_into("<I", raw, at, value)
    return edit


def _array_length(key: str, value: int) -> Callable[[bytearray], None]:
    def edit(raw: bytearray) -> None:
        k = struct.pack("<Q", len(key)) + key.encode()
        struct.pack_into("<Q", raw, raw.index(k) + len(k) + 8, value)  # after the value type and element type
    return edit


@pytest.mark.parametrize(("edit", "message"), [
    pytest.param(_set_type("blk.0.attn_q.weight", 200), "tensor 'blk.0.attn_q.weight': unknown quantization type 200",
                 id="unknown-quantization"),
    pytest.param(_set_type("blk.0.ffn_up.weight", 9), "tensor 'blk.0.ffn_up.weight': quantization type Q8_1 \\(9\\) "
                 "is not supported", id="unsupported-quantization"),
    pytest.param(_set_type("blk.0.ffn_up.weight", 26), "quantization type I32 \\(26\\) is not supported",
                 id="integer-tensor"),
    pytest.param(_set_u32(0, 0x46554747 ^ 1), "not a GGUF file", id="magic"),
    pytest.param(_set_u32(4, 1), "GGUF version 1 is not supported", id="version"),
    pytest.param(_set_u32(4, 3 << 24), "big-endian", id="big-endian"),
    pytest.param(_set_u64(8, 1 << 40), "claims 1099511627776 tensors", id="tensor-count"),
    pytest.param(_set_u64(16, 1 << 60), "claims 1152921504606846976 metadata fields", id="field-count"),
    pytest.param(_set_u64(24, 1 << 50), "truncated: metadata field #0 \\(key\\) needs", id="string-length"),
    pytest.param(_array_length("tokenizer.ggml.tokens", 1 << 58), "field 'tokenizer.ggml.tokens' claims",
                 id="array-length"),
])
def test_bad_files_are_refused_naming_file_and_field_or_tensor(tiny: Path, tmp_path: Path, edit, message: str) -> None:
    bad = _patched(tiny, tmp_path, edit)
    with pytest.raises(ConversionError, match=message) as err:
        convert(bad, tmp_path / "out")
    assert str(err.value).startswith(f"{bad}: ")
    assert not (tmp_path / "out").exists() and not _leftovers(tmp_path)


@pytest.mark.parametrize(("kwargs", "message"), [
    pytest.param({"arch": "qwen2"}, "field 'general.architecture' = 'qwen2': the function serves llama models only",
                 id="architecture"),
    pytest.param({"arch": "gpt2"}, "field 'general.architecture' = 'gpt2'", id="gpt2"),
    pytest.param({"extra_fields": {"llama.expert_count": 8}}, "field 'llama.expert_count' = 8: mixture-of-experts",
                 id="moe"),
    pytest.param({"extra_fields": {"llama.rope.scaling.type": "yarn"}}, "rope.scaling.type' = 'yarn'", id="rope"),
    pytest.param({"extra_tensors": ("rope_freqs.weight",)}, "tensor 'rope_freqs.weight' is not part of a llama model",
                 id="extra-tensor"),
    pytest.param({"qtype": "Q4_0", "ffn": 96}, None, id="q4_0-accepted"),
])
def test_what_the_function_does_not_serve_is_refused(tmp_path: Path, kwargs: dict, message: str | None) -> None:
    src = write_tiny_gguf(tmp_path / "x.gguf", **kwargs)
    if message is None:
        convert(src, tmp_path / "out")
        return
    with pytest.raises(ConversionError, match=message):
        convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not _leftovers(tmp_path)


def test_a_wrong_shape_and_a_missing_tensor_are_named(tmp_path: Path) -> None:
    src = write_tiny_gguf(tmp_path / "x.gguf", extra_fields={"llama.feed_forward_length": 128})
    with pytest.raises(ConversionError, match="tensor 'blk.0.ffn_gate.weight' has shape \\[64, 64\\], the "
                                              "configuration implies \\[128, 64\\]"):
        convert(src, tmp_path / "out")
    src = write_tiny_gguf(tmp_path / "y.gguf", extra_fields={"llama.block_count": 2}, layers=1, ffn=64)
    with pytest.raises(ConversionError, match="llama.block_count' = 2, but the file holds only 11 tensors"):
        convert(src, tmp_path / "out")


def test_values_that_dequantize_to_nan_or_overflow_the_dtype_are_named(tiny: Path, tmp_path: Path) -> None:
    """A Q8_0 block is a float16 scale and 32 int8 quants: a corrupt scale gives infinities, a large
    one values float16 cannot hold (bfloat16 can)."""
    from sllm_knative.gguf_header import open_gguf

    embd = next(t for t in open_gguf(tiny).tensors if t.name == "token_embd.weight")
    block = embd.offset + 34 * 2 * 3  # row 3: two blocks of 34 bytes per row of 64

    def scale(value: int) -> Callable[[bytearray], None]:
        def edit(raw: bytearray) -> None:
            struct.pack_into("<H", raw, block, value)
            raw[block + 2: block + 34] = bytes([127]) * 32
        return edit

    with pytest.raises(ConversionError, match="tensor 'token_embd.weight': row 3 dequantizes to values NaN or "
                                              "infinite"):
        convert(_patched(tiny, tmp_path, scale(0x7C00)), tmp_path / "out")  # +inf
    big = _patched(tiny, tmp_path, scale(0x7A00))  # 49152 * 127 > 65504
    with pytest.raises(ConversionError, match="row 3 dequantizes to values too large for float16"):
        convert(big, tmp_path / "out", dtype="float16")
    assert not (tmp_path / "out").exists() and not _leftovers(tmp_path)
    convert(big, tmp_path / "out")  # bfloat16 holds them


def test_a_broken_chat_template_is_named(tiny: Path, tmp_path: Path) -> None:
    def edit(raw: bytearray) -> None:
        at = raw.index(CHAT_TEMPLATE.encode()) + CHAT_TEMPLATE.index("endfor")
        raw[at: at + 6] = b"endfxx"  # an unknown tag: the for loop never closes

    with pytest.raises(ConversionError, match="field 'tokenizer.chat_template' is not a valid Jinja template"):
        convert(_patched(tiny, tmp_path, edit), tmp_path / "out")
    assert not (tmp_path / "out").exists() and not _leftovers(tmp_path)


# -- fuzzing: corrupted bytes give our error, never another exception or a hang ---------------


@st.composite
def corrupted(draw, raw: bytes, header: int) -> bytes:
    """Truncated, flipped, overwritten bytes; `header`: where the tensor data starts (most
    flips land before it, where the parsing is)."""
    data = bytearray(raw)
    for _ in range(draw(st.integers(1, 4))):
        mode = draw(st.sampled_from(["truncate", "flip", "header-flip", "u64", "span"]))
        if mode == "truncate":
            data = data[: draw(st.integers(0, len(data)))]
        elif not data:
            break
        elif mode in ("flip", "header-flip"):
            i = draw(st.integers(0, min(len(data), header if mode == "header-flip" else len(data)) - 1))
            data[i] ^= draw(st.integers(1, 255))
        elif mode == "u64" and len(data) >= 8:
            i = draw(st.integers(0, min(len(data), header) - 8))
            struct.pack_into("<Q", data, i, draw(st.sampled_from([0, 1, 2**31, 2**32 - 1, 2**63, 2**64 - 1])))
        else:
            i = draw(st.integers(0, len(data) - 1))
            data[i: i + 16] = draw(st.binary(min_size=1, max_size=16))
    return bytes(data)


@pytest.fixture(scope="module")
def fuzz_source(tmp_path_factory) -> tuple[Path, bytes, int]:
    """(a directory to work in, the tiny file's bytes, where its tensor data starts)."""
    from sllm_knative.gguf_header import open_gguf

    work = tmp_path_factory.mktemp("gguf-fuzz")
    src = write_tiny_gguf(work / "fuzz-src.gguf")
    raw = src.read_bytes()
    header = open_gguf(src).data_start
    src.unlink()
    return work, raw, header


@settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(data=st.data())
def test_corrupted_files_give_a_conversion_error_or_a_checkpoint(fuzz_source: tuple[Path, bytes, int],
                                                                 data) -> None:
    fuzz_dir, original, header = fuzz_source
    raw = data.draw(corrupted(original, header))
    src = fuzz_dir / "x.gguf"
    src.write_bytes(raw)
    dst = fuzz_dir / "out"
    shutil.rmtree(dst, ignore_errors=True)
    try:
        convert(src, dst, verify=False)
    except ConversionError as exc:
        assert str(exc).startswith(f"{src}: ")
        assert not dst.exists()
    else:
        assert fmt.is_checkpoint(dst)
    assert not _leftovers(fuzz_dir)
