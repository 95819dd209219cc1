"""sim/validate.py's pure parts: log lines and a replay document into the simulator's inputs,
and the comparison against the 25% bound. Numbers are small enough to check by hand."""

from __future__ import annotations

from typing import Any

import pytest

from sim import replay_logs as rl
from sim import validate as v
from sllm_knative.placement import Tier

READY = '2026-12-06T04:04:{t}Z INFO autoscaler msg="instance ready" service=default/s0 instance={i} seconds={s}'
T0 = 1796529840.0  # 2026-12-06T04:04:00Z
PLACED = '2026-12-06T04:04:09.272Z INFO autoscaler msg=placed service=default/s0 instance={i} node=node-1 tier={tier}'
LEASE = ('2026-12-06T04:04:10.016Z INFO functions.llm msg="lease complete" service=default/s0 instance={i} '
         'source={src} bytes=200 seconds={s}')


@pytest.mark.parametrize(("line", "want"), [
    ('a=1 msg="lease complete" b=x', {"a": "1", "msg": "lease complete", "b": "x"}),
    ('msg=ready reason="a \\"q\\" b" n=2', {"msg": "ready", "reason": 'a \\"q\\" b', "n": "2"}),
    ("no fields here", {}),
])
def test_fields(line: str, want: dict[str, str]) -> None:
    assert rl.fields(line) == want


@pytest.mark.parametrize(("lines", "want"), [
    # lease and ready for one instance: one timing
    ([LEASE.format(i="a", src="dram", s=0.1), READY.format(t="10.500", i="a", s=0.5)],
     [{"instance": "a", "source": "dram", "placed": "dram", "bytes": 200, "lease_s": 0.1, "ready_s": 0.5,
       "end": T0 + 10.5}]),
    # the tier placement chose wins over the lease's source (a store load that reached DRAM first)
    ([PLACED.format(i="a", tier="remote"), LEASE.format(i="a", src="dram", s=0.1), READY.format(t="10.500", i="a", s=0.5)],
     [{"instance": "a", "source": "dram", "placed": "remote", "bytes": 200, "lease_s": 0.1, "ready_s": 0.5,
       "end": T0 + 10.5}]),
    # a lease without a ready line, a ready line without a lease: nothing
    ([LEASE.format(i="a", src="dram", s=0.1), READY.format(t="10.500", i="b", s=0.5)], []),
    # an unknown source is left out
    ([LEASE.format(i="a", src="device", s=0.1), READY.format(t="10.500", i="a", s=0.5)], []),
])
def test_instance_timings(lines: list[str], want: list[dict[str, Any]]) -> None:
    assert rl.instance_timings(lines) == want


def _o(index: int, sent: float, ttft: float, inst: str, end: float | None = None, tokens: int = 3) -> dict[str, Any]:
    return {"index": index, "sent_s": sent, "ttft_s": ttft, "instance": inst, "ok": True, "tokens": tokens,
            "end_s": sent + ttft + 0.2 if end is None else end}


@pytest.mark.parametrize(("outcomes", "warm_indices"), [
    # the first request of an instance is cold; one sent after its first token is warm
    ([_o(0, 0.0, 1.0, "a"), _o(1, 2.0, 0.1, "a")], [1]),
    # sent before the instance's first token came: still waiting for the cold start
    ([_o(0, 0.0, 1.0, "a"), _o(1, 0.5, 0.6, "a")], []),
    # another instance's first request is cold too
    ([_o(0, 0.0, 1.0, "a"), _o(1, 2.0, 0.1, "b")], []),
])
def test_warm(outcomes: list[dict[str, Any]], warm_indices: list[int]) -> None:
    assert [o["index"] for o in rl.warm(outcomes)] == warm_indices


# instance a serves 2 at a time; request 0's first token at 1.0, each later one sent after it
FULL = [_o(0, 0.0, 1.0, "a", end=10.0), _o(1, 2.0, 0.1, "a", end=5.0), _o(2, 3.0, 2.1, "a", end=8.0),
        _o(3, 6.0, 0.1, "a", end=7.0), _o(4, 9.0, 0.1, "a", end=9.5)]


@pytest.mark.parametrize(("concurrency", "warm_indices"), [
    (0, [1, 2, 3, 4]),  # no limit given: every request after the first token
    (2, [1, 4]),  # 2 was sent while 0 and 1 ran, 3 while 0 and 2 ran: each waited for a slot
    (3, [1, 2, 3, 4]),
    (1, []),  # 0 runs until 10.0: every later request shared the instance with it
])
def test_warm_leaves_out_requests_that_found_their_instance_full(concurrency: int, warm_indices: list[int]) -> None:
    assert [o["index"] for o in rl.warm(FULL, concurrency)] == warm_indices


