from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from sllm_knative import format as fmt


@pytest.fixture(scope="session")
def tiny_src(tmp_path_factory) -> Path:
    from sllm_knative.models import build_model

    return build_model(tmp_path_factory.mktemp("tiny") / "src")


@pytest.fixture(scope="session")
def tiny_ckpt(tiny_src, tmp_path_factory) -> Path:
    from sllm_knative.convert import convert

    return convert(tiny_src, tmp_path_factory.mktemp("tiny-ckpt") / "ckpt")


def valid_index_doc() -> dict:
    """A small valid index: two tensors sharing one storage, one strided view, one empty tensor."""
    return {
        "format": fmt.FORMAT_NAME,
        "version": 1,
        "alignment": 256,
        "partitions": [{"file": "partition-0.bin", "size": 8192,
                        "checksum": {"algorithm": "crc32c", "block_size": 4096, "blocks": [1, 2]}}],
        "storages": [
            {"partition": 0, "offset": 0, "nbytes": 64},
            {"partition": 0, "offset": 256, "nbytes": 24},
            {"partition": 0, "offset": 512, "nbytes": 0},
        ],
        "tensors": [
            {"name": "a", "storage": 0, "dtype": "float32", "shape": [4, 4], "stride": [4, 1], "storage_offset": 0},
            {"name": "a.T", "storage": 0, "dtype": "float32", "shape": [4, 4], "stride": [1, 4], "storage_offset": 0},
            {"name": "b", "storage": 1, "dtype": "float16", "shape": [3, 2], "stride": [4, 1], "storage_offset": 2},
            {"name": "empty", "storage": 2, "dtype": "int8", "shape": [0, 5], "stride": [5, 1], "storage_offset": 0},
        ],
    }


def encode(doc: dict) -> bytes:
    return json.dumps(doc).encode()


def mutated(fn) -> bytes:
    doc = copy.deepcopy(valid_index_doc())
    fn(doc)
    return encode(doc)
