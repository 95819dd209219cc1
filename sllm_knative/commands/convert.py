"""`sllm-knative convert SRC DST`: Hugging Face directory or GGUF file -> loading-optimized checkpoint."""

from __future__ import annotations

import argparse

GGUF_DTYPES = ("bfloat16", "float16", "float32")  # sllm_knative.convert.GGUF_DTYPES (not imported: --help stays fast)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert a Hugging Face model directory or a GGUF file into the "
                                       "loading-optimized format")
    p.add_argument("src", help="Hugging Face model directory (safetensors, sharded or not, or pytorch .bin), "
                               "or a GGUF file (llama architecture; its config and tokenizer are written too)")
    p.add_argument("dst", help="destination checkpoint directory")
    p.add_argument("--partitions", type=int, default=1, help="partition files (one per device / TP rank)")
    p.add_argument("--dtype", choices=GGUF_DTYPES, default=None,
                   help="what a GGUF file's tensors are dequantized to (default: bfloat16)")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.add_argument("--no-verify", action="store_true", help="skip re-reading the written blocks")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from sllm_knative.convert import convert

    out = convert(args.src, args.dst, partitions=args.partitions, overwrite=args.overwrite,
                  verify=not args.no_verify, progress=not args.no_progress, dtype=args.dtype)
    print(out)
    return 0