def _doc() -> dict[str, Any]:
    shots = [{"index": i, "at_s": float(i), "service": f"s{i % 3}", "checkpoint": i % 3 % 2, "prompt_tokens": 10,
              "max_tokens": 3, "warmup": i == 0} for i in range(8)]
    sllm = [_o(i, i + 0.01, 1.0 if i < 3 else 0.1, f"s{i % 3}-1", end=i + 0.01 + (1.0 if i < 3 else 0.1) + 0.2)
            for i in range(8)]
    fresh: dict[str, Any] = {"outcomes": []}
    return {"meta": {"machine": {"cpus": 2, "time": "2026-12-06T04:10:00Z"}, "bench_seconds": 400.0},
            "setup": {"nodes": 2, "slots_per_node": 2, "container_concurrency": 4, "keep_alive_s": 6.0,
                      "max_scale": 1, "seed": 0},
            "shots": shots, "profiles": {"sllm": {"outcomes": sllm}, "knative-default": fresh},
            "rows": [{"profile": "sllm", "ttft_p50_s": 0.1, "ttft_p99_s": 1.0}]}


# three starts far apart (no sharing), and two fresh processes of the run (and one of an earlier
# run, before the run's start: meta.machine.time minus bench_seconds)
FRESH = '2026-12-06T04:{t}Z INFO functions.llm msg=ready instance={i} seconds={s} imports_s=1 load_s=1.0'
LOGS = {"sllm": [LEASE.format(i="x", src="dram", s=0.1), READY.format(t="10.000", i="x", s=0.3),
                 LEASE.format(i="y", src="remote", s=0.4), READY.format(t="20.000", i="y", s=0.6),
                 LEASE.format(i="z", src="dram", s=0.1), READY.format(t="30.000", i="z", s=0.4)],
        "knative-default": [FRESH.format(t="01:00.000", i="old", s=30.0), FRESH.format(t="05:00.000", i="f1", s=9.0),
                            FRESH.format(t="06:00.000", i="f2", s=11.0)]}


def test_measure_by_hand() -> None:
    m = v.measure(_doc(), LOGS)
    assert m.checkpoint_bytes == 200
    assert m.overhead_s == pytest.approx(0.2)  # ready - lease: 0.2, 0.2, 0.3
    # a load: ready less the overhead, per placed tier (x 0.1, z 0.2; y 0.4); no SSD load seen
    # and no loader probe: an SSD read is taken as no slower than the store
    assert m.load_s == pytest.approx({Tier.DRAM: 0.15, Tier.SSD: 0.4, Tier.REMOTE: 0.4})
    assert m.fresh_process_s == pytest.approx(9.0)  # (8 + 10) / 2; the earlier run's 29 s left out
    assert m.shared_cores == 2
    # warm requests 3..7: TTFT 0.1 over 10 prompt tokens; 0.2 s for the 2 tokens after the first
    assert m.prefill_s_per_token == pytest.approx(0.01)
    assert m.decode_step_s == pytest.approx(0.1)
    hw = v.hardware(m, "sllm")
    assert hw.prefill_s(10, 100, 1) == pytest.approx(0.1)
    assert hw.decode_step_s(100, 1) == pytest.approx(0.1)
    assert 200 / hw.achieved(Tier.DRAM) == pytest.approx(0.15)


def test_measure_needs_instance_logs() -> None:
    with pytest.raises(ValueError, match="no instance timings"):
        v.measure(_doc(), {})


def test_inputs() -> None:
    models, requests, cfg = v.inputs(_doc(), "sllm", 200)
    assert [(m.name, m.key, m.size_bytes, m.tp) for m in models] == [
        ("s0", "c0", 200, 1), ("s1", "c1", 200, 1), ("s2", "c0", 200, 1)]  # s2 shares s0's checkpoint
    assert [(r.id, r.arrival, r.model, r.prompt, r.output) for r in requests][:2] == [
        (0, 0.01, "s0", 10, 3), (1, 1.01, "s1", 10, 3)]  # arrivals: when the replay really sent them
    assert (cfg.nodes, cfg.capacity, cfg.keep_alive_s, cfg.max_scale, cfg.stable_window_s) == (2, 4, 6.0, 1, 6.0)


@pytest.mark.parametrize(("spans", "want"), [
    ([(0.0, 1.0)], [1.0]),  # alone
    ([(0.0, 1.0), (0.0, 1.0)], [2.0, 2.0]),  # side by side all along
    ([(0.0, 2.0), (1.0, 2.0)], [1.5, 2.0]),  # the second shared all of its time, the first half
    ([(0.0, 1.0), (1.0, 2.0)], [1.0, 1.0]),  # one after the other
])
def test_sharing(spans: list[tuple[float, float]], want: list[float]) -> None:
    assert rl.sharing([{"end": b, "ready_s": b - a} for a, b in spans]) == pytest.approx(want)


@pytest.mark.parametrize(("measured", "predicted", "p50", "p99", "within"), [
    ((1.0, 10.0), (1.0, 10.0), (1.0, True), (1.0, True), True),
    ((1.0, 10.0), (1.25, 7.5), (1.25, True), (0.75, True), True),  # the bound itself is within
    ((1.0, 10.0), (1.26, 10.0), (1.26, False), (1.0, True), False),
    ((1.0, 10.0), (1.0, 7.4), (1.0, True), (0.74, False), False),
    ((None, None), (1.0, 1.0), (None, False), (None, False), False),  # nothing measured: not within
])
def test_compare(measured: tuple[float | None, float | None], predicted: tuple[float, float],
                 p50: tuple[float | None, bool], p99: tuple[float | None, bool], within: bool) -> None:
    got = v.compare({"ttft_p50_s": measured[0], "ttft_p99_s": measured[1]},
                    {"ttft_p50_s": predicted[0], "ttft_p99_s": predicted[1]})
    assert (got["p50"]["ratio"], got["p50"]["within"]) == p50
    assert (got["p99"]["ratio"], got["p99"]["within"]) == p99
    assert got["within"] is within


