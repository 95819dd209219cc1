"""Preemption: on SIGTERM, ask the activator to migrate this instance's generations first.

With `SLLM_DRAIN_URL` (the activator's admin URL) and `SLLM_INSTANCE` set, the shutdown path
calls `POST {SLLM_DRAIN_URL}/admin/v1/drain {"instance": SLLM_INSTANCE}` (the activator's admin
API, sllm_knative/api/activator.py) and waits for it (at most `SLLM_DRAIN_GRACE_S`, default
20 s) before the listeners stop: the internal API must still answer while the activator
exports, detaches and resumes elsewhere. Without them it does nothing.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from sllm_knative.api import activator as activator_api
from sllm_knative.api import auth
from sllm_knative.api.wire import parse_json

DEFAULT_GRACE_S = 20.0


def drain_target(env: dict[str, str]) -> tuple[str, str, float] | None:
    """(drain URL, instance id, grace seconds) from the environment, or None when not configured."""
    url, instance = env.get("SLLM_DRAIN_URL", "").rstrip("/"), env.get("SLLM_INSTANCE", "")
    if not url or not instance:
        return None
    raw = env.get("SLLM_DRAIN_GRACE_S", "")
    try:
        grace = float(raw) if raw else DEFAULT_GRACE_S
    except ValueError:
        raise ValueError(f"SLLM_DRAIN_GRACE_S = {raw!r}, must be a number of seconds") from None
    if grace <= 0:
        raise ValueError(f"SLLM_DRAIN_GRACE_S = {raw!r}, must be > 0")
    return url, instance, grace


async def drain(log: Any, env: dict[str, str] | None = None) -> None:
    """Ask for the migration and wait for it, bounded; failures are logged, never raised."""
    target = drain_target(dict(os.environ) if env is None else env)
    if target is None:
        return
    url, instance, grace = target
    import httpx

    try:
        headers = auth.auth_headers(auth.token_from_env(env))  # the activator's admin API may want it
        async with httpx.AsyncClient(timeout=grace, headers=headers) as client:
            body = activator_api.DrainRequest(instance=instance).model_dump()
            r = await asyncio.wait_for(client.post(f"{url}{activator_api.DRAIN}", json=body), grace)
        gens = parse_json(activator_api.DrainResponse, r.content).generations if r.status_code == 200 else []
        log.info("drained before exit", status=r.status_code, generations=len(gens),
                 outcomes=",".join(str(g.outcome) for g in gens))
    except (httpx.HTTPError, asyncio.TimeoutError, ValueError) as exc:  # InvalidBody is a ValueError
        log.warning("drain before exit failed", error=f"{type(exc).__name__}: {exc}")
