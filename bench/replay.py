"""Trace replay on real processes: the Azure LLM inference trace, sent as streaming OpenAI calls,
against ServerlessLLM, its ablations and its peers side by side (issue 16 §1).

    .venv/bin/python -m bench.replay --out DIR [--window START,LENGTH] [--warmup S] [--compress X]
                                     [--sample P] [--services N] [--checkpoints K] [--zipf A]
                                     [--max-prompt-tokens N] [--max-tokens N] [--model-mb N]
                                     [--keep-alive S] [--max-scale N] [--profiles a,b,...]
                                     [--work DIR]

writes DIR/replay.json, DIR/replay-ttft.png (TTFT CDF per profile) and DIR/replay-instances.png
(instances per service over time, per profile). The requests are bench/replay_core.py's (its
docstring states the rules): a window of sim.workload's vendored Azure conversation trace,
sampled with a seeded hash, compressed in time, each request mapped to one of N services by a
seeded hash with Zipf popularity, service `s{r}` serving checkpoint `r % K` (several services
share a checkpoint), prompt and output lengths capped so that this CPU serves them. Every request
is its own thread with its own official `openai` client, sent at its compressed trace time as a
streaming completion (the prompt as token ids); per request: TTFT from the moment it was sent,
end, success, and the instance that served it (the `x-sllm-instance` response header).

The model: a random-weight Llama of `--model-mb` MiB (`spec_for_size`, vocab 8192, bf16),
built once into --work with one copy per checkpoint. The same machine runs every profile, one
after the other, on the same requests; each instance computes on one thread (OMP_NUM_THREADS=1,
SLLM_NUMERICS=fast). By default each of the 4 services has its own checkpoint and each node's
DRAM tier holds two of them (`--checkpoints 4 --dram-gb 0.6`): more models than one node's
host memory holds, ServerlessLLM's setting, where the tier a cold start finds depends on the
node (with `--checkpoints 2 --dram-gb 2`, the default before 2026-12-07, every node's DRAM held
every checkpoint after the warm-up and placement had nothing to choose). Every profile's
services scale to zero after the same idle time
(`--keep-alive`, default 6 s: Knative's smallest stable window) and hold one instance at most
(`--max-scale`, default 1), on 2 nodes x 2 slots. The default 4 services fit the 4 slots, so the
tail is the cold starts themselves; with more (`--services 6`) a cold start may first need a
slot, and the tail is the wait for one (the overload regime: sllm evicts an idle instance once
its minResidency is over, the others wait for an instance to scale to zero). With `--max-scale
N` (the sllm-type profiles only) a busy service scales out to N instances, and a cold start that
finds no free slot may move an instance's generations onto a sibling with room and take its slot
(live migration): the setup where `no-migration` can differ.

Profiles (each on a fresh local cluster, `sllm-knative up`, the store a file:// directory read
at local-disk speed, the node tiers empty at the start):

  sllm               the cluster as shipped: loader tiers (store -> SSD -> DRAM), load-time
                     placement, live migration, a ScalingPolicy keep-alive
  no-dram-tier       as sllm, but no DRAM copy outlives its instances: the bench evicts every
                     unleased DRAM-tier copy (loader Evict, tier dram) every 0.2 s, so a cold
                     start loads from SSD or the store (the loader stages every load through its
                     DRAM tier, so `--dram-gb 0` cannot exist; this is the sim's `dram_tier=False`)
  no-locality        as sllm with `up --placement random` (placement.place_random: a random
                     node among those with a free slot, whatever tier holds the checkpoint)
  no-migration       as sllm with `migration: false` in every ScalingPolicy
  knative-default    bench/_fresh.py's instance (as bench/coldstart.py's knative_default): the
                     services are registered on the same activator with no instance; when the
                     activator holds a request of a service with none, a fresh
                     `python -m functions.llm` process starts on a random node with a free slot
                     and loads the Hugging Face directory with transformers `from_pretrained`
                     after its page cache is dropped; an instance idle for the keep-alive (the
                     KPA stable window with no request) is taken out of the activator and
                     stopped. Left out, in its favour: Kubernetes scheduling, image pull, a
                     network between store and node (the store is read at local-disk speed),
                     Knative's own 60 s stable window + 30 s grace (longer idle: fewer cold starts
                     but more instance-seconds; here every profile has the same keep-alive).
  kserve-localcache  as knative-default, but every node has its own copy of every checkpoint on
                     its local disk (copied before the run, their page cache dropped once then):
                     an instance loads the copy of its node, and what that node read recently is
                     still in its page cache; placement ignores which node that is.
  ray-serve          real Ray Serve (bench/replay_ray.py): min_replicas 0, its own HTTP proxy.

Reported per profile: TTFT p50/p90/p99/max, SLO attainment at TTFT <= 1 s and <= 5 s, cold
starts (by checkpoint tier for the sllm-type profiles, from the autoscaler's placement records),
instance-seconds (the integral of the instance count, sampled every 0.5 s: the cost proxy),
failed requests, p99 over sllm's; the targets of issue 16 in `targets`; the 1-minute load
average before and after each profile.
"""
from __future__ import annotations

