"""`sllm-knative apply | get | delete | invoke`: services on the local cluster, kubectl style."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from sllm_knative.commands.cluster import add_state_arg


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("apply", help="deploy Knative Services / ScalingPolicies from YAML")
    add_state_arg(p)
    p.add_argument("-f", "--filename", action="append", required=True, help="YAML file (repeatable)")
    p.set_defaults(func=_apply)

    p = sub.add_parser("get", help="list services, revisions, instances or nodes")
    add_state_arg(p)
    p.add_argument("kind", choices=["services", "revisions", "instances", "nodes"])
    p.add_argument("-o", "--output", choices=["table", "json"], default="table")
    p.set_defaults(func=_get)

    p = sub.add_parser("delete", help="delete a service")
    add_state_arg(p)
    p.add_argument("kind", choices=["service"])
    p.add_argument("name")
    p.add_argument("-n", "--namespace", default="default")
    p.set_defaults(func=_delete)

    p = sub.add_parser("invoke", help="send a completion (or, with --chat, a chat message) through the activator; "
                                      "print the stream and the TTFT")
    add_state_arg(p)
    p.add_argument("name", help="service name (the OpenAI model name)")
    p.add_argument("-n", "--namespace", default="default")
    p.add_argument("--prompt", default="Hello, serverless world!")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--chat", action="store_true",
                   help="send the prompt as a user message to /v1/chat/completions (the model's chat template)")
    p.add_argument("--system", default=None, help="with --chat: a system message before the prompt")
    p.add_argument("--json", action="store_true", help="print one JSON line with the timings instead")
    p.set_defaults(func=_invoke)


def _cluster(args: argparse.Namespace) -> dict[str, Any]:
    from sllm_knative.local.cluster import read_cluster

    return read_cluster(Path(args.state_dir))


def _apply(args: argparse.Namespace) -> int:
    import httpx

    urls = _cluster(args)
    code = 0
    for f in args.filename:
        text = sys.stdin.read() if f == "-" else Path(f).read_text()
        r = httpx.post(f"{urls['autoscaler']}/v1/apply", content=text.encode(), params={"source": f}, timeout=30)
        doc = r.json()
        if r.status_code != 200:
            print(f"error: {doc['error']}", file=sys.stderr)
            code = 2
            continue
        for change in doc["changes"]:
            print(change)
    return code


def table(rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def _get(args: argparse.Namespace) -> int:
    import httpx

    urls = _cluster(args)
    if args.kind == "nodes":
        doc = httpx.get(f"{urls['autoscaler']}/v1/nodes", timeout=30).json()
        if args.output == "json":
            print(json.dumps(doc, indent=1))
            return 0
        rows = [["NODE", "SLOTS", "RUNNING", "DRAM", "SSD"]]
        for n in doc["nodes"]:
            tiers = {t["name"]: t for t in n.get("tiers", [])}
            cell = {k: ", ".join(f"{c['model'].rsplit('/', 1)[-1]}({c['state']})" for c in t["checkpoints"]) or "-"
                    for k, t in tiers.items()}
            rows.append([n["name"], str(n["slots"]), str(n["running"]), cell.get("dram", n.get("error", "-")),
                         cell.get("ssd", "-")])
        print(table(rows))
        return 0
    doc = httpx.get(f"{urls['autoscaler']}/v1/services", timeout=30).json()
    if args.output == "json":
        print(json.dumps(doc, indent=1))
        return 0
    if args.kind in ("services", "revisions"):
        rows = [["NAME", "MODEL", "DESIRED", "READY", "IN-FLIGHT", "URL", "LAST-FAILURE"]]
        for s in doc["services"]:
            ns, name = s["key"].split("/", 1)
            failure = " ".join((s.get("last_failure") or "-").split())  # one line, however long
            rows.append([s["key"] if args.kind == "services" else f"{s['key']}-00001", s["model"] or "-",
                         str(s["desired"]), str(s["ready"]), str(s["in_flight"]),
                         f"http://{name}.{ns}.example.com", failure])
    else:
        rows = [["INSTANCE", "SERVICE", "NODE", "STATE", "TIER", "READY-IN"]]
        for s in doc["services"]:
            for i in s["instances"]:
                ready = f"{i['ready_at'] - i['started_at']:.2f}s" if i.get("ready_at") else "-"
                rows.append([i["id"], s["key"], i["node"], i["state"], i["tier"] or "-", ready])
    print(table(rows))
    return 0


def _delete(args: argparse.Namespace) -> int:
    import httpx

    urls = _cluster(args)
    r = httpx.delete(f"{urls['autoscaler']}/v1/services/{args.namespace}/{args.name}", timeout=60)
    doc = r.json()
    if r.status_code != 200:
        print(f"error: {doc['error']}", file=sys.stderr)
        return 2
    print("\n".join(doc["changes"]))
    return 0


def error_message(r: Any) -> str:
    """The message of an OpenAI-shaped error body, else the body itself (on one line)."""
    try:
        return str(r.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return " ".join(r.text.split())[:300] or "(empty body)"


def chat_messages(prompt: str, system: str | None = None) -> list[dict[str, str]]:
    """The prompt as a user message, after an optional system message."""
    return [*([{"role": "system", "content": system}] if system else []), {"role": "user", "content": prompt}]


def invoke(activator: str, name: str, namespace: str, prompt: str, max_tokens: int, seed: int | None = None,
           on_text: Any = None, timeout: float = 300.0, headers: dict[str, str] | None = None,
           messages: list[dict[str, str]] | None = None) -> dict[str, Any]:
    """One streamed, greedy completion through the activator (a chat completion of `messages`
    when given, `prompt` unused); returns the text, TTFT and total time and the instance.
    Routed by the Host header (`name.namespace.example.com`) unless `headers` route it otherwise
    (Knative's revision headers, on Kubernetes)."""
    import httpx

    body: dict[str, Any] = {"model": name, "max_tokens": max_tokens, "stream": True, "temperature": 0}
    if messages is None:
        body["prompt"] = prompt
    else:
        body["messages"] = messages
    if seed is not None:
        body["seed"] = seed
    if headers is None:
        headers = {"host": f"{name}.{namespace}.example.com"}
    path = "/v1/completions" if messages is None else "/v1/chat/completions"
    t0 = time.perf_counter()
    ttft, text, instance = None, [], None
    with httpx.stream("POST", f"{activator}{path}", json=body, headers=headers, timeout=timeout) as r:
        if r.status_code != 200:
            r.read()
            raise RuntimeError(f"{path} for service {namespace}/{name}: HTTP {r.status_code}: {error_message(r)}")
        instance = r.headers.get("x-sllm-instance")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:  # an error event in the stream (the instance failed, a stream cut)
                raise RuntimeError(f"the stream ended with an error: {chunk['error']}")
            choices = chunk.get("choices") or []
            if any("role" in (c.get("delta") or {}) for c in choices):
                continue  # chat's first chunk opens the assistant's turn before any token
            piece = "".join(c.get("text") or (c.get("delta") or {}).get("content") or "" for c in choices)
            if ttft is None and choices:
                ttft = time.perf_counter() - t0
            text.append(piece)
            if on_text:
                on_text(piece)
    return {"text": "".join(text), "ttft_s": ttft, "total_s": time.perf_counter() - t0, "instance": instance}


def _invoke(args: argparse.Namespace) -> int:
    urls = _cluster(args)
    echo = None if args.json else (lambda s: print(s, end="", flush=True))
    messages = chat_messages(args.prompt, args.system) if args.chat else None
    res = invoke(urls["activator"], args.name, args.namespace, args.prompt, args.max_tokens, args.seed, echo,
                 messages=messages)
    if args.json:
        print(json.dumps(res))
    else:
        print(f"\n-- ttft {res['ttft_s']:.3f}s, total {res['total_s']:.3f}s, instance {res['instance']}")
    return 0
