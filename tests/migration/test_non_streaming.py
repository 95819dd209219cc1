"""Non-streaming requests migrate too: the activator names each generation it forwards
(x-sllm-generation-id), so a migration finds it while the client still waits for its one JSON
answer; the source answers the detach with the state, and the client gets the whole completion
from the destination, identical to the same request run without migration."""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx
import pytest

from sllm_knative.api import instance as instance_api
from tests.migration.conftest import (
    MODEL,
    TWICE_LEN,
    TWICE_TOKENS,
    Activator,
    Function,
    kill_source_between_rounds,
)

PROMPT = "The activator holds the client connection while the instance"


def request(seed: int | None, max_tokens: int = 480) -> dict[str, Any]:
    b: dict[str, Any] = {"model": MODEL, "prompt": PROMPT, "max_tokens": max_tokens, "logprobs": 1,
                         "ignore_eos": True}
    if seed is None:
        b["temperature"] = 0
    else:
        b.update(temperature=1.0, top_p=0.95, seed=seed)
    return b


def running(fn: Function, min_generated: int = 8) -> str | None:
    """The id of a generation running on fn with at least `min_generated` tokens past its prompt."""
    r = httpx.get(f"{fn.internal_url}{instance_api.GENERATIONS}", timeout=5)
    for g in r.json()["data"]:
        if g["status"] == "running" and g["position"] > min_generated + 12:
            return str(g["id"])
    return None


def wait_running(fn: Function, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        gen = running(fn)
        if gen:
            return gen
        time.sleep(0.005)
    raise TimeoutError(f"no generation running on {fn.id}")


def in_background(url: str, body: dict[str, Any]) -> tuple[threading.Thread, dict[str, Any]]:
    """POST a non-streaming completion from a thread; its response lands in result["r"]."""
    result: dict[str, Any] = {}
    t = threading.Thread(target=lambda: result.update(r=httpx.post(f"{url}/v1/completions", json=body, timeout=120)))
    t.start()
    return t, result


def same_completion(got: dict[str, Any], want: dict[str, Any]) -> None:
    g, w = got["choices"][0], want["choices"][0]
    assert g["logprobs"]["tokens"] == w["logprobs"]["tokens"]
    assert g["logprobs"]["token_logprobs"] == w["logprobs"]["token_logprobs"]
    assert g["text"] == w["text"] and g["finish_reason"] == w["finish_reason"] == "length"
    assert got["usage"] == want["usage"]


@pytest.mark.parametrize("seed", [pytest.param(None, id="greedy"), pytest.param(4321, id="seeded")])
def test_non_streaming_migration_is_exact(activator: Activator, functions: list[Function], seed: int | None) -> None:
    openai = pytest.importorskip("openai")
    a, b = functions
    want = httpx.post(f"{b.url}/v1/completions", json=request(seed), timeout=120).json()
    activator.set_instances(a)
    client = openai.OpenAI(base_url=f"{activator.url}/v1", api_key="unused", max_retries=0, timeout=120)
    migrated: dict[str, Any] = {}

    def scale_down() -> None:
        gen = wait_running(a)
        activator.set_instances(b)  # a is the victim
        migrated.update(activator.migrate(a))
        migrated["id"] = gen

    t = threading.Thread(target=scale_down)
    t.start()
    extra = {k: v for k, v in request(seed).items() if k not in ("model", "prompt", "max_tokens", "logprobs",
                                                                 "temperature", "top_p", "seed")}
    raw = client.completions.with_raw_response.create(
        model=MODEL, prompt=PROMPT, max_tokens=480, logprobs=1, extra_body=extra,
        **({"temperature": 0} if seed is None else {"temperature": 1.0, "top_p": 0.95, "seed": seed}))
    t.join(60)
    parsed = raw.parse()  # the official client takes it as a Completion
    got = raw.http_response.json()
    assert parsed.id == got["id"] and parsed.choices[0].text == got["choices"][0]["text"]
    [gen] = migrated["generations"]
    assert gen["outcome"] == "migrated" and gen["destination"] == "b", migrated
    assert gen["id"] == migrated["id"] == got["id"] and got["id"].startswith("cmpl-")
    assert raw.headers["x-sllm-instance"] == "b"
    same_completion(got, want)


def test_non_streaming_chat_migrates(activator: Activator, functions: list[Function]) -> None:
    a, b = functions
    req = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 480, "temperature": 0,
           "ignore_eos": True}
    want = httpx.post(f"{b.url}/v1/chat/completions", json=req, timeout=120).json()
    activator.set_instances(a)
    migrated: dict[str, Any] = {}

    def scale_down() -> None:
        wait_running(a)
        activator.set_instances(b)
        migrated.update(activator.migrate(a))

    t = threading.Thread(target=scale_down)
    t.start()
    r = httpx.post(f"{activator.url}/v1/chat/completions", json=req, timeout=120)
    t.join(60)
    assert r.status_code == 200, r.text
    assert migrated["generations"][0]["outcome"] == "migrated", migrated
    got = r.json()
    assert got["id"].startswith("chatcmpl-") and r.headers["x-sllm-instance"] == "b"
    assert got["choices"][0]["message"] == want["choices"][0]["message"]
    assert got["usage"] == want["usage"]