import argparse
import os
import secrets
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench._common import ensure_model, exit_on_sigterm, machine, save_figure, write_json
from bench.replay_client import NODES, SLOTS, VOCAB, Outcome, log
from bench.replay_core import check_targets, instance_seconds, p99_ratios, plan, tier_counts, ttft_stats
from bench.replay_profiles import PROFILES, SLLM_PROFILES, run_fresh, run_ray, run_sllm

REPO = Path(__file__).resolve().parents[1]


def build_inputs(work: Path, checkpoints: int, model_mb: int) -> tuple[list[Path], Path]:
    """(the Hugging Face dir of each checkpoint, the store of converted checkpoints c0, c1, ...)."""
    from sllm_knative import format as fmt
    from sllm_knative.convert import convert
    from sllm_knative.models import spec_for_size

    spec = spec_for_size(model_mb << 20, vocab_size=VOCAB)
    hfs = []
    for k in range(checkpoints):
        hf, ckpt = work / "hf" / f"c{k}", work / "store" / f"c{k}"
        if ensure_model(hf, spec) or not fmt.is_checkpoint(ckpt):
            convert(hf, ckpt, overwrite=True)
        hfs.append(hf)
    return hfs, work / "store"


def summarize(name: str, res: Mapping[str, Any]) -> dict[str, Any]:
    """One profile's row: latency statistics over the counted requests (not the warm-up's);
    failed requests, cold starts and instance-seconds over the whole run."""
    outs: list[Outcome] = res["outcomes"]
    counted = [o for o in outs if not o.warmup]
    return {"profile": name, "requests": len(counted), "warmup_requests": len(outs) - len(counted),
            "failed": sum(1 for o in outs if not o.ok),
            **ttft_stats([o.ttft_s if o.ok else None for o in counted]),
            "cold_starts": len(res["cold_starts"]), "cold_starts_by_tier": res["cold_starts_by_tier"],
            "instance_s": instance_seconds(res["samples"]),
            "instances_seen": len({o.instance for o in outs if o.instance}),
            "late_send_max_s": round(max((o.sent_s - o.at_s for o in outs), default=0.0), 3)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from sim.workload import DEFAULT_TRACE, read_trace
    from sllm_knative.api import auth

    os.environ.setdefault(auth.TOKEN_ENV, secrets.token_urlsafe(24))  # `up` hands it to every component
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["SLLM_NUMERICS"] = "fast"
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    work = Path(args.work or REPO / ".bench" / "replay")
    out = Path(args.out)
    logs = out / "replay-logs"
    logs.mkdir(parents=True, exist_ok=True)
    start_s, length_s = args.window
    shots = plan(read_trace(DEFAULT_TRACE), start_s=start_s, length_s=length_s, sample=args.sample,
                 compress=args.compress, services=args.services, checkpoints=args.checkpoints, zipf=args.zipf,
                 max_prompt_tokens=args.max_prompt_tokens, max_tokens=args.max_tokens, seed=args.seed,
                 warmup_s=args.warmup)
    if not shots:
        raise SystemExit("the window and sample rate keep no request")
    log(f"{len(shots)} requests ({sum(1 for s in shots if s.warmup)} warm-up) over {shots[-1].at_s:.0f}s "
        f"to {args.services} services "
        f"({sum(1 for s in shots if s.service == 's0')} to s0); building the model")
    hfs, store = build_inputs(work, args.checkpoints, args.model_mb)
    t_begin = time.monotonic()
    results: dict[str, dict[str, Any]] = {}
    rows: dict[str, dict[str, Any]] = {}
    for i, name in enumerate(args.profiles):
        load0 = round(os.getloadavg()[0], 2)
        log(f"[{i + 1}/{len(args.profiles)}] {name} (load average {load0})")
        t0 = time.monotonic()
        try:
            if name in SLLM_PROFILES:
                res = run_sllm(name, shots, store, args, logs)
            elif name == "ray-serve":
                res = run_ray(shots, hfs, args)
            else:
                res = run_fresh(name, shots, store, hfs, args, logs, work)
        except Exception as exc:  # noqa: BLE001 - the profile records why it has no numbers
            log(f"    {name} failed: {type(exc).__name__}: {exc}")
            results[name] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
            rows[name] = {"profile": name, "error": results[name]["error"][:300], "failed": None, "ttft_p99_s": None}
            continue
        row = summarize(name, res)
        row.update(loadavg_1m_before=load0, loadavg_1m_after=round(os.getloadavg()[0], 2),
                   profile_s=round(time.monotonic() - t0, 1))
        rows[name] = row
        results[name] = {**{k: v for k, v in res.items() if k != "outcomes"},
                         "outcomes": [asdict(o) for o in res["outcomes"]]}
        log(f"    p50/p99/max TTFT {row['ttft_p50_s']}/{row['ttft_p99_s']}/{row['ttft_max_s']}s, "
            f"failed {row['failed']}, cold starts {row['cold_starts_by_tier']}, {row['instance_s']} instance-s")
        for err in sorted({o.error for o in res["outcomes"] if o.error})[:3]:
            log(f"    error: {err}")
    ratios = p99_ratios(rows)
    for name, r in rows.items():
        r["p99_over_sllm"] = ratios.get(name)
    return {
        "rows": list(rows.values()),
        "targets": check_targets(rows),
        "setup": {
            "trace": "sim/data/AzureLLMInferenceTrace_conv.csv (sim.workload.read_trace)",
            "window_s": [start_s, length_s], "warmup_s": args.warmup,
            "warmup_requests": sum(1 for s in shots if s.warmup), "compress": args.compress, "sample": args.sample,
            "services": args.services, "checkpoints": args.checkpoints, "zipf": args.zipf, "seed": args.seed,
            "max_prompt_tokens": args.max_prompt_tokens, "max_tokens": args.max_tokens,
            "requests": len(shots), "replay_s": shots[-1].at_s, "keep_alive_s": args.keep_alive,
            "nodes": NODES, "slots_per_node": SLOTS, "dram_gb_per_node": args.dram_gb, "max_scale": args.max_scale,
            "container_concurrency": 4,
            "model": f"spec_for_size({args.model_mb} MiB, vocab {VOCAB}), bf16, random weights",
            "per_service": tier_counts(s.service for s in shots),
            "instance_threads": 1, "numerics": "fast",
        },
        "meta": {"machine": machine(), "bench_seconds": round(time.monotonic() - t_begin, 1),
                 "loadavg_1m_at_end": round(os.getloadavg()[0], 2),
                 "command": " ".join([".venv/bin/python", "-m", "bench.replay", *sys.argv[1:]])},
        "profiles": results,
        "shots": [asdict(s) for s in shots],
    }


def plot(doc: Mapping[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    profiles = {n: p for n, p in doc["profiles"].items() if "outcomes" in p}
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, p in profiles.items():
        counted = [o for o in p["outcomes"] if not o["warmup"]]
        ttfts = sorted(o["ttft_s"] for o in counted if o["ok"])
        if ttfts:
            ax.step(ttfts, [(i + 1) / len(counted) for i in range(len(ttfts))], where="post", label=name)
    for slo in (1.0, 5.0):
        ax.axvline(slo, ls=":", color="gray", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("time to first token (s, log)")
    ax.set_ylabel("fraction of requests")
    s = doc["setup"]
    ax.set_title(f"trace replay: {s['requests']} requests, {s['services']} services, window {s['window_s']} s "
                 f"/ {s['compress']:g}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths = [save_figure(fig, out / "replay-ttft.png")]
    n = max(1, len(profiles))
    fig, axes = plt.subplots(n, 1, figsize=(9, 1.8 * n + 0.5), sharex=True, squeeze=False)
    services = sorted({k for p in profiles.values() for r in p["samples"] for k in r if k != "t"})
    for ax, (name, p) in zip(axes[:, 0], profiles.items(), strict=False):
        ts = [r["t"] for r in p["samples"]]
        ax.stackplot(ts, *[[r.get(svc, 0) for r in p["samples"]] for svc in services], labels=services, step="post")
        ax.set_ylabel(name, fontsize=8)
        ax.set_ylim(0, NODES * SLOTS + 0.5)
    axes[0, 0].legend(fontsize=7, ncol=len(services), loc="upper right")
    axes[-1, 0].set_xlabel("seconds since the replay started")
    fig.suptitle("instances per service (stacked)", fontsize=9)
    fig.tight_layout()
    paths.append(save_figure(fig, out / "replay-instances.png"))
    return paths


def _window(text: str) -> tuple[float, float]:
    try:
        a, b = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--window {text!r}: expected START,LENGTH in seconds") from None
    return a, b


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.replay", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--window", type=_window, default=(600.0, 360.0), help="START,LENGTH into the trace, seconds "
                   "(default 600,360)")
    p.add_argument("--warmup", type=float, default=60.0, help="trace seconds before the window replayed first and "
                   "not counted in the latency statistics (default 60)")
    p.add_argument("--compress", type=float, default=6.0, help="time compression factor (default 6)")
    p.add_argument("--sample", type=float, default=0.05, help="fraction of the window's requests kept (default 0.05)")
    p.add_argument("--services", type=int, default=4, help="services (default 4, one per slot)")
    p.add_argument("--checkpoints", type=int, default=4,
                   help="checkpoints the services share (default 4: one per service)")
    p.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent of service popularity (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-prompt-tokens", type=int, default=16, help="prompt cap (default 16)")
    p.add_argument("--max-tokens", type=int, default=4, help="generated tokens cap (default 4)")
    p.add_argument("--model-mb", type=int, default=256, help="size of the random model (default 256 MiB)")
    p.add_argument("--dram-gb", type=float, default=0.6,
                   help="each node's DRAM tier in GiB (default 0.6: two of the four 256 MiB checkpoints, so the "
                        "nodes hold different ones and placement by locality matters; 2 holds every one)")
    p.add_argument("--keep-alive", type=float, default=6.0, help="idle seconds before a service scales to zero, "
                   "every profile (default 6)")
    p.add_argument("--max-scale", type=int, default=1,
                   help="instances per service at most (default 1); above 1 a busy instance has siblings "
                        "its generations can move to, so the no-migration ablation can differ. The "
                        "fresh-process and Ray profiles start one instance per service, so only the "
                        "sllm-type profiles run with more")
    p.add_argument("--profiles", default=",".join(PROFILES), help=f"comma list (default all: {','.join(PROFILES)})")
    p.add_argument("--work", default=None, help="where the models are built and kept (default .bench/replay)")
    args = p.parse_args(argv)
    exit_on_sigterm()
    args.profiles = [x.strip() for x in args.profiles.split(",") if x.strip()]
    unknown = [x for x in args.profiles if x not in PROFILES]
    if unknown:
        p.error(f"unknown profiles {unknown}; known: {', '.join(PROFILES)}")
    if args.keep_alive < 1:
        p.error("--keep-alive must be at least 1 s")
    if args.max_scale < 1:
        p.error(f"--max-scale must be at least 1, got {args.max_scale}")
    peers = [x for x in args.profiles if x not in SLLM_PROFILES]
    if args.max_scale > 1 and peers:
        p.error(f"--max-scale {args.max_scale} runs only the sllm-type profiles ({', '.join(SLLM_PROFILES)}): "
                f"{', '.join(peers)} start one instance per service; pass --profiles")
    doc = run(args)
    out = Path(args.out)
    path = write_json(out, "replay", doc)
    for f in plot(doc, out):
        log(f"wrote {f}")
    for r in doc["rows"]:
        log(f"{r['profile']:18s} p99 {r.get('ttft_p99_s')}  over sllm {r.get('p99_over_sllm')}  failed {r.get('failed')}")
    for t in doc["targets"]:
        log(f"target {t['name']}: {t['value']} ({t['target']}): {'met' if t['met'] else 'NOT met' if t['met'] is False else 'n/a'}")
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
