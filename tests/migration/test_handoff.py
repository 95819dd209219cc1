"""Live migration through the activator, end to end: real function processes (exact numerics),
the activator as a process, the admin migrate call the autoscaler makes. Every migrated stream
is compared token by token (and logprob by logprob) with the same request run without migration."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from activator.migration import MigrationConfig, follow_done
from sllm_knative.api import activator as admin_api
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


class Collected:
    def __init__(self) -> None:
        self.tokens: list[str] = []
        self.logprobs: list[float] = []
        self.text = ""
        self.done = 0
        self.events: list[str] = []
        self.errors: list[dict] = []
        self.finish: str | None = None
        self.usage: dict | None = None
        self.chunks = 0
        self.started = threading.Event()


def body(seed: int | None, max_tokens: int = 480) -> dict:
    b = {"model": MODEL, "prompt": PROMPT, "max_tokens": max_tokens, "stream": True, "logprobs": 1,
         "ignore_eos": True, "stream_options": {"include_usage": True}}
    if seed is None:
        b["temperature"] = 0
    else:
        b.update(temperature=1.0, top_p=0.95, seed=seed)
    return b


def stream(url: str, b: dict, out: Collected, start_after: int = 8) -> Collected:
    """POST a streaming completion and collect it; `out.started` is set after `start_after` tokens."""
    with httpx.stream("POST", f"{url}/v1/completions", json=b, timeout=120) as r:
        assert r.status_code == 200, r.read()
        event = None
        for line in r.iter_lines():
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data: "):
                data = line[6:]
                if event is not None:
                    out.events.append(event)
                    event = None
                elif data == "[DONE]":
                    out.done += 1
                else:
                    chunk = json.loads(data)
                    if "error" in chunk:
                        out.errors.append(chunk)
                        continue
                    if chunk.get("usage"):
                        out.usage = chunk["usage"]
                    for choice in chunk["choices"]:
                        out.chunks += 1
                        out.text += choice["text"]
                        if choice.get("logprobs"):
                            out.tokens += choice["logprobs"]["tokens"]
                            out.logprobs += choice["logprobs"]["token_logprobs"]
                        out.finish = choice["finish_reason"] or out.finish
                    if len(out.tokens) >= start_after:
                        out.started.set()
    out.started.set()
    return out


def reference(fn: Function, b: dict) -> Collected:
    return stream(fn.url, b, Collected())


def assert_same(got: Collected, want: Collected) -> None:
    assert got.errors == [] and got.events == [], (got.errors, got.events)
    assert got.done == 1
    assert len(got.tokens) == len(want.tokens)
    for i, (g, w) in enumerate(zip(got.tokens, want.tokens, strict=True)):
        assert g == w, f"token {i}: {g!r} != {w!r}"
    assert got.logprobs == want.logprobs
    assert got.text == want.text
    assert got.finish == want.finish and got.usage == want.usage


def migrating(act: Activator, bodies: list[dict], during: Callable[[], dict],
              start_after: int = 8) -> tuple[list[Collected], dict]:
    """Start the streams through the activator, run `during` once all have `start_after` tokens."""
    outs = [Collected() for _ in bodies]
    with ThreadPoolExecutor(len(bodies)) as pool:
        futures = [pool.submit(stream, act.url, b, o, start_after) for b, o in zip(bodies, outs, strict=True)]
        for o in outs:
            assert o.started.wait(60)
        result = during()
        for f in futures:
            f.result(timeout=120)
    return outs, result


def migration_metrics(act: Activator) -> dict[str, float]:
    """The activator's migration metrics (its admin port's /metrics), by sample name and labels."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{act.admin}{admin_api.METRICS}", timeout=5).text
    return {s.name + "".join(f"[{v}]" for v in s.labels.values()): s.value
            for fam in text_string_to_metric_families(text) if fam.name.startswith("activator_migration")
            for s in fam.samples}


def instance_loads(act: Activator) -> dict[str, int]:
    """Outstanding requests (capacity slots held) per instance in rotation, from the activator's stats."""
    stats = httpx.get(f"{act.admin}{admin_api.STATS}", timeout=5).json()
    return {i["id"]: i["outstanding"] for s in stats["services"] for i in s["instances"]}