def test_validate_skips_profiles_without_a_policy() -> None:
    doc = _doc()
    doc["rows"].append({"profile": "ray-serve", "ttft_p50_s": 1.0, "ttft_p99_s": 2.0})
    rows = {r["profile"]: r for r in v.validate(doc, LOGS)["rows"]}
    assert rows["ray-serve"] == {"profile": "ray-serve", "skipped": "no sim policy"}
    assert rows["sllm"]["policy"] == "sllm" and rows["sllm"]["unserved"] == 0


def test_pending_pod_takes_the_freed_slot_at_once() -> None:
    """Fresh-process policies: a pod waiting for a slot is scheduled the moment one frees up
    (sim.adapters.schedule_pending), not on the next tick, and before a later arrival's pod."""
    import dataclasses

    from sim.engine import Simulation
    from sim.policies import get_policy
    from sim.workload import Model, Request

    hw = dataclasses.replace(v.hardware(v.measure(_doc(), LOGS)), gpus_per_node=1)
    models = [Model(n, "replay", 100, 1) for n in ("a", "b")]
    requests = [Request(0, 0.0, "a", 10, 3), Request(1, 0.5, "b", 10, 3)]
    cfg = v.SimConfig(nodes=1, capacity=4, keep_alive_s=1.0, max_scale=1, stable_window_s=6.0)
    sim = Simulation(hw, dataclasses.replace(get_policy("knative-default"), keep_alive=True), models, requests, cfg)
    stops = _run_recording_stops(sim)
    starts = [(i, t) for kind, i, _n, _tier, t in sim.trace if kind == "start"]
    assert [i for i, _ in starts] == ["i1", "i2"]
    assert starts[1][1] == stops[0]  # b's pod started when a's instance stopped


def _sim(policy: str, models: list[Any], requests: list[Any], min_residency_s: float = 10.0, **hw_changes: Any) -> Any:
    import dataclasses

    from sim.engine import Simulation
    from sim.policies import get_policy

    hw = dataclasses.replace(v.hardware(v.measure(_doc(), LOGS)), **{"load_noise": 0.0, "compute_noise": 0.0,
                                                                      **hw_changes})
    cfg = v.SimConfig(nodes=1, capacity=4, keep_alive_s=6.0, max_scale=1, stable_window_s=6.0,
                      min_residency_s=min_residency_s)
    return Simulation(hw, dataclasses.replace(get_policy(policy), keep_alive=True), models, requests, cfg).run()


@pytest.mark.parametrize(("cores", "ttft_b"), [
    # b's load waits for a's (one loader per node): 0.4 to 0.8 s; then its start overhead 0.2 s,
    # doubled when it shares one core with a's start; then 10 prompt tokens at 0.01 s
    (0, 1.1),
    (1, 1.3),
    (2, 1.1),  # two starts on two cores: no stretch
])
def test_shared_cores_stretch_concurrent_starts(cores: int, ttft_b: float) -> None:
    from sim.workload import Model, Request

    models = [Model("a", "replay", 100, 1, checkpoint="c0"), Model("b", "replay", 100, 1, checkpoint="c1")]
    sim = _sim("sllm", models, [Request(0, 0.0, "a", 10, 3), Request(1, 0.0, "b", 10, 3)], shared_cores=cores)
    assert sim.ttfts() == pytest.approx([0.7, ttft_b])  # a: remote 0.4 + 0.2 + 0.1


@pytest.mark.parametrize(("policy", "tiers"), [
    # no DRAM tier, but a's checkpoint stays in host memory while a leases it: b loads from DRAM
    ("no-dram-tier", ["remote", "dram"]),
    ("sllm", ["remote", "dram"]),
    ("knative-default", ["remote", "remote"]),  # a fresh process reads the store every time
])
def test_a_leased_checkpoint_is_in_dram(policy: str, tiers: list[str]) -> None:
    from sim.workload import Model, Request

    models = [Model("a", "replay", 100, 1, checkpoint="c0"), Model("b", "replay", 100, 1, checkpoint="c0")]
    sim = _sim(policy, models, [Request(0, 0.0, "a", 10, 3), Request(1, 3.0, "b", 10, 3)])
    assert [t for kind, _i, _n, t, _at in sim.trace if kind == "start"] == tiers


