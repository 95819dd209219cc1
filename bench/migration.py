"""Live migration of a streaming generation through the activator: handoff gap, cost, restart.

    .venv/bin/python -m bench.migration --out DIR [--runs 3] [--contexts 256,1024,2048]
                                        [--before 32] [--after 2000] [--work DIR]
                                        [--model-bytes 200000000] [--gap N] [--numerics exact|fast]
                                        [--device cpu|cuda|cuda:N]

writes DIR/migration.json and DIR/migration.png. It builds a random-weight float32 Llama of
about `--model-bytes` (default 200 MB: hidden 1024, vocabulary 4096, max_position_embeddings
4096; a decode step of 15-21 ms on 2 CPU cores, in the range of a real LLM's; 0: the TINY
shape, about 1 ms a step, where the handoff's internal calls alone are several steps), starts
two real `python -m functions.llm` instances (a, b; exact numerics, the CPU default;
`--max-model-len 4096`) and `python -m activator`, and registers a then b on the activator's
admin API the way the autoscaler does.

One run at context N: a streaming greedy completion (logprobs=1, ignore_eos) whose prompt is
`N - before` random token ids goes through the activator to a; once the client has `before`
generated tokens, b becomes the service's only ready instance and `POST /admin/v1/migrate
{source: a, destination: b}` is called. The context at the detach is the result's `tokens`
(prompt + generated, above N: a keeps generating while b
prefills; `--after` is long enough that a does not finish first). The vs_restart rows are keyed
by N, the context when the migration is triggered; their restart_s resends the detach context.

  handoff_gap   per run: the largest gap between consecutive token-carrying frames that
                overlaps the migrate call (from the call until the first frame after it
                returned), over the median gap of the same stream outside that window; and the
                splice gap alone (the source's last token frame to the destination's first).
                Reported per context (median over runs) and the maximum over all runs.

`--gap` sets the activator's `--migration-gap`; `--numerics` the instances' numerics (exact by
default on every device: the token-identical handoff); `--device` where both instances compute
(`functions.llm --device`, default cpu), recorded in the JSON.
  cost_fit      `seconds = a * tokens + b` (sllm_knative.placement.fit_migration_cost, a, b >= 0)
                over every run's (tokens, seconds) from the migrate result.
  vs_restart    migration_s: median of the migrate results' `seconds` at that context.
                restart_s: what a client waits if the request is instead restarted on another
                instance that resends the context: a new streaming request through the
                activator to b (warm process, no cached prefix) whose prompt is the original
                prompt ids plus the generated text re-tokenized, cut or padded to exactly the
                migrated `tokens`, with max_tokens=1; time from sending it to its first token
                frame (a prefill of the whole context). Also recorded (not in the row):
                regen_s, the time a from-scratch restart of the original prompt takes to
                re-deliver the tokens the client already had (its `generated`-th token).

Each context is run `--runs` times (median of 3 by default: the machine has 2 shared cores),
after one discarded warm-up run. Every process is stopped on exit.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench._common import exit_on_sigterm, machine, save_figure, write_json
from sllm_knative.api import activator as activator_api
from sllm_knative.log import get_logger, setup
from sllm_knative.placement.calibration import MigrationCost, MigrationObservation, fit_migration_cost
from sllm_knative.ports import free_port
from testkit.proc import Proc

REPO = Path(__file__).resolve().parents[1]
MODEL = "bench"
MAX_LEN = 4096
TARGET_RATIO = 3.0
log = get_logger("bench.migration")


class Process(Proc):
    """A child process on loopback ports, logging to logs/NAME.log, stopped with SIGTERM then SIGKILL."""

    def __init__(self, name: str, args: list[str], logs: Path, ready_url: str, env: dict[str, str]) -> None:
        super().__init__(name)
        self.ready_url = ready_url
        self.start([sys.executable, *args], logs / f"{name}.log", env=env)

    def wait_ready(self, timeout: float = 120.0) -> None:
        self.wait_http(self.ready_url, timeout)


class Function(Process):
    def __init__(self, name: str, model_dir: Path, logs: Path, numerics: str, device: str = "cpu") -> None:
        self.id = name
        port, internal = free_port(), free_port()
        self.url, self.internal_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{internal}"
        super().__init__(name, ["-m", "functions.llm", "--model", str(model_dir), "--served-model-name", MODEL,
                                "--host", "127.0.0.1", "--internal-host", "127.0.0.1", "--port", str(port),
                                "--internal-port", str(internal), "--max-model-len", str(MAX_LEN),
                                "--max-concurrency", "4", "--numerics", numerics, "--device", device],
                         logs, f"{self.url}/health/ready", {"SLLM_INSTANCE": name})

    def endpoint(self) -> dict[str, str]:
        return {"id": self.id, "url": self.url, "internal_url": self.internal_url}


class Activator(Process):
    def __init__(self, logs: Path, extra: list[str]) -> None:
        port, admin = free_port(), free_port()
        self.url, self.admin = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin}"
        super().__init__("activator", ["-m", "activator", "--port", str(port), "--admin-port", str(admin), *extra],
                         logs, f"{self.admin}{activator_api.STATS}", {})

    def set_instances(self, *fns: Function) -> None:
        r = httpx.put(f"{self.admin}{activator_api.SERVICES}/default/{MODEL}",
                      json={"container_concurrency": 0, "instances": [f.endpoint() for f in fns]}, timeout=5)
        r.raise_for_status()

    def migrate(self, source: Function, destination: Function) -> dict[str, Any]:
        r = httpx.post(f"{self.admin}{activator_api.MIGRATE}", timeout=120,
                       json={"namespace": "default", "name": MODEL, "source": source.id,
                             "destination": destination.id})
        if r.status_code != 200:
            raise RuntimeError(f"POST {activator_api.MIGRATE}: {r.status_code} {r.text}")
        return r.json()


@dataclass
class Stream:
    """Client side of one streaming completion: arrival time and token count of every frame."""

    times: list[float] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    text: str = ""
    done: int = 0
    errors: list[Any] = field(default_factory=list)
    sent: float = 0.0
    reached: threading.Event = field(default_factory=threading.Event)

    @property
    def tokens(self) -> int:
        return sum(self.counts)


def stream(url: str, body: dict[str, Any], out: Stream, signal_after: int) -> Stream:
    out.sent = time.perf_counter()
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=300) as r:
        if r.status_code != 200:
            raise RuntimeError(f"completion: {r.status_code} {r.read()!r}")
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                out.done += 1
                continue
            chunk = json.loads(data)
            if "error" in chunk:
                out.errors.append(chunk)
                continue
            n = sum(len(c["logprobs"]["tokens"]) for c in chunk.get("choices", []) if c.get("logprobs"))
            if n:
                out.times.append(time.perf_counter())
                out.counts.append(n)
                out.text += "".join(c["text"] for c in chunk["choices"])
                if out.tokens >= signal_after:
                    out.reached.set()
    out.reached.set()
    return out


def completion(prompt: list[int], max_tokens: int) -> dict[str, Any]:
    return {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "stream": True, "logprobs": 1,
            "temperature": 0, "ignore_eos": True}


def gap_ratio(times: list[float], t0: float, t1: float) -> dict[str, float]:
    """Largest gap between consecutive frames that overlaps [t0, first frame after t1], over the median
    gap entirely outside it."""
    end = next((t for t in times if t >= t1), t1)
    gaps = [(a, b) for a, b in zip(times, times[1:], strict=False)]
    inside = [b - a for a, b in gaps if b >= t0 and a <= end]
    outside = [b - a for a, b in gaps if b < t0 or a > end]
    if not inside or not outside:
        raise RuntimeError(f"stream too short to split around the handoff ({len(gaps)} gaps)")
    med = statistics.median(outside)
    return {"max_gap_s": max(inside), "median_itl_s": med, "ratio": max(inside) / med}


def splice_gap(times: list[float], counts: list[int], source_tokens: int) -> float:
    """The gap at the splice: from the frame with the source's last token (generated token number
    `source_tokens`) to the next frame, the destination's first."""
    seen = 0
    for i, n in enumerate(counts):
        seen += n
        if seen >= source_tokens:
            if i + 1 >= len(times):
                raise RuntimeError(f"no frame after the source's last token ({source_tokens})")
            return times[i + 1] - times[i]
    raise RuntimeError(f"the stream has {seen} tokens, fewer than the source delivered ({source_tokens})")


