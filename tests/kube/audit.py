"""RBAC measured from the API server's audit log (the test control plane audits every request a
service account makes, at level Metadata: `KubeCluster.audit_log`).

`granted(docs)` expands the Roles and ClusterRoles of a manifest into (apiGroup, resource,
verb) triples; `called(log, user)` gives the triples a user asked for and the requests refused
(403). A component's least-privilege test runs it as its ServiceAccount through everything it
does and asserts `called == granted` with nothing refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def granted(docs: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    """(apiGroup, resource[/subresource], verb) for every rule of every Role and ClusterRole."""
    out = set()
    for d in docs:
        if d["kind"] in ("Role", "ClusterRole"):
            for r in d["rules"]:
                out |= {(g, res, v) for g in r["apiGroups"] for res in r["resources"] for v in r["verbs"]}
    return out


def called(audit_log: Path, user: str) -> tuple[set[tuple[str, str, str]], list[str]]:
    """What `user` asked for, from the audit log; and the requests its Roles refused (403 with the
    authorizer's decision not "allow")."""
    calls, refused = set(), []
    for line in audit_log.read_text().splitlines():
        ev = json.loads(line)
        if ev.get("user", {}).get("username") != user or not ev.get("objectRef"):
            continue
        ref = ev["objectRef"]
        res = ref["resource"] + (f"/{ref['subresource']}" if ref.get("subresource") else "")
        calls.add((ref.get("apiGroup", ""), res, ev["verb"]))
        # A 403 the authorizer allowed is an admission refusal, not the Roles' (e.g. a create in a
        # namespace being deleted by another test on the shared control plane).
        allowed = (ev.get("annotations") or {}).get("authorization.k8s.io/decision") == "allow"
        if ev.get("responseStatus", {}).get("code") == 403 and not allowed:
            refused.append(f"{ev['verb']} {res} in {ref.get('namespace', '-')}")
    return calls, refused


def apply_docs(api: Any, docs: list[dict[str, Any]]) -> None:
    """Create each object as the admin (`api`); one that exists already is left as it is."""
    from kubernetes import utils
    from kubernetes.client.rest import ApiException

    for d in docs:
        try:
            utils.create_from_dict(api, d)
        except (ApiException, utils.FailToCreateError) as exc:
            if "AlreadyExists" not in str(exc):
                raise


def audit_offset(audit_log: Path) -> int:
    """Where the audit log ends now: pass it to `assert_exactly_granted` to look only at what follows."""
    return audit_log.stat().st_size if audit_log.exists() else 0


def assert_exactly_granted(audit_log: Path, user: str, docs: list[dict[str, Any]], who: str, since: int = 0) -> None:
    """`user` (who: "the loader", ...) was refused nothing, and called every verb its Roles grant
    and no other, counting only the audit log's whole lines after byte offset `since`."""
    with audit_log.open("rb") as f:
        f.seek(since)
        events = f.read()
    tail = audit_log.with_name(f"{audit_log.name}.{since}-{len(events)}")
    tail.write_bytes(events[:events.rfind(b"\n") + 1])  # whole lines: other clients are still audited
    calls, refused = called(tail, user)
    assert refused == [], f"the Roles refused calls {who} makes: {refused}"
    rules = granted(docs)
    assert calls - rules == set(), f"{who} called but was not granted: {sorted(calls - rules)}"
    assert rules - calls == set(), f"granted but {who} never called (remove from the Role): {sorted(rules - calls)}"