def test_the_keep_alive_ends_between_ticks() -> None:
    """a's only request is done at 0.4 + 0.2 + 0.1 + 27 steps of 0.1 = 3.4 s. The activator's
    report at 4 s (the average over the second before it, 0.4) is the last with load; the
    autoscaler records it in second 4, which counts to its end: idle from 5 s, and the keep-alive
    (6 s) runs out at 11 s, between two ticks: the scaler decides again then (the decision's
    `recheck_in_s`, as the autoscaler does, RECHECK_LATE_S past it), not at its next tick (12 s)."""
    import dataclasses

    from sim.engine import Simulation
    from sim.policies import get_policy
    from sim.workload import Model, Request
    from sllm_knative.config import RECHECK_LATE_S

    stopped_at = 11.0 + RECHECK_LATE_S
    hw = dataclasses.replace(v.hardware(v.measure(_doc(), LOGS)), load_noise=0.0, compute_noise=0.0)
    cfg = v.SimConfig(nodes=1, capacity=4, keep_alive_s=6.0, max_scale=1, stable_window_s=6.0)
    sim = Simulation(hw, get_policy("sllm"), [Model("a", "replay", 100, 1)], [Request(0, 0.0, "a", 10, 28)], cfg)
    stops = _run_recording_stops(sim)
    assert stops == [pytest.approx(stopped_at)]


def test_the_replays_fresh_process_controller_counts_idle_time_from_the_last_requests_end() -> None:
    """The same request under `kpa_stand_in` (the validation's knative-default and
    kserve-localcache): bench/replay_profiles.FreshController stops the instance 6 s after the
    request ended (2.6 s), not after the autoscaler's last busy second ended (4 s)."""
    import dataclasses

    from sim.engine import Simulation
    from sim.policies import get_policy
    from sim.workload import Model, Request

    hw = dataclasses.replace(v.hardware(v.measure(_doc(), LOGS)), load_noise=0.0, compute_noise=0.0)
    cfg = v.SimConfig(nodes=1, capacity=4, keep_alive_s=6.0, max_scale=1, stable_window_s=6.0, kpa_stand_in=True)
    policy = dataclasses.replace(get_policy("sllm"), keep_alive=True)
    sim = Simulation(hw, policy, [Model("a", "replay", 100, 1)], [Request(0, 0.0, "a", 10, 20)], cfg)
    assert _run_recording_stops(sim) == [pytest.approx(8.6)]


@pytest.mark.parametrize(("waiting", "running", "live", "last", "want"), [
    pytest.param(1, 0, 0, None, (1, None), id="a-request-waits-at-zero"),
    pytest.param(0, 1, 1, 5.0, (1, None), id="a-request-runs"),
    pytest.param(0, 0, 1, 8.0, (1, 4.0), id="idle-for-2s-of-6"),
    pytest.param(0, 0, 1, 4.0, (0, None), id="idle-for-6s"),
    pytest.param(0, 0, 0, 8.0, (0, None), id="nothing-to-keep"),
])
def test_stand_in(waiting: int, running: int, live: int, last: float | None, want: tuple[int, float | None]) -> None:
    from types import SimpleNamespace

    from sim.adapters import stand_in

    inst = SimpleNamespace(running={"r": object()} if running else {})
    svc = SimpleNamespace(waiting=[object()] * waiting, instances=[inst] if live else [], last_end_at=last)
    desired, left = stand_in(svc, live, 10.0, 6.0)  # type: ignore[arg-type]
    assert (desired, None if left is None else pytest.approx(left)) == want


@pytest.mark.parametrize(("extras", "want"), [
    # instance x (ready 0.3 s after placement), y (0.6 s), z (0.4 s): each one's first request
    # took ready + prefill (10 tokens at 0.01 s) + extra; the median extra under TICK_S / 2 counts
    ((0.05, 0.07, 0.09), 0.07),
    ((0.05, 0.07, 1.5), 0.06),  # z's first request waited 1.5 s for a slot: left out
    ((-0.2, 1.5, 3.0), 0.0),  # none under a tick's half: no activation term
])
def test_activation(extras: tuple[float, float, float], want: float) -> None:
    doc = _doc()
    outs = doc["profiles"]["sllm"]["outcomes"]
    for k, (inst, ready, extra) in enumerate(zip("xyz", (0.3, 0.6, 0.4), extras, strict=True)):
        outs.append(_o(10 + k, 20.0 + 10 * k, ready + 0.1 + extra, inst))
        doc["shots"].append({**doc["shots"][3], "index": 10 + k})
    assert v.measure(doc, LOGS).activation_s == pytest.approx(want)


