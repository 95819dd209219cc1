"""`sllm-knative convert SRC DST`: Hugging Face directory -> loading-optimized checkpoint."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert a Hugging Face model directory into the loading-optimized format")
    p.add_argument("src", help="Hugging Face model directory (safetensors, sharded or not, or pytorch .bin)")
    p.add_argument("dst", help="destination checkpoint directory")
    p.add_argument("--partitions", type=int, default=1, help="partition files (one per device / TP rank)")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.add_argument("--no-verify", action="store_true", help="skip re-reading the written blocks")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from sllm_knative.convert import convert

    out = convert(args.src, args.dst, partitions=args.partitions, overwrite=args.overwrite,
                  verify=not args.no_verify, progress=not args.no_progress)
    print(out)
    return 0
