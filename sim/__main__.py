"""`python -m sim`: run the cluster simulator.

    python -m sim run   --policy sllm,knative-default --hardware h100x8 --nodes 100 --models 100 --rate 10
    python -m sim sweep --policy sllm,locality-blind --rates 0.5,1,2,4 --out out/sim-sweep
    python -m sim study --out out/sim-study          # the paper's scheduler study (docs/evaluation.md)
    python -m sim validate --replay out/replay/replay.json --out out/sim-validate   # against a real replay

`run` prints one summary per policy (and writes it as JSON with --out); `sweep` and `study`
write `sweep.json` and `ttft_vs_load.png` under --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path

from sim.policies import POLICIES, STUDY, get_policy
from sim.runner import Scenario, plot_sweep, simulate, sweep

#: The scheduler study's setting (docs/evaluation.md, "The scheduler study").
STUDY_SCENARIO = Scenario(policy="sllm", hardware="h100x8", nodes=4, models=64, duration_s=1200.0, zipf=1.0, seed=0,
                          kinds="llama-3.1-8b")
STUDY_RATES = (1.0, 2.0, 4.0, 6.0, 8.0, 12.0)


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _policies(text: str) -> list[str]:
    names = [x for x in text.split(",") if x]
    for n in names:
        try:
            get_policy(n)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return names


def _scenario_args(p: argparse.ArgumentParser, base: Scenario) -> None:
    p.add_argument("--hardware", default=base.hardware, help="h100x8, h200x8, this-machine, or a profile .json")
    p.add_argument("--nodes", type=int, default=base.nodes)
    p.add_argument("--models", type=int, default=base.models)
    p.add_argument("--duration", type=float, default=base.duration_s, help="simulated seconds of arrivals")
    p.add_argument("--zipf", type=float, default=base.zipf, help="model popularity exponent")
    p.add_argument("--seed", type=int, default=base.seed)
    p.add_argument("--capacity", type=int, default=base.capacity, help="generations an instance serves at once")
    p.add_argument("--keep-alive", type=float, default=base.keep_alive_s)
    p.add_argument("--kinds", default=base.kinds, help="comma-separated model kinds (sim/workload.py SIZES); "
                   "default: the whole mix")
    p.add_argument("--trace", default=base.trace)


def _scenario(a: argparse.Namespace, base: Scenario) -> Scenario:
    return dataclasses.replace(base, hardware=a.hardware, nodes=a.nodes, models=a.models, duration_s=a.duration,
                               zipf=a.zipf, seed=a.seed, capacity=a.capacity, keep_alive_s=a.keep_alive,
                               kinds=a.kinds, trace=a.trace)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sim", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="one rate, one or more policies")
    run.add_argument("--policy", type=_policies, default=["sllm"], help=f"comma-separated: {', '.join(POLICIES)}")
    run.add_argument("--rate", type=float, default=1.0, help="times the trace's request rate")
    _scenario_args(run, Scenario())
    run.add_argument("--out", type=Path, help="write summaries.json here")
    sw = sub.add_parser("sweep", help="policies x rates: JSON and a plot")
    sw.add_argument("--policy", type=_policies, default=list(STUDY))
    sw.add_argument("--rates", type=_floats, default=list(STUDY_RATES))
    _scenario_args(sw, STUDY_SCENARIO)
    sw.add_argument("--out", type=Path, required=True)
    st = sub.add_parser("study", help="the paper's scheduler study on the 8-GPU H100 profile")
    st.add_argument("--rates", type=_floats, default=list(STUDY_RATES))
    _scenario_args(st, STUDY_SCENARIO)
    st.add_argument("--out", type=Path, required=True)
    va = sub.add_parser("validate", help="predict a bench/replay.py run's p50/p99 TTFT per profile (sim/validate.py)")
    va.add_argument("--replay", type=Path, required=True, help="a replay.json (its replay-logs/ beside it)")
    va.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)

    def log(line: str) -> None:
        print(line, flush=True)

    try:
        if a.cmd == "validate":
            return _validate(a.replay, a.out, log)
        if a.cmd == "run":
            base = _scenario(a, Scenario())
            rows = [simulate(dataclasses.replace(base, policy=p, rate=a.rate)) for p in a.policy]
            for r in rows:
                print(json.dumps({k: v for k, v in r.items() if k != "scenario"}))
            if a.out:
                a.out.mkdir(parents=True, exist_ok=True)
                (a.out / "summaries.json").write_text(json.dumps(rows, indent=1))
            return 0
        base = _scenario(a, STUDY_SCENARIO)
        policies = list(STUDY) if a.cmd == "study" else a.policy
        rows = sweep(base, policies, a.rates, log=log)
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "sweep.json").write_text(json.dumps({"command": " ".join(["python -m sim", *sys.argv[1:]]),
                                                      "rows": rows}, indent=1))
        title = (f"{base.hardware}: {base.nodes} nodes x {rows[0]['gpus'] // base.nodes} GPUs, {base.models} models, "
                 f"zipf {base.zipf}, {base.duration_s:g} s, seed {base.seed}")
        for p in plot_sweep(rows, a.out, title):
            log(f"wrote {p}")
        log(f"wrote {a.out / 'sweep.json'}")
        return 0
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _validate(replay: Path, out: Path, log: Callable[[str], None]) -> int:
    from sim import validate
    from sim.replay_logs import logs_of

    try:
        doc = json.loads(replay.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{replay}: cannot read a replay document: {e}") from None
    logs = logs_of(replay)
    result = validate.validate(doc, logs)
    result["command"] = " ".join(["python -m sim", *sys.argv[1:]])
    out.mkdir(parents=True, exist_ok=True)
    (out / "validate.json").write_text(json.dumps(result, indent=1))
    profile = validate.profile_document(validate.hardware(validate.measure(doc, logs)))
    (out / "this-machine-measured.json").write_text(json.dumps({**profile, "name": "this-machine-measured"}, indent=1))
    for r in result["rows"]:
        if "p50" not in r:
            log(f"{r['profile']:18s} skipped: {r['skipped']}")
            continue
        log(f"{r['profile']:18s} " + "  ".join(
            f"{q} measured {r[q]['measured_s']:.3f} s predicted {r[q]['predicted_s']:.3f} s x{r[q]['ratio']}"
            f" {'ok' if r[q]['within'] else 'MISS'}"
            + (f" (measured 95% band {r[q]['band_s'][0]:.3f}-{r[q]['band_s'][1]:.3f} s:"
               f" {'in' if r[q]['within_band'] else 'out'})" if "band_s" in r[q] else "")
            for q in ("p50", "p99")))
    log(f"wrote {validate.plot(result, out, f'simulator vs {replay}')}")
    log(f"wrote {out / 'validate.json'} and {out / 'this-machine-measured.json'} (--hardware)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