@pytest.mark.parametrize(("fresh_extras", "fresh_want", "pooled"), [
    # the fresh processes' first requests came 0.5 and 0.6 s after ready, sllm's 0.05-0.09 s:
    # each profile takes its own median; the pooled one (of five) stays for any other
    ((0.5, 0.6), 0.55, 0.09),
    ((0.5,), None, 0.08),  # one cold start of its own is no median: the pooled one (of four)
])
def test_activation_per_profile(fresh_extras: tuple[float, ...], fresh_want: float | None, pooled: float) -> None:
    doc = _doc()
    outs = doc["profiles"]["sllm"]["outcomes"]
    for k, (inst, ready, extra) in enumerate(zip("xyz", (0.3, 0.6, 0.4), (0.05, 0.07, 0.09), strict=True)):
        outs.append(_o(10 + k, 20.0 + 10 * k, ready + 0.1 + extra, inst))
        doc["shots"].append({**doc["shots"][3], "index": 10 + k})
    fresh = doc["profiles"]["knative-default"]
    fresh["cold_starts"] = []
    for k, extra in enumerate(fresh_extras):
        fresh["cold_starts"].append({"instance": f"f{k}", "ready_s": 8.0, "load_s": 0.5})
        fresh["outcomes"].append(_o(20 + k, 50.0 + 20 * k, 8.0 + 0.1 + extra, f"f{k}"))
        doc["shots"].append({**doc["shots"][3], "index": 20 + k})
    m = v.measure(doc, LOGS)
    assert m.activation_s == pytest.approx(pooled)
    assert m.activation.get("sllm") == pytest.approx(0.07)
    assert m.activation.get("knative-default") == (None if fresh_want is None else pytest.approx(fresh_want))
    assert v.hardware(m, "sllm").activation_s == pytest.approx(0.07)
    assert v.hardware(m, "knative-default").activation_s == pytest.approx(fresh_want or pooled)
    assert v.hardware(m).activation_s == pytest.approx(pooled)


def test_activation_delays_a_cold_start() -> None:
    from sim.workload import Model, Request

    models = [Model("a", "replay", 100, 1, checkpoint="c0")]
    sim = _sim("sllm", models, [Request(0, 0.0, "a", 10, 3)], activation_s=0.5)
    assert sim.ttfts() == pytest.approx([1.2])  # remote 0.4 + start 0.2 + activation 0.5 + prefill 0.1


@pytest.mark.parametrize(("lines", "want"), [
    (['x INFO loader_sidecar.profile msg="bandwidth measured" hop=disk_read bytes=100 seconds=0.5 gbps=0.0'],
     {"disk_read": 200.0}),
    (['a msg="bandwidth measured" hop=dram_map bytes=100 seconds=0.1',
      'b msg="bandwidth measured" hop=dram_map bytes=100 seconds=0.3',
      'c msg="bandwidth measured" hop=dram_map bytes=100 seconds=0.2'], {"dram_map": 500.0}),  # the median
    (['msg="bandwidth measured" hop=disk_read bytes=100 seconds=0', "unrelated line"], {}),
])
def test_probe(lines: list[str], want: dict[str, float]) -> None:
    assert rl.probe(lines) == pytest.approx(want)


def _run_recording_stops(sim: Any) -> list[float]:
    """Run `sim`, returning the simulated times at which it stopped an instance."""
    stops: list[float] = []
    stop = sim.stop

    def recording_stop(inst: Any) -> None:
        stops.append(sim.now)
        stop(inst)

    sim.stop = recording_stop
    sim.run()
    return stops


@pytest.mark.parametrize(("serial", "ttfts"), [
    # three requests wait for a's cold start (remote 0.4 + start 0.2), then 10 prompt tokens each
    # at 0.01 s: side by side (a GPU's batch) or one after another (one CPU thread per instance)
    (False, [0.7, 0.7, 0.7]),
    (True, [0.7, 0.8, 0.9]),
])
def test_serial_prefill(serial: bool, ttfts: list[float]) -> None:
    from sim.workload import Model, Request

    models = [Model("a", "replay", 100, 1, checkpoint="c0")]
    sim = _sim("sllm", models, [Request(i, 0.0, "a", 10, 3) for i in range(3)], serial_prefill=serial)
    assert sim.ttfts() == pytest.approx(ttfts)


@pytest.mark.parametrize(("policy", "factor", "ttft"), [
    ("knative-default", 1.0, 9.5),  # the store 0.4 + fresh process 9.0 + prefill 0.1
    ("knative-default", 3.0, 10.3),  # its own read of the store takes 3x the loader's: 1.2
    ("sllm", 3.0, 0.7),  # the loader's own loads are not a fresh process's: remote 0.4 + 0.2 + 0.1
])
def test_fresh_load_factor_slows_fresh_loads_only(policy: str, factor: float, ttft: float) -> None:
    from sim.workload import Model, Request

    sim = _sim(policy, [Model("a", "replay", 100, 1, checkpoint="c0")], [Request(0, 0.0, "a", 10, 3)],
               fresh_load_factor=factor)
    assert sim.ttfts() == pytest.approx([ttft])


@pytest.mark.parametrize(("profile", "cold_loads", "want"), [
    ("knative-default", [1.0, 1.2, 1.6], 3.0),  # median 1.2 s against the loader's 0.4 s from the store
    ("knative-default", [], 1.0),  # no fresh load recorded: as the loader's
    ("sllm", [1.2], 1.0),  # not a fresh-process profile
])
def test_fresh_load_factor_measured(profile: str, cold_loads: list[float], want: float) -> None:
    doc = _doc()
    doc["profiles"]["knative-default"]["cold_starts"] = [{"instance": f"f{k}", "load_s": s, "ready_s": 9.0 + s}
                                                         for k, s in enumerate(cold_loads)]
    m = v.measure(doc, LOGS)
    assert v.fresh_load_factor(m, profile) == pytest.approx(want)
    assert v.hardware(m, profile).fresh_load_factor == pytest.approx(want)