def one_run(act: Activator, a: Function, b: Function, tok: Any, prompt: list[int], before: int,
            after: int) -> dict[str, Any]:
    act.set_instances(a)
    out = Stream()
    t = threading.Thread(target=stream, args=(act.url, completion(prompt, before + after), out, before))
    t.start()
    try:
        if not out.reached.wait(120):
            raise TimeoutError("the stream did not reach the trigger point")
        act.set_instances(b)  # a is the victim: no new requests reach it
        t0 = time.perf_counter()
        result = act.migrate(a, b)
        t1 = time.perf_counter()
    finally:
        t.join(300)
    [gen] = result["generations"]
    if gen["outcome"] != "migrated" or out.done != 1 or out.errors or out.tokens != before + after:
        raise RuntimeError(f"migration did not complete cleanly: {gen}, done={out.done}, errors={out.errors}, "
                           f"tokens={out.tokens}")
    gap = gap_ratio(out.times, t0, t1)
    context = int(gen["tokens"])
    gap["splice_gap_s"] = splice_gap(out.times, out.counts, context - len(prompt))
    gap["splice_ratio"] = gap["splice_gap_s"] / gap["median_itl_s"]

    # Restart by resending the context: original prompt + generated text re-tokenized, sized to `context`.
    ids = prompt + tok(out.text, add_special_tokens=False)["input_ids"]
    ids = (ids + prompt * (1 + context // len(prompt)))[:context]
    first = Stream()
    stream(act.url, completion(ids, 1), first, 1)
    restart_s = first.times[0] - first.sent
    # Restart from scratch: time until the original prompt re-delivers the tokens the client had.
    had = context - len(prompt)
    regen = Stream()
    stream(act.url, completion(prompt, had), regen, had)
    regen_s = regen.times[-1] - regen.sent
    row = {"context": context, "migration_s": gen["seconds"], "rounds": gen["rounds"], "gaps": gen["gaps"],
           "follow": gen["follow"], "lags": gen["lags"],
           "restart_s": restart_s, "regen_s": regen_s, "migrate_call_s": t1 - t0, **gap}
    log.info("run", **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
                       if k not in ("gaps", "lags")}, gaps=gen["gaps"], last_lags=gen["lags"][-4:])
    return row


def median_of(rows: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(r[key] for r in rows))


def plot(path: Path, per_context: dict[int, list[dict[str, Any]]], fit: MigrationCost) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.5))
    ns = sorted(per_context)
    ax1.plot(ns, [median_of(per_context[n], "ratio") for n in ns], "o-", label="median of runs")
    ax1.plot(ns, [max(r["ratio"] for r in per_context[n]) for n in ns], "x--", label="max of runs")
    ax1.axhline(TARGET_RATIO, color="red", lw=0.8, label=f"target {TARGET_RATIO:g}x")
    ax1.set(xlabel="context (tokens)", ylabel="max handoff gap / median ITL", title="Handoff gap")
    ax1.legend()
    rows = [r for n in ns for r in per_context[n]]
    xs = [r["context"] for r in rows]
    ax2.scatter(xs, [r["migration_s"] for r in rows], s=12, label="runs")
    lo, hi = min(xs), max(xs)
    ax2.plot([lo, hi], [fit.seconds(lo), fit.seconds(hi)], "k-",
             label=f"{fit.a * 1e3:.3f} ms/token + {fit.b * 1e3:.1f} ms")
    ax2.set(xlabel="tokens at the detach", ylabel="seconds", title="Migration cost")
    ax2.legend()
    for key, label in (("migration_s", "migration"), ("restart_s", "restart: prefill context"),
                       ("regen_s", "restart: regenerate")):
        ax3.plot(ns, [median_of(per_context[n], key) for n in ns], "o-", label=label)
    ax3.set(xlabel="context (tokens)", ylabel="seconds (median)", title="Migration vs restart")
    ax3.legend()
    fig.tight_layout()
    save_figure(fig, path)