@pytest.mark.parametrize("seed", [pytest.param(None, id="greedy"), pytest.param(1234, id="seeded")])
def test_scale_down_migration_is_exact(activator, functions, seed):
    a, b = functions
    want = reference(b, body(seed))
    activator.set_instances(a)
    before = migration_metrics(activator)

    def scale_down() -> dict:
        activator.set_instances(b)  # a is the victim: no new requests reach it
        return activator.migrate(a)

    (got,), result = migrating(activator, [body(seed)], scale_down)
    assert_same(got, want)
    [gen] = result["generations"]
    assert gen["outcome"] == "migrated", result
    assert gen["destination"] == "b" and gen["rounds"] >= 1 and gen["tokens"] > 8
    assert gen["gaps"] == [] or gen["gaps"][-1] <= 16 or gen["rounds"] == 4
    # The migration shows in the activator's metrics: its outcome, its duration, the stream's handoff gap.
    after = migration_metrics(activator)
    assert after["activator_migrations_total[migrated]"] == before["activator_migrations_total[migrated]"] + 1
    assert after["activator_migrations_total[failed]"] == before["activator_migrations_total[failed]"]
    assert after["activator_migration_seconds_count"] == before["activator_migration_seconds_count"] + 1
    assert after["activator_migration_seconds_sum"] - before["activator_migration_seconds_sum"] == \
        pytest.approx(gen["seconds"], rel=1e-6)
    assert after["activator_migration_gap_seconds_count"] == before["activator_migration_gap_seconds_count"] + 1
    gap = after["activator_migration_gap_seconds_sum"] - before["activator_migration_gap_seconds_sum"]
    assert 0 < gap < 10 and after["activator_migration_gap_max_seconds"] >= gap - 1e-9


@pytest.mark.parametrize("seed", [pytest.param(None, id="greedy"), pytest.param(1234, id="seeded")])
def test_follow_phase_migration_is_exact(following_activator, functions, seed):
    """Round 1, then one queued prefill per source step (`"wait": false`), then the detach and the
    resume behind whatever the destination still computes: the same text, token by token."""
    act = following_activator
    a, b = functions
    want = reference(b, body(seed))
    act.set_instances(a)

    def scale_down() -> dict:
        act.set_instances(b)
        return act.migrate(a)

    (got,), result = migrating(act, [body(seed)], scale_down)
    assert_same(got, want)
    [gen] = result["generations"]
    assert gen["outcome"] == "migrated" and gen["rounds"] == 1, result
    assert 1 <= gen["follow"] <= 12 and len(gen["lags"]) == gen["follow"], result
    # It ended where the rule says (the bound, an idle destination, or one falling behind), not before.
    cfg = MigrationConfig(gap_threshold=0, settle_gap=1_000_000, max_follow=12)
    lags = gen["lags"]
    assert follow_done(lags, cfg) and not any(follow_done(lags[:k], cfg) for k in range(1, len(lags))), result


def test_concurrent_streams_all_migrate_exactly(activator, functions):
    a, b = functions
    bodies = [body(None)] + [body(seed) for seed in (1, 2, 3)]
    with ThreadPoolExecutor(len(bodies)) as pool:
        wants = list(pool.map(lambda x: reference(a, x), bodies))
    activator.set_instances(b)

    def scale_down() -> dict:
        activator.set_instances(a)
        return activator.migrate(b)

    gots, result = migrating(activator, bodies, scale_down)
    for got, want in zip(gots, wants, strict=True):
        assert_same(got, want)
    assert sorted(g["outcome"] for g in result["generations"]) == ["migrated"] * 4, result


def test_official_openai_client_sees_one_stream(activator, functions):
    openai = pytest.importorskip("openai")
    a, b = functions
    want = reference(a, body(7))
    activator.set_instances(a)
    client = openai.OpenAI(base_url=f"{activator.url}/v1", api_key="unused", max_retries=0)
    texts: list[str] = []
    finishes: list[str | None] = []
    migrated: dict = {}

    def migrate_later() -> None:
        while len(texts) < 8:
            time.sleep(0.01)
        activator.set_instances(b)
        migrated.update(activator.migrate(a))

    t = threading.Thread(target=migrate_later)
    t.start()
    for chunk in client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=480, stream=True, seed=7,
                                           temperature=1.0, top_p=0.95, extra_body={"ignore_eos": True}):
        if chunk.choices:
            texts.append(chunk.choices[0].text)
            finishes.append(chunk.choices[0].finish_reason)
    t.join(60)
    assert migrated["generations"][0]["outcome"] == "migrated", migrated
    assert "".join(texts) == want.text
    assert finishes[-1] == "length" and finishes.count("length") == 1


