"""Resumable generation across two server processes: export, prefill, detach, resume.

The guarantee under test (docs/function.md): a generation exported at any position on
instance A and resumed on instance B produces exactly the tokens (and logprobs, bit for bit)
of the uninterrupted generation, for greedy and seeded sampling, while both instances
batch other requests.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from functions.llm.params import SamplingParams
from functions.llm.sampling import encode_generator, new_generator
from functions.llm.state import GenerationState
from tests.functions.conftest import Server

PROMPT = "Knative routes requests to revisions; the activator"


class Collected:
    def __init__(self) -> None:
        self.id: str | None = None
        self.text = ""
        self.tokens: list[str] = []
        self.logprobs: list[float] = []
        self.events: list[str] = []
        self.done = False
        self.usage: dict | None = None


def _frames(response: httpx.Response) -> Iterator[tuple[str | None, str]]:
    event = None
    for line in response.iter_lines():
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            yield event, line[6:]
            event = None


def consume(response: httpx.Response, out: Collected, on_chunk=None) -> Collected:
    for event, data in _frames(response):
        if event is not None:
            out.events.append(event)
            continue
        if data == "[DONE]":
            out.done = True
            continue
        chunk = json.loads(data)
        assert "error" not in chunk, chunk
        out.id = out.id or chunk["id"]
        if chunk.get("usage"):
            out.usage = chunk["usage"]
        for choice in chunk["choices"]:
            out.text += choice["text"]
            if choice.get("logprobs"):
                out.tokens += choice["logprobs"]["tokens"]
                out.logprobs += choice["logprobs"]["token_logprobs"]
        if on_chunk is not None:
            on_chunk(out)
    return out


def body(**over) -> dict:
    return {"model": "tiny", "prompt": PROMPT, "max_tokens": 700, "stream": True, "ignore_eos": True, "logprobs": 1,
            "stream_options": {"include_usage": True}, **over}


SAMPLING = [
    pytest.param({"temperature": 0}, id="greedy"),
    pytest.param({"temperature": 1.0, "top_p": 0.95, "top_k": 100, "seed": 42}, id="seeded"),
]


class Load:
    """Other streaming requests on a server, so the migrated sequence shares its batch."""

    def __init__(self, server: Server, n: int) -> None:
        self._threads = []
        for i in range(n):
            b = body(prompt=f"Background request {i}: " + "tokens " * (3 * i), max_tokens=100 + 40 * i,
                     temperature=0.7, seed=i, logprobs=None)
            t = threading.Thread(target=self._run, args=(server, b), daemon=True)
            t.start()
            self._threads.append(t)

    @staticmethod
    def _run(server: Server, b: dict) -> None:
        with httpx.Client(timeout=60) as c, c.stream("POST", f"{server.url}/v1/completions", json=b) as r:
            consume(r, Collected())

    def join(self) -> None:
        for t in self._threads:
            t.join(60)


def export(server: Server, gen_id: str) -> dict:
    r = httpx.get(f"{server.internal_url}/internal/v1/generations/{gen_id}", timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def resume(server: Server, state: dict) -> Collected:
    with httpx.Client(timeout=60) as c, c.stream("POST", f"{server.internal_url}/internal/v1/resume",
                                                 json={"state": state}) as r:
        assert r.status_code == 200, r.read()
        return consume(r, Collected())


@pytest.mark.parametrize("sampling", SAMPLING)
def test_export_anywhere_resume_elsewhere_is_exact(server_pair, sampling):
    a, b = server_pair
    load_a, load_b = Load(a, 2), Load(b, 2)
    snapshots: list[dict] = []
    take_at = {1, 20, 60}

    def on_chunk(out: Collected) -> None:
        if len(out.tokens) in take_at:
            take_at.discard(len(out.tokens))
            snapshots.append(export(a, out.id))

    with httpx.Client(timeout=60) as c, c.stream("POST", f"{a.url}/v1/completions", json=body(**sampling)) as r:
        reference = consume(r, Collected(), on_chunk)
    assert reference.done and len(reference.tokens) == 700
    positions = [s["position"] for s in snapshots]
    assert len(set(positions)) == 3, positions
    prompt_len = snapshots[0]["prompt_len"]
    # Resume all three at once: they share B's batch too (as copies: one id runs once per instance).
    copies = [{**s, "id": f"{s['id']}-{i}"} for i, s in enumerate(snapshots)]
    with ThreadPoolExecutor(len(copies)) as pool:
        resumed = list(pool.map(lambda s: resume(b, s), copies))
    for state, got in zip(copies, resumed, strict=True):
        skip = state["position"] - prompt_len
        assert got.tokens == reference.tokens[skip:], f"position {state['position']}"
        assert got.logprobs == reference.logprobs[skip:], f"position {state['position']}"  # bit for bit
        assert got.text == reference.text[state["text_offset"]:]
        assert got.done and got.usage == reference.usage and got.id == state["id"]
    load_a.join()
    load_b.join()


def test_detach_with_prefill_rounds_continues_the_stream(server_pair):
    """The activator's handoff: prefill B while A generates, detach A at a position, resume on B."""
    a, b = server_pair
    sampling = {"temperature": 0.8, "seed": 7}
    with httpx.Client(timeout=60) as c, c.stream("POST", f"{a.url}/v1/completions", json=body(**sampling)) as r:
        reference = consume(r, Collected())
    load_a, load_b = Load(a, 2), Load(b, 1)
    first = Collected()
    steps: dict = {}

    def on_chunk(out: Collected) -> None:
        if len(out.tokens) == 2:
            st = export(a, out.id)
            steps["round1"] = st
            r1 = httpx.post(f"{b.internal_url}/internal/v1/prefill",
                            json={"id": st["id"], "start": 0, "tokens": st["tokens"]}, timeout=30)
            assert r1.status_code == 200, r1.text
            assert r1.json() == {"id": st["id"], "cached": len(st["tokens"]) - 1, "tokens": len(st["tokens"])}
            for _ in range(5):  # the activator's loop: aim ahead of the source, again if it got there first
                target = export(a, out.id)["position"] + 64
                d = httpx.post(f"{a.internal_url}/internal/v1/generations/{out.id}/detach",
                               json={"position": target}, timeout=30)
                if d.status_code != 409:
                    break
                assert d.json()["error"]["code"] == "position_passed"
            assert d.status_code == 200, d.text
            steps["final"] = d.json()
            assert steps["final"]["position"] == target and steps["final"]["finish_reason"] is None

    with httpx.Client(timeout=60) as c, c.stream("POST", f"{a.url}/v1/completions", json=body(**sampling)) as r:
        consume(r, first, on_chunk)
    final = steps["final"]
    assert first.events == ["sllm.detached"] and not first.done  # A's stream ends without [DONE]
    assert len(first.tokens) == final["position"] - final["prompt_len"]
    listed = httpx.get(f"{b.internal_url}/internal/v1/generations").json()["data"]
    assert {"id": final["id"], "status": "parked", "position": len(steps["round1"]["tokens"]),
            "cached": len(steps["round1"]["tokens"]) - 1} in listed
    start = len(steps["round1"]["tokens"])
    r2 = httpx.post(f"{b.internal_url}/internal/v1/prefill",
                    json={"id": final["id"], "start": start, "tokens": final["tokens"][start:]}, timeout=30)
    assert r2.status_code == 200 and r2.json()["cached"] == final["position"] - 1, r2.text
    second = resume(b, final)
    assert first.text + second.text == reference.text
    assert first.tokens + second.tokens == reference.tokens
    assert first.logprobs + second.logprobs == reference.logprobs
    assert second.done and second.usage == reference.usage
    load_a.join()
    load_b.join()