def model_spec(model_bytes: int) -> tuple[Any, str]:
    """The benchmark's model and its description: the TINY shape, or a float32 Llama of about
    `model_bytes` (vocabulary 4096) whose decode step costs a realistic share of the handoff."""
    from sllm_knative.models import ModelSpec, spec_for_size

    if not model_bytes:
        return ModelSpec(max_position_embeddings=MAX_LEN), "random Llama, TINY shape, max_position_embeddings 4096"
    spec = dataclasses.replace(spec_for_size(model_bytes, dtype="float32", vocab_size=4096),
                               max_position_embeddings=MAX_LEN)
    return spec, (f"random Llama, float32, {spec.param_count() * 4 / 1e6:.0f} MB: hidden {spec.hidden_size}, "
                  f"{spec.num_hidden_layers} layers, vocabulary 4096, max_position_embeddings 4096")


def run(out: Path, work: Path, contexts: list[int], runs: int, before: int, after: int, model_bytes: int = 0,
        gap: int | None = None, numerics: str = "exact", device: str = "cpu") -> dict[str, Any]:
    from transformers import AutoTokenizer

    from sllm_knative.models import build_model

    spec, model_desc = model_spec(model_bytes)
    model_dir = build_model(work / f"model-{model_bytes}", spec)
    tok = AutoTokenizer.from_pretrained(model_dir)
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    procs: list[Process] = []
    try:
        act_args = [] if gap is None else ["--migration-gap", str(gap)]
        a, b = Function("a", model_dir, logs, numerics, device), Function("b", model_dir, logs, numerics, device)
        act = Activator(logs, act_args)
        procs += [a, b, act]
        for p in procs:
            p.wait_ready()
        prompts = {n: [rng.randrange(3, tok.vocab_size) for _ in range(n - before)] for n in contexts}
        warm = [rng.randrange(3, tok.vocab_size) for _ in range(max(1, min(contexts) - before))]
        one_run(act, a, b, tok, warm, before, after)  # warm-up at the shortest context, discarded
        per_context = {n: [one_run(act, a, b, tok, prompts[n], before, after) for _ in range(runs)]
                       for n in contexts}
    finally:
        for p in reversed(procs):
            p.stop()

    all_rows = [r for rows in per_context.values() for r in rows]
    fit = fit_migration_cost([MigrationObservation(r["context"], r["migration_s"]) for r in all_rows],
                             MigrationCost())
    results: list[dict[str, Any]] = [
        {"name": "handoff_gap", "max_gap_over_median_itl": max(r["ratio"] for r in all_rows),
         "splice_gap_over_median_itl": max(r["splice_ratio"] for r in all_rows)},
        {"name": "cost_fit", "a_s_per_token": fit.a, "b_s": fit.b},
    ]
    results += [{"name": "vs_restart", "context": n, "migration_s": median_of(per_context[n], "migration_s"),
                 "restart_s": median_of(per_context[n], "restart_s")}
                for n in (256, 1024, 2048) if n in per_context]
    doc = {
        "results": results,
        "per_context": [{"context": n, "runs": len(rows),
                         **{k: median_of(rows, k) for k in ("ratio", "max_gap_s", "splice_ratio", "splice_gap_s",
                                                            "median_itl_s", "migration_s",
                                                            "migrate_call_s", "restart_s", "regen_s")},
                         "max_ratio": max(r["ratio"] for r in rows), "runs_detail": rows}
                        for n, rows in per_context.items()],
        "limits": {"target_max_gap_over_median_itl": TARGET_RATIO, "runs_per_context": runs,
                   "generated_before_trigger": before, "generated_after_trigger": after,
                   "model": model_desc, "migration_gap": "activator default" if gap is None else gap,
                   "numerics": numerics, "device": device,
                   "note": "median of the runs per context on a shared 2-core machine; GPU numbers not measured"
                           if device == "cpu" else f"median of the runs per context on {device}"},
        "machine": machine(),
    }
    out.mkdir(parents=True, exist_ok=True)
    plot(out / "migration.png", per_context, fit)
    write_json(out, "migration", doc)
    return doc


