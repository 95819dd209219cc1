"""A chat stream of the real model, migrated mid-answer between two real function processes by
the activator (token-based handoff), is the same answer as the one never migrated: the same
tokens, logprobs, finish reason and usage, seeded or greedy."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.migration.conftest import Activator, Function
from tests.realmodel.conftest import NAME, STORY, serve

MAX_TOKENS = 96
MIGRATE_AFTER = 16  # tokens the client has received before the scale-down


@pytest.fixture(scope="module")
def pair(smollm2: Path, logs: Path) -> Iterator[tuple[Activator, Function, Function]]:
    act = Activator(logs, name="realmodel-activator")
    fns = [serve(name, smollm2, logs) for name in ("smollm2-a", "smollm2-b")]
    try:
        act.wait_ready()
        for f in fns:
            f.wait_ready()
        yield act, fns[0], fns[1]
    finally:
        for p in (act, *fns):
            p.stop()


class Answer:
    def __init__(self) -> None:
        self.tokens: list[str] = []
        self.logprobs: list[float] = []
        self.finish: list[str] = []
        self.usage: dict | None = None
        self.started = threading.Event()


def chat(url: str, seed: int | None, out: Answer | None = None) -> Answer:
    """One streamed chat answer of the story request, through the openai client."""
    from openai import OpenAI

    out = out or Answer()
    sampling: dict[str, Any] = {"temperature": 0} if seed is None else {"temperature": 0.8, "seed": seed}
    client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
    for chunk in client.chat.completions.create(model=NAME, messages=STORY, max_tokens=MAX_TOKENS, stream=True,
                                                logprobs=True, stream_options={"include_usage": True}, **sampling):
        if chunk.usage is not None:
            out.usage = chunk.usage.model_dump()
        for c in chunk.choices:
            for t in (c.logprobs.content if c.logprobs and c.logprobs.content else []):
                out.tokens.append(t.token)
                out.logprobs.append(t.logprob)
            if c.finish_reason:
                out.finish.append(c.finish_reason)
        if len(out.tokens) >= MIGRATE_AFTER:
            out.started.set()
    out.started.set()
    return out


@pytest.mark.parametrize("seed", [pytest.param(None, id="greedy"), pytest.param(7, id="seeded")])
def test_a_chat_stream_migrated_mid_answer_is_the_unmigrated_answer(pair, seed: int | None) -> None:
    act, a, b = pair
    want = chat(b.url, seed)
    assert len(want.tokens) > 2 * MIGRATE_AFTER, "the reference answer is too short to migrate in the middle"
    act.set_instances(a, name=NAME)
    got = Answer()
    with ThreadPoolExecutor(1) as pool:
        streaming = pool.submit(chat, act.url, seed, got)
        assert got.started.wait(120)
        act.set_instances(b, name=NAME)  # a is the victim of a scale-down: no new requests reach it
        result = act.migrate(a, name=NAME)
        streaming.result(timeout=300)
    [gen] = result["generations"]
    assert gen["outcome"] == "migrated" and gen["destination"] == b.id, result
    assert MIGRATE_AFTER <= gen["tokens"] < len(want.tokens), result  # moved in the middle of the answer
    assert got.tokens == want.tokens
    assert got.logprobs == want.logprobs
    assert got.finish == want.finish and got.usage == want.usage
    assert "".join(got.tokens).strip(), "an empty answer"