PREEMPTING = ('2026-12-06T13:06:{t}Z INFO autoscaler msg=preempting service=default/{s} checkpoint=file:///c1 '
              'action={a} node=node-1 victim=s0-6 fair_share=False reason="evict on node-1: 0.30s (no free slot)"')
STARTING = ('2026-12-06T13:06:{t}Z INFO autoscaler.backend msg="instance starting" service=default/{s} '
            'checkpoint=file:///c1 instance={s}-10 node=node-1 pid=24092 tier=dram')


@pytest.mark.parametrize(("lines", "want"), [
    ([PREEMPTING.format(t="37.094", s="s1", a="evict"), STARTING.format(t="37.659", s="s1")], [0.565]),
    # s2's instance starts without an eviction; s1's eviction is paired with s1's start only
    ([PREEMPTING.format(t="37.000", s="s1", a="evict"), STARTING.format(t="37.200", s="s2"),
      STARTING.format(t="37.500", s="s1")], [0.5]),
    ([PREEMPTING.format(t="37.000", s="s1", a="migrate"), STARTING.format(t="39.000", s="s1")], []),  # not an eviction
    ([STARTING.format(t="37.659", s="s1")], []),
])
def test_stop_times(lines: list[str], want: list[float]) -> None:
    assert rl.stop_times(lines) == pytest.approx(want)


@pytest.mark.parametrize("stop", [0.0, 0.1, 0.5])
def test_an_eviction_waits_for_the_victims_stop(stop: float) -> None:
    """Two services hold the node's two slots, idle (no minimum residency protects them); a third
    arrives and evicts one of them, and the calibrating policy learns the stop time. The third
    one's checkpoint comes from the store, warmed at the decision: its fill into DRAM runs
    during the stop, and only the last hop (DRAM to device) waits for the slot, so the stop
    delays its first token by the part of it the fill does not cover. (The evicted service,
    still wanted by its decider until its keep-alive ends, then takes a slot back the same way.)"""
    from sim.workload import Model, Request
    from sllm_knative.placement import Tier

    models = [Model(n, "replay", 100, 1, checkpoint=f"c{k}") for k, n in enumerate("abc")]
    requests = [Request(0, 0.0, "a", 10, 3), Request(1, 0.0, "b", 10, 3), Request(2, 3.0, "c", 10, 3)]
    sim = _sim("sllm", models, requests, min_residency_s=0.0, stop_s=stop)
    base = _sim("sllm", models, requests, min_residency_s=0.0)
    assert sim.stats.evictions >= 1 and base.stats.evictions >= 1
    assert [t[3] for t in sim.trace][:3] == ["remote"] * 3
    size = sim.models["c"].size_bytes
    fill = size / min(sim.actual[Tier.REMOTE], sim.actual[Tier.DRAM]) - size / sim.actual[Tier.DRAM]
    assert 0.1 < fill < 0.5  # so that one stop is hidden by the fill and the other is not
    assert sim.ttfts()[:2] == pytest.approx(base.ttfts()[:2])
    assert sim.ttfts()[2] == pytest.approx(base.ttfts()[2] + max(0.0, stop - fill))
    assert sim.calibration.stop_s == (pytest.approx(stop) if stop else None)


@pytest.mark.parametrize(("n", "q", "want"), [
    (39, 0.5, (13, 27)),  # the tables' 95% ranks for a median of 39
    (100, 0.5, (40, 61)),
    (39, 0.99, (37, 39)),  # no rank above the largest: clipped to n
    (5, 0.5, (1, 5)),  # too few to leave out 2.5% on either side: the whole sample
    (1, 0.5, (1, 1)),
])
def test_rank_band(n: int, q: float, want: tuple[int, int]) -> None:
    assert v.rank_band(n, q) == want


@pytest.mark.parametrize(("n", "q"), [(0, 0.5), (10, 0.0), (10, 1.0)])
def test_rank_band_refuses(n: int, q: float) -> None:
    with pytest.raises(ValueError, match="rank_band"):
        v.rank_band(n, q)


@pytest.mark.parametrize(("predicted", "within", "within_band"), [
    (0.032, True, True),
    (0.5, False, True),  # far from the point, inside the band: the sample cannot tell
    (2.0 * 1.25, False, True),  # the band's top, widened by the tolerance, is in
    (2.0 * 1.26, False, False),
    (0.01 * 0.74, False, False),
])
def test_compare_with_a_band(predicted: float, within: bool, within_band: bool) -> None:
    got = v.compare({"ttft_p50_s": 0.032, "ttft_p99_s": 5.0}, {"ttft_p50_s": predicted, "ttft_p99_s": 5.0},
                    {"p50": (0.01, 2.0)})
    assert (got["p50"]["within"], got["p50"]["within_band"]) == (within, within_band)
    assert "band_s" not in got["p99"]  # no band given for it


def test_band_of_a_sample() -> None:
    xs = [float(k) for k in range(39, 0, -1)]  # 1..39, unsorted
    assert v.band(xs, 0.5) == (13.0, 27.0)
    assert v.band(xs, 0.99) == (37.0, 39.0)