def test_non_streaming_source_killed_mid_migration_recovers(endless_activator: Activator,
                                                             functions: list[Function], spare: Any) -> None:
    act = endless_activator
    _, b = functions
    src = spare("ns-src")
    want = httpx.post(f"{b.url}/v1/completions", json=request(8), timeout=120).json()
    act.set_instances(src)
    t, result = in_background(act.url, request(8))
    wait_running(src)
    act.set_instances(b)
    migration = kill_source_between_rounds(act, src, b)
    t.join(120)
    r = result["r"]
    assert r.status_code == 200, r.text
    same_completion(r.json(), want)
    [gen] = migration["generations"]
    assert gen["outcome"] == "recovered" and gen["destination"] == "b", migration
    assert r.headers["x-sllm-instance"] == "b"


def test_client_cannot_choose_the_generation_id(activator: Activator, functions: list[Function]) -> None:
    a, _ = functions
    activator.set_instances(a)
    r = httpx.post(f"{activator.url}/v1/completions", json=request(None, 4),
                   headers={"x-sllm-generation-id": "cmpl-chosen-by-client"}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["id"] != "cmpl-chosen-by-client" and r.json()["id"].startswith("cmpl-")


def test_sigterm_migrates_a_waiting_non_streaming_request(activator: Activator, functions: list[Function],
                                                          spare: Any) -> None:
    _, b = functions
    victim = spare("ns-preempted", {"SLLM_DRAIN_URL": activator.admin, "SLLM_DRAIN_GRACE_S": "30"})
    want = httpx.post(f"{b.url}/v1/completions", json=request(17), timeout=120).json()
    activator.set_instances(victim)
    t, result = in_background(activator.url, request(17))
    wait_running(victim)
    activator.set_instances(victim, b)
    victim.proc.terminate()  # SIGTERM: the instance asks the activator to drain it, then exits
    assert victim.proc.wait(40) == 0
    t.join(120)
    r = result["r"]
    assert r.status_code == 200, r.text
    same_completion(r.json(), want)
    assert r.headers["x-sllm-instance"] == "b"
    log = victim.log_path.read_text()
    assert "drained before exit" in log and "outcomes=migrated" in log, log[-2000:]


def test_non_streaming_request_migrates_twice(activator: Activator, spare: Any) -> None:
    """A -> B, then B -> C while the client still waits: B, resuming the request, is migrated in
    turn and answers the activator with the newer state, which C finishes."""
    a, b, c = (spare(f"ns-twice-{n}", max_model_len=TWICE_LEN) for n in "abc")
    want = httpx.post(f"{c.url}/v1/completions", json=request(29, TWICE_TOKENS), timeout=120).json()
    activator.set_instances(a)
    t, result = in_background(activator.url, request(29, TWICE_TOKENS))
    try:
        wait_running(a)
        activator.set_instances(b, c)
        first = activator.migrate(a, b)
        wait_running(b)
        activator.set_instances(c)
        second = activator.migrate(b, c)
    finally:
        t.join(120)
    r = result["r"]
    assert r.status_code == 200, r.text
    same_completion(r.json(), want)
    [g1], [g2] = first["generations"], second["generations"]
    assert g1["outcome"] == "migrated" and g1["destination"] == "ns-twice-b", first
    assert g2["outcome"] == "migrated" and g2["destination"] == "ns-twice-c", second
    assert g1["id"] == g2["id"] == r.json()["id"] and g2["tokens"] > g1["tokens"], (first, second)
    assert r.headers["x-sllm-instance"] == "ns-twice-c"
