"""What every backend asks an instance over its internal API (`sllm_knative.api.instance`), once."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import httpx

from autoscaler.backends.base import InstanceRecord
from sllm_knative.api import instance as instance_api
from sllm_knative.api.wire import parse_json
from sllm_knative.log import get_logger

_log = get_logger("autoscaler.backend")


async def fetch_generations(http: httpx.AsyncClient, rec: InstanceRecord, headers: Mapping[str, str],
                            timeout_s: float = 1.0) -> list[dict[str, Any]] | None:
    """The generations the instance runs (`GET /internal/v1/generations`), None when it does not
    answer. A refusal (a token or version mismatch, not a transient) is logged as a warning."""
    try:
        r = await http.get(f"{rec.internal_url}{instance_api.GENERATIONS}", headers=dict(headers), timeout=timeout_s)
        r.raise_for_status()
        listed = parse_json(instance_api.GenerationList, r.content)
    except httpx.HTTPStatusError as exc:
        _log.warning("generations refused", service=rec.service, instance=rec.id, node=rec.node,
                     status=exc.response.status_code)
        return None
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
        _log.debug("generations unavailable", service=rec.service, instance=rec.id, node=rec.node, error=str(exc))
        return None
    return [g.model_dump() for g in listed.data]
