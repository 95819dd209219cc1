"""`sllm-knative up | down | logs`: the local cluster (the embedded default)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sllm_knative.local.cluster import UpOptions

DEFAULT_STATE = os.environ.get("SLLM_STATE_DIR", ".sllm-knative")


def add_state_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-dir", default=DEFAULT_STATE, help="local cluster state (default: $SLLM_STATE_DIR "
                                                               "or ./.sllm-knative)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("up", help="start a local cluster: activator, autoscaler, N nodes (loader + runtime)")
    add_state_arg(p)
    p.add_argument("--nodes", type=int, default=2, help="simulated nodes (default 2)")
    p.add_argument("--slots", type=int, default=2, help="instance slots per node (default 2)")
    p.add_argument("--dram-gb", type=float, default=2.0, help="DRAM tier budget per node in GiB (default 2)")
    p.add_argument("--ssd-gb", type=float, default=8.0, help="SSD cache budget per node in GiB (default 8)")
    p.add_argument("--store", action="append", default=[], metavar="URL",
                   help="model store the nodes may fetch from (file://, http(s)://, hf://, s3://); repeatable")
    p.add_argument("--port", type=int, default=8080, help="the activator's public port (default 8080)")
    p.add_argument("--dram-root", default="/dev/shm", help="tmpfs under which the DRAM tiers live")
    p.add_argument("--placement", choices=("load-time", "random"), default="load-time",
                   help="how a cold start picks its node: the load-time model (default), or at random among "
                        "nodes with a free slot (the no-locality ablation of bench/replay.py)")
    p.add_argument("--device", default="cpu",
                   help="where every instance computes: cpu (default), cuda or cuda:N (the nodes all run "
                        "on this machine and share its GPUs); refused at once when no GPU can be used")
    p.add_argument("--detach", action="store_true", help="run in the background; return once ready")
    p.set_defaults(func=_up)

    p = sub.add_parser("down", help="stop the local cluster and every process it started")
    add_state_arg(p)
    p.set_defaults(func=_down)

    p = sub.add_parser("logs", help="print a component's or an instance's log")
    add_state_arg(p)
    p.add_argument("name", nargs="?", default=None,
                   help="activator, autoscaler, loader-node-1, zygote-node-1, an instance id; none: list logs")
    p.add_argument("--tail", type=int, default=50, help="last N lines (0: all)")
    p.set_defaults(func=_logs)


def _up(args: argparse.Namespace) -> int:
    from sllm_knative.local.cluster import check_device_usable, up, up_detached

    opts = up_options(args)
    if args.detach:
        check_device_usable(opts.device)  # here too: fail before a background `up` is started
        doc = up_detached(_argv_of(args), opts.state_dir)
        print(f"local cluster up: {len(doc['nodes'])} nodes, activator {doc['activator']} (pid {doc['pid']})")
        return 0

    def ready(doc: dict) -> None:
        print(f"local cluster up: {len(doc['nodes'])} nodes, activator {doc['activator']}; Ctrl-C to stop",
              flush=True)

    return up(opts, on_ready=ready)


def up_options(args: argparse.Namespace) -> UpOptions:
    """`up`'s flags as UpOptions (ValueError for a bad value, e.g. --device tpu)."""
    from sllm_knative.local.cluster import UpOptions

    return UpOptions(state_dir=Path(args.state_dir), nodes=args.nodes, slots=args.slots,
                     dram_bytes=int(args.dram_gb * 2**30), ssd_bytes=int(args.ssd_gb * 2**30),
                     stores=tuple(args.store), port=args.port, dram_root=Path(args.dram_root),
                     placement=args.placement, device=args.device)


def _argv_of(args: argparse.Namespace) -> list[str]:
    argv = ["--state-dir", args.state_dir, "--nodes", str(args.nodes), "--slots", str(args.slots),
            "--dram-gb", str(args.dram_gb), "--ssd-gb", str(args.ssd_gb), "--port", str(args.port),
            "--dram-root", args.dram_root, "--placement", args.placement, "--device", args.device]
    for s in args.store:
        argv += ["--store", s]
    return argv


def _down(args: argparse.Namespace) -> int:
    from sllm_knative.local.cluster import down

    if down(Path(args.state_dir)):
        print("local cluster stopped")
    else:
        print("no local cluster running here")
    return 0


def _logs(args: argparse.Namespace) -> int:
    logs = Path(args.state_dir) / "logs"
    if not logs.is_dir():
        raise FileNotFoundError(2, "no local cluster logs here (run `sllm-knative up`, or pass --state-dir)", str(logs))
    if args.name is None:
        for p in sorted(logs.rglob("*.log")):
            print(p.relative_to(logs).with_suffix(""))
        return 0
    candidates = [logs / f"{args.name}.log", logs / "instances" / f"{args.name}.log"]
    path = next((p for p in candidates if p.exists()), None)
    if path is None:
        print(f"error: no log named {args.name!r} under {logs}", file=sys.stderr)
        return 2
    lines = path.read_text(errors="replace").splitlines()
    print("\n".join(lines[-args.tail:] if args.tail else lines))
    return 0