def test_stream_migrates_twice(activator, spare):
    """A -> B, then, while the client still reads, B -> C (a scale-down, then a preemption of the
    new host): after the first migration the stream is registered against B, so the second finds
    it. The client sees one stream with exactly the text of an unmigrated run."""
    a, b, c = (spare(f"twice-{n}", max_model_len=TWICE_LEN) for n in "abc")
    seed = 808
    want = reference(c, body(seed, TWICE_TOKENS))
    activator.set_instances(a)
    before = migration_metrics(activator)
    out = Collected()
    t = threading.Thread(target=stream, args=(activator.url, body(seed, TWICE_TOKENS), out, 8))
    t.start()
    try:
        assert out.started.wait(60)
        activator.set_instances(b, c)  # a is the victim of a scale-down
        first = activator.migrate(a, b)
        on_b = len(out.tokens)
        deadline = time.monotonic() + 30
        # B's first frame reaches the client: the stream runs on B now. Not more: B must not finish
        # the generation before the second migration starts (with 480 tokens, on a loaded machine,
        # it once did).
        while len(out.tokens) <= on_b and time.monotonic() < deadline:
            time.sleep(0.002)
        loads = instance_loads(activator)
        activator.set_instances(c)  # b is preempted
        second = activator.migrate(b, c)
    finally:
        t.join(120)
    assert_same(out, want)
    [g1], [g2] = first["generations"], second["generations"]
    assert g1["outcome"] == "migrated" and g1["destination"] == "twice-b", first
    assert g2["outcome"] == "migrated" and g2["destination"] == "twice-c", second
    assert g2["id"] == g1["id"] and g2["tokens"] > g1["tokens"], (first, second)
    assert loads == {"twice-b": 1, "twice-c": 0}, loads  # the stream's slot moved to b with it
    after = migration_metrics(activator)
    assert after["activator_migrations_total[migrated]"] == before["activator_migrations_total[migrated]"] + 2
    for outcome in ("failed", "recovered", "stayed_on_source", "finished_on_source"):
        assert after[f"activator_migrations_total[{outcome}]"] == before[f"activator_migrations_total[{outcome}]"]
    assert after["activator_migration_seconds_count"] == before["activator_migration_seconds_count"] + 2
    assert after["activator_migration_gap_seconds_count"] == before["activator_migration_gap_seconds_count"] + 2
    deadline = time.monotonic() + 5  # the stream is over: c's slot is given back
    while (left := instance_loads(activator)) != {"twice-c": 0} and time.monotonic() < deadline:
        time.sleep(0.01)
    assert left == {"twice-c": 0}, left


def test_source_finishing_first_is_left_alone(activator, functions):
    a, b = functions
    activator.set_instances(a)
    want = reference(b, body(None, max_tokens=12))

    def too_late() -> dict:
        time.sleep(0.5)  # the 12-token generation is over by now
        activator.set_instances(b)
        return activator.migrate(a)

    (got,), result = migrating(activator, [body(None, max_tokens=12)], too_late, start_after=1)
    assert_same(got, want)
    assert all(g["outcome"] == "finished_on_source" for g in result["generations"]), result