def test_queued_prefills_follow_the_source(server_pair):
    """The follow phase: after a waited prefill, each new token goes to B with `"wait": false`
    (answered at once, queued in order); B computes them while A generates; the resume from A's
    detach continues exactly."""
    a, b = server_pair
    with httpx.Client(timeout=60) as c, c.stream("POST", f"{a.url}/v1/completions",
                                                 json=body(temperature=0)) as r:
        reference = consume(r, Collected())
    first = Collected()
    steps: dict = {"answers": []}
    http = httpx.Client(timeout=30)  # keep-alive: the calls must keep up with A's tokens
    load_a = Load(a, 2)  # A batches other requests (and generates a little slower)

    def on_chunk(out: Collected) -> None:
        if len(out.tokens) == 2:
            st = http.get(f"{a.internal_url}/internal/v1/generations/{out.id}").json()
            r1 = http.post(f"{b.internal_url}/internal/v1/prefill",
                           json={"id": st["id"], "start": 0, "tokens": st["tokens"]})
            assert r1.status_code == 200, r1.text
            steps["sent"] = len(st["tokens"])
        elif 2 < len(out.tokens) <= 30 and "final" not in steps:
            st = http.get(f"{a.internal_url}/internal/v1/generations/{out.id}").json()
            sent = steps["sent"]
            if st["position"] > sent:
                q = http.post(f"{b.internal_url}/internal/v1/prefill",
                              json={"id": st["id"], "start": sent, "tokens": st["tokens"][sent:], "wait": False})
                assert q.status_code == 200, q.text
                steps["answers"].append(q.json())
                steps["sent"] = st["position"]
            if len(out.tokens) == 30:
                def computed() -> int:
                    rows = http.get(f"{b.internal_url}/internal/v1/generations").json()["data"]
                    return next(g["cached"] for g in rows if g["id"] == out.id)
                for _ in range(200):  # B catches up with everything queued
                    if computed() == steps["sent"] - 1:
                        break
                    threading.Event().wait(0.05)
                assert computed() == steps["sent"] - 1
                d = http.post(f"{a.internal_url}/internal/v1/generations/{out.id}/detach", json={"position": None})
                assert d.status_code == 200, d.text
                steps["final"] = d.json()

    with httpx.Client(timeout=60) as c, c.stream("POST", f"{a.url}/v1/completions",
                                                 json=body(temperature=0)) as r:
        consume(r, first, on_chunk)
    http.close()
    load_a.join()
    answers = steps["answers"]
    assert len(answers) >= 5  # one per new token (or a few) from 3 to 30
    assert all(0 <= q["cached"] < q["tokens"] for q in answers)  # answered before computing what it queued
    assert [q["tokens"] for q in answers] == sorted({q["tokens"] for q in answers})
    second = resume(b, steps["final"])
    assert first.tokens + second.tokens == reference.tokens
    assert first.text + second.text == reference.text
    assert first.logprobs + second.logprobs == reference.logprobs and second.done