def parser() -> argparse.ArgumentParser:
    """The command line (bench/gpu/check.py's dry run parses its own argv with it)."""
    p = argparse.ArgumentParser(prog="bench.migration", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--contexts", default="256,1024,2048")
    p.add_argument("--before", type=int, default=32, help="generated tokens before the migration is triggered")
    p.add_argument("--after", type=int, default=2000,
                   help="generated tokens after the trigger (long enough that the source does not finish first)")
    p.add_argument("--work", type=Path, help="model and logs (default: a temporary directory)")
    p.add_argument("--model-bytes", type=int, default=200_000_000,
                   help="a float32 model of about this size (default: a decode step of 15-21 ms on a 2-core CPU); "
                        "0: the TINY shape (about 1 ms a step)")
    p.add_argument("--gap", type=int, default=None, help="the activator's --migration-gap (default: its own)")
    p.add_argument("--numerics", choices=("exact", "fast"), default="exact",
                   help="the instances' numerics (exact: token-identical handoff; fast: batched kernels)")
    p.add_argument("--device", default="cpu", help="where both instances compute: cpu (default), cuda or cuda:N")
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    from sllm_knative.local.cluster import check_device_usable, parse_device

    try:
        parse_device(args.device)
        check_device_usable(args.device)  # before the model is built and the instances started
    except (ValueError, RuntimeError) as exc:
        p.error(str(exc))
    setup()
    exit_on_sigterm()  # the `finally` that stops the instances and the activator runs
    contexts = sorted({int(x) for x in args.contexts.split(",") if x.strip()})
    bad = [n for n in contexts if n <= args.before or n + args.after > MAX_LEN]
    if bad or args.runs < 1:
        p.error(f"--contexts must be > --before ({args.before}) and + --after <= {MAX_LEN}; --runs >= 1 "
                f"(got contexts {bad}, runs {args.runs})")
    if args.work:
        doc = run(args.out, args.work, contexts, args.runs, args.before, args.after, args.model_bytes, args.gap,
                  args.numerics, args.device)
    else:
        with tempfile.TemporaryDirectory(prefix="bench-migration-") as tmp:
            doc = run(args.out, Path(tmp), contexts, args.runs, args.before, args.after, args.model_bytes, args.gap,
                      args.numerics, args.device)
    print(json.dumps(doc["results"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