@pytest.mark.parametrize(("arrivals", "want", "start_cores"), [
    # 4 fresh processes of 2 s of start work each on 2 cores (2 nodes x 2 slots). All at once:
    # each runs at half speed, all are done at 4 s (stretched by the starts in progress when
    # each began, they were done at 2, 2, 3 and 4 s).
    pytest.param((0.0, 0.0, 0.0, 0.0), [4.0, 4.0, 4.0, 4.0], 0.0, id="four-at-once"),
    # one alone for 1 s (1 s of work left), then three join: 4 share 2 cores at half speed; the
    # first is done 2 s later (3 s), when the other three have 1 s left each: 3 s of work on 2
    # cores, 1.5 s more (4.5 s)
    pytest.param((0.0, 1.0, 1.0, 1.0), [3.0, 4.5, 4.5, 4.5], 0.0, id="three-join-one"),
    pytest.param((0.0, 5.0, 10.0, 15.0), [2.0, 7.0, 12.0, 17.0], 0.0, id="one-at-a-time-alone"),
    # the starts get 1 core in effect (start_cores) of the 2: all at once, 8 s of work at 1 s a second
    pytest.param((0.0, 0.0, 0.0, 0.0), [8.0, 8.0, 8.0, 8.0], 1.0, id="four-at-once-on-one-core"),
    # one alone, at full speed; the second alone for 1 s, then both at half speed: the second's
    # last second takes 2 (done at 8), the third has 1 s left then and runs alone (9)
    pytest.param((0.0, 5.0, 6.0, 15.0), [2.0, 8.0, 9.0, 17.0], 1.0, id="a-pair-on-one-core"),
])
def test_fresh_starts_share_the_cores(arrivals: tuple[float, ...], want: list[float], start_cores: float) -> None:
    """Processor sharing of the fresh processes' start work on this machine's cores (the
    validation's knative-default and kserve-localcache), or on `start_cores` of them where
    set: when each one's work is done."""
    import dataclasses

    from sim.engine import Simulation
    from sim.policies import get_policy
    from sim.workload import Model, Request

    hw = dataclasses.replace(v.hardware(v.measure(_doc(), LOGS)), load_noise=0.0, compute_noise=0.0,
                             fresh_process_s=2.0, shared_cores=2, start_cores=start_cores)
    cfg = v.SimConfig(nodes=2, capacity=4, keep_alive_s=60.0, max_scale=1, stable_window_s=6.0, kpa_stand_in=True)
    policy = dataclasses.replace(get_policy("knative-default"), keep_alive=True)
    models = [Model(m, "replay", 100, 1) for m in "abcd"]
    requests = [Request(k, t, m, 10, 2) for k, (t, m) in enumerate(zip(arrivals, "abcd", strict=True))]
    sim = Simulation(hw, policy, models, requests, cfg)
    done: list[float] = []
    shared = sim._shared

    def record(inst: object, gen: object) -> None:
        n = len(sim.work_left)
        shared(inst, gen)
        if len(sim.work_left) < n:
            done.append(sim.now)

    sim._shared = record  # type: ignore[method-assign]
    sim.run()
    assert sorted(done) == [pytest.approx(w) for w in want]


def _timings(instances: dict[str, float], lease_s: float = 0.1, source: str = "dram", at: int = 10) -> list[str]:
    """LEASE and READY lines for instances (name -> placement-to-ready seconds), ready 5 s apart from `at`."""
    lines = []
    for k, (name, ready_s) in enumerate(instances.items()):
        lines += [LEASE.format(i=name, src=source, s=lease_s), READY.format(t=f"{at + 5 * k:02d}.000", i=name, s=ready_s)]
    return lines


def test_each_profile_measures_its_activation_on_its_own_instances() -> None:
    """Every profile's cluster names its instances s0-1, s1-1, ... again: a first request's
    activation (TTFT - placement-to-ready - prefill) must use its own profile's instance. Here
    s0-1 and s1-1 were ready after 0.5 s under sllm and 0.8 s under no-migration, and both
    profiles' first requests took 1.0 s with a 0.1 s prefill: 0.4 and 0.1 s."""
    doc = _doc()
    doc["profiles"]["no-migration"] = {"outcomes": [dict(o) for o in doc["profiles"]["sllm"]["outcomes"]]}
    remote = _timings({"r": 0.6}, lease_s=0.4, source="remote", at=40)  # every run has a store load
    logs = {**LOGS, "sllm": _timings({"s0-1": 0.5, "s1-1": 0.5}) + remote,
            "no-migration": _timings({"s0-1": 0.8, "s1-1": 0.8}) + remote}
    m = v.measure(doc, logs)
    assert m.activation["sllm"] == pytest.approx(0.4)
    assert m.activation["no-migration"] == pytest.approx(0.1)