def test_internal_errors(server_pair):
    a, b = server_pair
    base = f"{a.internal_url}/internal/v1"
    assert httpx.get(f"{base}/generations/cmpl-missing").status_code == 404
    r = httpx.post(f"{base}/generations/cmpl-missing/detach", json={"position": 3})
    assert r.status_code == 404 and r.json()["error"]["code"] == "generation_not_found"
    r = httpx.post(f"{base}/prefill", json={"id": "g1", "start": 5, "tokens": [3, 4]})
    assert r.status_code == 409 and r.json()["error"]["code"] == "prefill_out_of_order"
    r = httpx.post(f"{base}/prefill", json={"id": "g1", "start": 0, "tokens": [3, 99999]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"
    r = httpx.post(f"{base}/prefill", json={"id": "g1", "start": 0, "tokens": [3], "wait": "no"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "wait"
    # a queued prefill out of order is answered (nothing waits for it) and only logged
    r = httpx.post(f"{base}/prefill", json={"id": "g1", "start": 5, "tokens": [3, 4], "wait": False})
    assert r.status_code == 200 and r.json() == {"id": "g1", "cached": 0, "tokens": 7}
    assert "g1" not in {g["id"] for g in httpx.get(f"{base}/generations").json()["data"]}
    r = httpx.post(f"{base}/resume", json={"state": {"version": 9}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "state.version"
    state = GenerationState(id="cmpl-handmade", kind="completion", model="tiny", created=1, tokens=(5, 6, 7),
                            prompt_len=2, sampling=SamplingParams(max_tokens=4), generator=encode_generator(
                                new_generator(1)), stream=False, include_usage=False, echo=False, text_offset=0,
                            logprobs=None, finish_reason=None, numerics={}).to_json()
    r = httpx.post(f"{b.internal_url}/internal/v1/resume", json={"state": {**state, "model": "other"}})
    assert r.status_code == 400 and r.json()["error"]["code"] == "model_mismatch"
    r = httpx.post(f"{b.internal_url}/internal/v1/resume", json={"state": {**state, "finish_reason": "length"}})
    assert r.status_code == 409 and r.json()["error"]["code"] == "generation_finished"
    r = httpx.post(f"{b.internal_url}/internal/v1/resume", json={"state": state}, timeout=30)
    assert r.status_code == 200 and r.json()["usage"] == {"prompt_tokens": 2, "completion_tokens": 4,
                                                          "total_tokens": 6}
    assert httpx.post(f"{base}/prefill", json={"id": "g2", "tokens": [3, 4, 5]}).status_code == 200
    assert httpx.delete(f"{base}/prefill/g2").status_code == 200
    assert httpx.delete(f"{base}/prefill/g2").status_code == 404
    # the internal API is not on the public port
    assert httpx.post(f"{a.url}/internal/v1/resume", json={"state": {}}).status_code == 404


@pytest.mark.parametrize("sampling", SAMPLING)
def test_non_streaming_detach_answers_the_state_and_resumes_whole(server_pair, sampling):
    """A non-streaming generation named by the caller (x-sllm-generation-id) is exported and
    detached while its request waits; A answers 409 + x-sllm-detached with the final state, and
    B's resume answers the whole completion, identical to the unmigrated one."""
    a, b = server_pair
    req = body(stream=False, stream_options=None, max_tokens=400, **sampling)
    del req["stream_options"]
    with httpx.Client(timeout=60) as c:
        reference = c.post(f"{a.url}/v1/completions", json=req).json()
    gen_id = "cmpl-activator-chosen-0001"
    result: dict = {}

    def client() -> None:
        with httpx.Client(timeout=60) as c:
            result["r"] = c.post(f"{a.url}/v1/completions", json=req, headers={"x-sllm-generation-id": gen_id})

    t = threading.Thread(target=client)
    t.start()
    for _ in range(500):  # until the generation is running and has some tokens
        r = httpx.get(f"{a.internal_url}/internal/v1/generations/{gen_id}", timeout=30)
        if r.status_code == 200 and r.json()["position"] > r.json()["prompt_len"] + 20:
            break
    assert r.status_code == 200, r.text
    d = httpx.post(f"{a.internal_url}/internal/v1/generations/{gen_id}/detach", json={"position": None}, timeout=30)
    assert d.status_code == 200, d.text
    t.join(60)
    answered = result["r"]
    assert answered.status_code == 409
    assert answered.headers["x-sllm-detached"] == str(d.json()["position"])
    assert answered.json()["error"]["code"] == "generation_detached"
    state = answered.json()["state"]
    assert state == d.json() and state["stream"] is False and state["text_offset"] == 0
    resumed = httpx.post(f"{b.internal_url}/internal/v1/resume", json={"state": state}, timeout=60)
    assert resumed.status_code == 200, resumed.text
    got = resumed.json()
    assert got["id"] == gen_id
    assert got["choices"][0]["text"] == reference["choices"][0]["text"]
    assert got["choices"][0]["logprobs"] == reference["choices"][0]["logprobs"]
    assert got["usage"] == reference["usage"]


def test_generation_id_header(server_pair):
    a, _ = server_pair
    req = {"model": "tiny", "prompt": "hello", "max_tokens": 3}
    r = httpx.post(f"{a.url}/v1/completions", json=req, headers={"x-sllm-generation-id": "cmpl-mine-12345"})
    assert r.status_code == 200 and r.json()["id"] == "cmpl-mine-12345"
    with httpx.stream("POST", f"{a.url}/v1/completions", json={**req, "stream": True},
                      headers={"x-sllm-generation-id": "cmpl-mine-67890"}) as s:
        assert s.headers["x-request-id"] == "cmpl-mine-67890"
        assert s.headers["x-sllm-generation-id"] == "cmpl-mine-67890"  # one choice: movable
        assert consume(s, Collected()).id == "cmpl-mine-67890"
    # n > 1: the choices are generations <id>-0, <id>-1, not <id>: the stream does not offer itself
    with httpx.stream("POST", f"{a.url}/v1/completions", json={**req, "stream": True, "n": 2, "seed": 1},
                      headers={"x-sllm-generation-id": "cmpl-mine-n2-000"}) as s:
        assert s.status_code == 200 and s.headers["x-request-id"] == "cmpl-mine-n2-000"
        assert "x-sllm-generation-id" not in s.headers
        assert consume(s, Collected()).id == "cmpl-mine-n2-000"
    for bad in ("short", "-starts-with-dash", "has space in it", "x" * 129):
        r = httpx.post(f"{a.url}/v1/completions", json=req, headers={"x-sllm-generation-id": bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == "x-sllm-generation-id", bad
    # an id in use on the instance is refused, not shared
    slow = {**req, "max_tokens": 300, "ignore_eos": True}
    t = threading.Thread(target=lambda: httpx.post(f"{a.url}/v1/completions", json=slow, timeout=60,
                                                   headers={"x-sllm-generation-id": "cmpl-taken-000"}))
    t.start()
    for _ in range(500):
        if httpx.get(f"{a.internal_url}/internal/v1/generations/cmpl-taken-000", timeout=30).status_code == 200:
            break
    r = httpx.post(f"{a.url}/v1/completions", json=req, headers={"x-sllm-generation-id": "cmpl-taken-000"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "generation_id_in_use"
    t.join(60)


def test_a_prefilled_resume_is_admitted_at_the_concurrency_limit(server_pair, tiny_model, tmp_path):
    """The destination's parked prefill is the generation's reservation: once prefilled there, its
    resume is admitted even when every concurrency slot is taken (after the detach the source has
    let it go: a refusal would cut the stream). Without a prefill, the limit holds (429)."""
    a, _ = server_pair
    full = Server(tiny_model, tmp_path / "full.log", "--max-concurrency", "1")
    try:
        full.wait_ready()
        with httpx.Client(timeout=60) as c, c.stream("POST", f"{a.url}/v1/completions",
                                                     json=body(temperature=0, max_tokens=EXPORTED_TOKENS)) as r:
            reference = consume(r, Collected())
        state = export_at(a, 5)
        occupant = threading.Thread(target=Load._run, args=(full, body(max_tokens=600, logprobs=None)), daemon=True)
        occupant.start()
        deadline = time.monotonic() + 30
        while full.metric("sllm_function_requests_in_flight") < 1:
            assert time.monotonic() < deadline, "the occupant never started"
            time.sleep(0.05)
        refused = httpx.post(f"{full.internal_url}/internal/v1/resume", json={"state": state}, timeout=30)
        assert refused.status_code == 429, refused.text
        p = httpx.post(f"{full.internal_url}/internal/v1/prefill",
                       json={"id": state["id"], "start": 0, "tokens": state["tokens"]}, timeout=30)
        assert p.status_code == 200, p.text
        resumed = resume(full, state)
        skip = state["position"] - state["prompt_len"]
        assert resumed.done and resumed.tokens == reference.tokens[skip:]
        occupant.join(60)
    finally:
        full.stop()


# Long enough that the generation still runs when the client, reading the stream, asks for the
# export: with 40 tokens the tiny model had finished (404) by the time a loaded CI machine's
# client read the fifth chunk.
EXPORTED_TOKENS = 300


def export_at(server: Server, tokens: int) -> dict:
    """A greedy generation of EXPORTED_TOKENS tokens on `server`, exported once it has `tokens` of them."""
    got: dict = {}

    def on_chunk(out: Collected) -> None:
        if len(out.tokens) == tokens and not got:
            got.update(export(server, out.id))

    with httpx.Client(timeout=60) as c, c.stream("POST", f"{server.url}/v1/completions",
                                                 json=body(temperature=0, max_tokens=EXPORTED_TOKENS)) as r:
        consume(r, Collected(), on_chunk)
    assert got, "never exported"
    return {**got, "id": got["id"] + "-copy"}
