"""`sllm-knative cache ls|prefetch|evict`: a node's checkpoint tiers, through its loader sidecar.

    sllm-knative cache ls [--json]
    sllm-knative cache prefetch MODEL [--tier dram|ssd] [--no-wait]
    sllm-knative cache evict MODEL [--tier ssd|dram|all]

The sidecar is found at --loader, else $SLLM_LOADER, else this host's default socket
(unix:///tmp/sllm-knative/NODE/loader.sock).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cache", help="list, warm or evict checkpoints in a node's SSD and DRAM tiers")
    p.add_argument("--loader", default=None, metavar="TARGET",
                   help="loader sidecar address: unix:///path or host:port (default: $SLLM_LOADER or this node's)")
    p.add_argument("--timeout", type=float, default=None, help="seconds to wait for the sidecar's answer")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    ls = actions.add_parser("ls", help="checkpoints per tier with sizes and state")
    ls.add_argument("--json", action="store_true", help="the whole inventory as JSON")
    pre = actions.add_parser("prefetch", help="warm a tier with a checkpoint")
    pre.add_argument("model", help="hf://org/name[@rev], s3://..., https://..., file://... or a bare name")
    pre.add_argument("--tier", choices=["dram", "ssd"], default="dram")
    pre.add_argument("--no-wait", action="store_true", help="return once the fetch started")
    ev = actions.add_parser("evict", help="drop a checkpoint from a tier (refused while in use)")
    ev.add_argument("model")
    ev.add_argument("--tier", choices=["ssd", "dram", "all"], default="all")
    p.set_defaults(func=_run)


def human(n: float) -> str:
    """Bytes for people: 1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def format_inventory(inv: Any, now: float) -> str:
    """The inventory as the table `cache ls` prints (a pure function of the message)."""
    lines = [f"node {inv.node}   stores: {', '.join(inv.stores) or '-'}"]
    for tier in inv.tiers:
        lines.append(f"{tier.name.upper():5} {human(tier.used)} of {human(tier.capacity)} used, "
                     f"{human(tier.free)} free   {tier.directory}")
        if not tier.entries:
            lines.append("      (empty)")
        for e in tier.entries:
            progress = "" if e.state == "ready" else f" {100 * e.filled // max(e.size, 1)}%"
            idle = f"{max(0.0, now - e.last_use):.0f}s ago"
            lines.append(f"      {e.model:<60} {human(e.size):>10}  {e.state + progress:<13} "
                         f"leases={e.leases} used {idle}")
    if inv.bandwidths:
        lines.append("bandwidth  " + ", ".join(f"{b.hop} {human(b.bytes_per_second)}/s" for b in inv.bandwidths))
    for d in inv.devices:
        lines.append(f"device     {d.kind}:{d.index} {d.name}  {human(d.memory_free)} free of {human(d.memory_total)}")
    for lease in inv.leases:
        lines.append(f"lease      {lease.lease_id} {lease.model} on {lease.device}"
                     + (f" by {lease.instance}" if lease.instance else ""))
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> int:
    from google.protobuf.json_format import MessageToDict

    from sllm_knative.loader.client import LoaderClient
    from sllm_knative.loader.errors import LoaderError

    try:
        with LoaderClient(args.loader, timeout=args.timeout) as client:
            if args.action == "ls":
                inv = client.inventory()
                if args.json:
                    print(json.dumps(MessageToDict(inv, preserving_proto_field_name=True), indent=1))
                else:
                    print(format_inventory(inv, time.time()))
            elif args.action == "prefetch":
                reply = client.prefetch(args.model, tier=args.tier, wait=not args.no_wait)
                print(f"{reply.model}: {reply.tier} tier " +
                      ("fetch started" if reply.source == "started" else f"ready (from {reply.source})"))
            else:
                ev = client.evict(args.model, tier="" if args.tier == "all" else args.tier)
                print(f"{args.model}: evicted from {', '.join(ev.tiers)} ({human(ev.bytes)})")
    except LoaderError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