@pytest.mark.parametrize(("leases", "want"), [
    # five DRAM leases around 0.1 s: DRAM has its own spread; one remote lease is too few
    ({"dram": [0.1, 0.1, 0.1, 0.2, 0.2], "remote": [0.4]}, {Tier.DRAM: 0.3396}),  # pstdev(0, 0, 0, ln 2, ln 2)
    ({"dram": [0.1, 0.1, 0.1, 0.1], "remote": [0.4]}, {}),  # four: none
])
def test_each_tier_with_enough_loads_has_its_own_spread(leases: dict[str, list[float]],
                                                       want: dict[Tier, float]) -> None:
    lines: list[str] = []
    k = 0
    for source, times in leases.items():
        for s in times:
            lines += _timings({f"i{k}": s + 0.2}, lease_s=s, source=source, at=10 + 5 * k)
            k += 1
    m = v.measure(_doc(), {**LOGS, "sllm": lines})
    assert m.load_sigma_by_tier == pytest.approx(want, abs=1e-4)
    assert v.hardware(m).tier_noise == pytest.approx(want, abs=1e-4)


@pytest.mark.parametrize(("tier_noise", "exact"), [
    ({}, False),  # every tier takes load_noise: the store load is drawn
    ({Tier.REMOTE: 0.0}, True),  # the store's own spread, none here
])
def test_a_tiers_own_noise_replaces_the_pooled_one(tier_noise: dict[Tier, float], exact: bool) -> None:
    from sim.workload import Model, Request

    models = [Model("a", "replay", 100, 1)]
    requests = [Request(0, 0.0, "a", 10, 3)]
    base = _sim("sllm", models, requests)
    noisy = _sim("sllm", models, requests, load_noise=0.5, tier_noise=tier_noise)
    assert (noisy.ttfts() == base.ttfts()) is exact


def test_fresh_processes_importing_slow_a_warm_prefill_on_the_shared_cores() -> None:
    """knative-default on 2 shared cores: a's warm request at 12.0 s prefills alone (0.1 s); b's
    and c's fresh processes start importing at 12.5 s, so a's request at 13.0 s shares the 2
    cores with two imports: its prefill takes 3/2 as long."""
    from sim.workload import Model, Request

    models = [Model(n, "replay", 100, 1, checkpoint=f"c{k}") for k, n in enumerate("abc")]
    requests = [Request(0, 0.0, "a", 10, 3), Request(1, 12.0, "a", 10, 3), Request(2, 12.5, "b", 10, 3),
                Request(3, 12.5, "c", 10, 3), Request(4, 13.0, "a", 10, 3)]
    sim = _sim("knative-default", models, requests, gpus_per_node=3)
    t = sim.ttfts()
    assert t[1] == pytest.approx(0.1)
    assert t[4] == pytest.approx(0.15)


def _spans(*spans: tuple[float, float], load: float = 0.5) -> list[dict[str, float]]:
    """Fresh-process timings that worked from `a` to `b` and then loaded for `load` seconds."""
    return [{"end": b + load, "ready_s": b + load - a, "load_s": load} for a, b in spans]


@pytest.mark.parametrize(("spans", "cores", "want"), [
    pytest.param(_spans((0.0, 2.0)), 2.0, [2.0], id="alone"),
    pytest.param(_spans((0.0, 2.0), (0.0, 2.0)), 2.0, [2.0, 2.0], id="two-on-two-cores"),
    pytest.param(_spans((0.0, 4.0), (0.0, 4.0)), 1.0, [2.0, 2.0], id="two-on-one-core"),
    # the second overlaps the first's last second: 3 + 0.5 and 0.5 + 2
    pytest.param(_spans((0.0, 4.0), (3.0, 6.0)), 1.0, [3.5, 2.5], id="overlapping-by-one-second"),
    pytest.param(_spans((0.0, 4.0), (0.0, 4.0), (0.0, 4.0)), 1.5, [2.0, 2.0, 2.0], id="three-on-one-and-a-half"),
])
def test_shared_work_is_each_start_s_share_of_the_cores(spans: list[dict[str, float]], cores: float,
                                                       want: list[float]) -> None:
    assert rl.shared_work(spans, "load_s", cores) == [pytest.approx(w) for w in want]


@pytest.mark.parametrize(("spans", "want"), [
    # 2 s of work each: alone at 0 and 10; a pair that took 3 s each (on 4/3 cores); a trio 4 s
    pytest.param(_spans((0.0, 2.0), (10.0, 12.0), (20.0, 23.0), (20.0, 23.0)), 1.35, id="a-pair-on-4/3-cores"),
    pytest.param(_spans((0.0, 2.0), (10.0, 12.0), (20.0, 22.0), (20.0, 22.0)), 2.0, id="a-pair-on-both"),
    pytest.param(_spans((0.0, 2.0), (10.0, 12.0), (20.0, 24.0), (20.0, 24.0)), 1.0, id="a-pair-on-one"),
    pytest.param(_spans((0.0, 2.0), (10.0, 12.0)), 2.0, id="never-together"),
    pytest.param([], 2.0, id="none"),
])
def test_start_cores_is_the_share_under_which_the_starts_work_alike(spans: list[dict[str, float]],
                                                                    want: float) -> None:
    assert rl.start_cores([spans], "load_s", 2) == pytest.approx(want, abs=0.03)
