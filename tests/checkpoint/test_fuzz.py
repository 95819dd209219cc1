"""The index parser fuzzed: any bytes either parse into a consistent Index or raise FormatError."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sllm_knative import format as fmt
from tests.checkpoint.conftest import valid_index_doc
from tests.json_mutation import mutated

EXAMPLES = 10_000


_DOCS = mutated(valid_index_doc)


@st.composite
def mutated_docs(draw) -> bytes:
    raw = json.dumps(draw(_DOCS)).encode()
    mode = draw(st.sampled_from(["json", "truncate", "flip"]))
    if mode == "truncate":
        raw = raw[: draw(st.integers(0, len(raw)))]
    elif mode == "flip":
        i = draw(st.integers(0, len(raw) - 1))
        raw = raw[:i] + bytes([raw[i] ^ draw(st.integers(1, 255))]) + raw[i + 1:]
    return raw


def _check(raw: bytes) -> None:
    try:
        idx = fmt.parse_index(raw)
    except fmt.FormatError:
        return
    # Whatever parses must satisfy the invariants the loader relies on.
    for s in idx.storages:
        assert s.offset % idx.alignment == 0
        assert s.offset + s.nbytes <= idx.partitions[s.partition].size
    for t in idx.tensors:
        assert t.extent_bytes() <= idx.storages[t.storage].nbytes


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(mutated_docs())
def test_mutated_indexes_never_crash(raw: bytes) -> None:
    _check(raw)


@settings(max_examples=2_000, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(st.binary(max_size=512))
def test_random_bytes_never_crash(raw: bytes) -> None:
    _check(raw)