def choices(url: str, b: dict, started: threading.Event | None = None) -> tuple[list[str], list[str], int]:
    """A streamed request with several choices: (text per index, error events and frames, [DONE]s)."""
    texts, errors, done = ["", ""], [], 0
    with httpx.stream("POST", f"{url}/v1/completions", json=b, timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("event:"):
                errors.append(line)
            elif line == "data: [DONE]":
                done += 1
            elif line.startswith("data: "):
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    errors.append(line)
                for c in chunk.get("choices", []):
                    texts[c["index"]] += c["text"]
                if started is not None and min(len(t) for t in texts) > 8:
                    started.set()
    return texts, errors, done


def test_a_request_with_several_choices_finishes_on_its_source(activator, functions):
    """Only one-choice generations migrate; a scale-down leaves a request with n = 2 where it runs,
    and its client gets both choices whole."""
    a, b = functions
    req = {**body(5, max_tokens=200), "n": 2}
    want = choices(b.url, req)
    assert want[1:] == ([], 1) and want[0][0] != want[0][1]
    activator.set_instances(a)
    started = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        streaming = pool.submit(choices, activator.url, req, started)
        assert started.wait(60)
        activator.set_instances(b)
        result = activator.migrate(a)
        got = streaming.result(timeout=120)
    assert got == want
    assert [g["outcome"] for g in result["generations"]] == ["finished_on_source"], result


def test_no_destination_is_a_clear_409(activator, functions):
    a, _ = functions
    activator.set_instances(a)
    out = Collected()
    t = threading.Thread(target=stream, args=(activator.url, body(None, 200), out, 4))
    t.start()
    assert out.started.wait(60)
    r = httpx.post(f"{activator.admin}{admin_api.MIGRATE}",
                   json={"namespace": "default", "name": MODEL, "source": "a"}, timeout=10)
    t.join(60)
    assert r.status_code == 409 and "no ready instance" in r.json()["error"]
    assert out.done == 1 and out.errors == [] and out.finish == "length"


@pytest.mark.parametrize("doc, status", [
    pytest.param({"name": MODEL, "source": "a"}, 400, id="no-namespace"),
    pytest.param({"namespace": "default", "name": MODEL, "source": 3}, 400, id="source-not-string"),
    pytest.param({"namespace": "default", "name": "nope", "source": "a"}, 404, id="unknown-service"),
    pytest.param([1], 400, id="not-an-object"),
])
def test_migrate_rejects_bad_requests(activator, functions, doc, status):
    activator.set_instances(functions[0])
    r = httpx.post(f"{activator.admin}{admin_api.MIGRATE}", json=doc, timeout=10)
    assert r.status_code == status, r.text
    assert "error" in r.json()


def test_destination_killed_mid_migration_stays_on_source(activator, functions, spare):
    a, _ = functions
    doomed = spare("doomed")
    want = reference(a, body(99))
    activator.set_instances(a)

    def kill_then_migrate() -> dict:
        activator.set_instances(a, doomed)
        doomed.kill()  # the destination dies: the prefill fails, the generation stays on a
        return activator.migrate(a, doomed)

    (got,), result = migrating(activator, [body(99)], kill_then_migrate)
    assert_same(got, want)
    assert result["generations"][0]["outcome"] == "stayed_on_source", result


def test_source_killed_between_rounds_resumes_from_delivered(endless_activator, functions, spare):
    act = endless_activator
    _, b = functions
    src = spare("src")
    # Long enough that the source cannot finish before it is killed a few rounds in.
    want = reference(b, body(5, max_tokens=480))
    act.set_instances(src)
    out = Collected()
    t = threading.Thread(target=stream, args=(act.url, body(5, max_tokens=480), out, 10))
    t.start()
    assert out.started.wait(60)
    act.set_instances(b)
    migration = kill_source_between_rounds(act, src, b)
    t.join(120)
    assert_same(out, want)
    [gen] = migration["generations"]
    assert gen["outcome"] == "recovered" and gen["destination"] == "b", migration


@pytest.mark.parametrize("seed", [pytest.param(None, id="greedy"), pytest.param(21, id="seeded")])
def test_sigterm_migrates_before_exit(activator, functions, spare, seed):
    _, b = functions
    victim = spare(f"preempted-{seed}", {"SLLM_DRAIN_URL": activator.admin, "SLLM_DRAIN_GRACE_S": "30"})
    want = reference(b, body(seed, max_tokens=400))
    activator.set_instances(victim)

    def preempt() -> dict:
        activator.set_instances(victim, b)
        victim.proc.terminate()  # SIGTERM: the instance asks the activator to drain it, then exits
        assert victim.proc.wait(40) == 0
        return {}

    (got,), _ = migrating(activator, [body(seed, max_tokens=400)], preempt)
    assert_same(got, want)
    log = victim.log_path.read_text()
    assert "drained before exit" in log and "outcomes=migrated" in log, log[-2000:]


def test_internal_token_is_sent_and_required(activator, spare, logs):
    token = {"SLLM_INTERNAL_TOKEN": "s3cret-token"}
    src, dst = spare("secured-src", token), spare("secured-dst", token)
    secured = Activator(logs, name="secured-activator", env=token)
    try:
        secured.wait_ready()
        want = reference(dst, body(11))
        # Without the token the export is refused (401): the generation stays on its source.
        activator.set_instances(src)

        def refused() -> dict:
            activator.set_instances(dst)
            return activator.migrate(src, dst)

        (got,), result = migrating(activator, [body(11)], refused)
        assert_same(got, want)
        assert result["generations"][0]["outcome"] == "stayed_on_source", result
        assert "401" in activator.log_path.read_text()
        # With the token every internal call (export, prefill, detach, resume) gets through.
        secured.set_instances(src)

        def allowed() -> dict:
            secured.set_instances(dst)
            return secured.migrate(src, dst)

        (got,), result = migrating(secured, [body(11)], allowed)
        assert_same(got, want)
        assert result["generations"][0]["outcome"] == "migrated", result
        # Refusals name what is missing, never a token: not the right one, not the one sent.
        for headers in ({}, {"authorization": "Bearer guessed-token"}):
            for url in (f"{dst.internal_url}{instance_api.GENERATIONS}", f"{secured.admin}{admin_api.STATS}"):
                r = httpx.get(url, headers=headers, timeout=5)
                assert r.status_code == 401, (url, r.text)
                assert "s3cret-token" not in r.text and "guessed-token" not in r.text, r.text
    finally:
        secured.stop()
    # Nor does any log: the activators', the instances' (every process of this session so far).
    for log in logs.iterdir():
        assert "s3cret-token" not in log.read_text(errors="replace"), log
