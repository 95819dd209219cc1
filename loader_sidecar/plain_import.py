"""What a plain checkpoint in a store is made of, and its conversion on the node.

A store may hold a Hugging Face checkpoint (`model.safetensors`, `pytorch_model.bin`, or a
sharded index naming its weight files) or a GGUF file (`model.gguf`, which brings its own config
and tokenizer) instead of the loading-optimized format. `loader_sidecar.fetch` downloads it once
to SSD staging; these functions say which files to fetch (validated: a weight index is untrusted
input), how big the GGUF's converted copy will be, and convert it (`sllm_knative.convert`),
each failure a CorruptData naming the checkpoint.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from loader_sidecar.aio import in_thread
from loader_sidecar.refs import ModelRef
from sllm_knative.loader.errors import CorruptData
from sllm_knative.log import get_logger

HF_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
HF_SINGLE_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
GGUF_FILE = "model.gguf"  # a llama.cpp checkpoint: converted on the node, config and tokenizer from inside it
_PLAIN_FILE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$")
_log = get_logger("loader_sidecar.fetch")


def weight_files(raw: bytes, where: str) -> list[str]:
    """The weight files a sharded checkpoint's index (`where`: its location, for errors) names:
    a non-empty `weight_map` of plain file names (nothing outside the checkpoint's folder)."""
    try:
        weight_map = json.loads(raw).get("weight_map")
    except (ValueError, AttributeError) as exc:
        raise CorruptData(f"{where}: not a JSON object with a weight_map") from exc
    if not isinstance(weight_map, dict) or not weight_map:
        raise CorruptData(f"{where}: 'weight_map' must be a non-empty object")
    names = sorted(set(weight_map.values()))
    bad = [n for n in names if not isinstance(n, str) or not _PLAIN_FILE.match(n)]
    if bad:
        raise CorruptData(f"{where}: weight file {bad[0]!r} is not a plain file name")
    return names


async def gguf_output_bytes(ref: ModelRef, path: Path) -> int:
    """The size of the GGUF file's converted (dequantized) checkpoint."""
    from sllm_knative import gguf_source

    try:
        return await in_thread(gguf_source.output_bytes, path)
    except ValueError as exc:  # ConversionError
        raise CorruptData(f"{ref.uri}: the GGUF checkpoint cannot be converted: {exc}") from exc


async def convert_on_node(ref: ModelRef, src: Path, out: Path) -> None:
    """`src` (the downloaded plain checkpoint) converted into `out`, off the event loop."""
    from sllm_knative import convert

    t0 = time.perf_counter()
    try:
        await in_thread(convert.convert, src, out)
    except (ValueError, OSError) as exc:  # ConversionError and FormatError are ValueErrors
        raise CorruptData(f"{ref.uri}: the plain checkpoint (Hugging Face or GGUF) cannot be converted: "
                          f"{exc}") from exc
    _log.info("converted on the node", checkpoint=ref.uri, seconds=round(time.perf_counter() - t0, 3))
