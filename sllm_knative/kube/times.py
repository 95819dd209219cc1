"""Times as the Kubernetes API writes them: RFC 3339 in UTC (`2026-12-05T12:00:00Z`; MicroTime,
as in Lease and Event times, with microseconds). One writer and one reader for every component."""

from __future__ import annotations

import datetime as dt


def rfc3339(t: float | dt.datetime | None = None, *, micro: bool = False) -> str:
    """`t` (Unix seconds or an aware datetime; now when None), to the second or to the microsecond."""
    if t is None:
        when = dt.datetime.now(dt.timezone.utc)
    elif isinstance(t, dt.datetime):
        when = t.astimezone(dt.timezone.utc)
    else:
        when = dt.datetime.fromtimestamp(t, dt.timezone.utc)
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ" if micro else "%Y-%m-%dT%H:%M:%SZ")


def parse_rfc3339(text: object) -> dt.datetime | None:
    """An RFC 3339 time (with or without a fraction), aware; None when absent or not one."""
    if not text or not isinstance(text, str):
        return None
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)
