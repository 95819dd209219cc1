"""Scalar value parsers shared by the config parsers: Go durations, Kubernetes quantities,
and the string-typed numbers and booleans of annotations and ConfigMaps.

Each parser raises `ValueError` with a message that describes the expected form; callers
attach the field path (see `errors.FieldError`).
"""

from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation

from sllm_knative.config.errors import show

# Go's time.ParseDuration: a sequence of decimal numbers with unit suffixes, optional sign.
_DURATION_PART = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_DURATION_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}


def parse_duration(text: str) -> float:
    """A Go duration string (`"60s"`, `"1m30s"`, `"500ms"`, `"0"`) in seconds."""
    if not isinstance(text, str):
        raise ValueError(f"must be a duration string such as \"60s\", got {show(text)}")
    s = text.strip()
    sign = 1.0
    if s[:1] in "+-" and s:
        sign = -1.0 if s[0] == "-" else 1.0
        s = s[1:]
    if s == "0":
        return 0.0
    pos, total = 0, 0.0
    while pos < len(s):
        m = _DURATION_PART.match(s, pos)
        if m is None:
            raise ValueError(f"must be a duration such as \"60s\", \"1m30s\" or \"500ms\", got {show(text)}")
        total += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    if pos == 0:
        raise ValueError(f"must be a duration such as \"60s\", \"1m30s\" or \"500ms\", got {show(text)}")
    return sign * total


def format_duration(seconds: float) -> str:
    """Seconds as a short Go duration string: 60 -> "1m", 90 -> "1m30s", 0.5 -> "500ms"."""
    if seconds == 0:
        return "0s"
    if seconds < 1 or seconds != int(seconds):
        ms = round(seconds * 1000)
        if ms % 1000:
            return f"{ms}ms"
        seconds = ms // 1000
    whole = int(seconds)
    h, rest = divmod(whole, 3600)
    m, s = divmod(rest, 60)
    out = (f"{h}h" if h else "") + (f"{m}m" if m else "") + (f"{s}s" if s else "")
    return out


# Kubernetes resource.Quantity: <signed number><suffix>, suffix binary (Ki..Ei), decimal (n..E)
# or a decimal exponent (e3, E-2).
_QUANTITY = re.compile(r"^([+-]?(?:\d+\.?\d*|\.\d+))(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E|[eE][+-]?\d+)?$")
_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {"n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "k": Decimal(10**3),
            "M": Decimal(10**6), "G": Decimal(10**9), "T": Decimal(10**12), "P": Decimal(10**15),
            "E": Decimal(10**18)}


def parse_quantity(value: str | int | float) -> Decimal:
    """A Kubernetes quantity (`"500m"`, `"16Gi"`, `"1e3"`, `2`) as an exact Decimal."""
    if isinstance(value, bool):
        raise ValueError(f"must be a quantity such as \"500m\" or \"16Gi\", got {show(value)}")
    if isinstance(value, int | float):
        return Decimal(str(value))
    m = _QUANTITY.match(value.strip()) if isinstance(value, str) else None
    if m is None:
        raise ValueError(f"must be a quantity such as \"500m\", \"2\" or \"16Gi\", got {show(value)}")
    try:
        number = Decimal(m.group(1))
    except InvalidOperation as exc:  # the regex admits only decimal numerals; kept for safety
        raise ValueError(f"must be a quantity, got {show(value)}") from exc
    suffix = m.group(2) or ""
    if suffix in _BINARY:
        return number * _BINARY[suffix]
    if suffix in _DECIMAL:
        return number * _DECIMAL[suffix]
    if suffix:
        return number * Decimal(10) ** int(suffix[1:])
    return number


def parse_int(text: str, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """A base-10 integer string within optional bounds (bounds included)."""
    what = _int_bounds(minimum, maximum)
    if not isinstance(text, str) or not re.fullmatch(r"[+-]?\d+", text.strip()):
        raise ValueError(f"must be {what}, got {show(text)}")
    n = int(text)
    if (minimum is not None and n < minimum) or (maximum is not None and n > maximum):
        raise ValueError(f"must be {what}, got {show(text)}")
    return n


def _int_bounds(minimum: int | None, maximum: int | None) -> str:
    if minimum is not None and maximum is not None:
        return f"an integer in [{minimum}, {maximum}]"
    if minimum is not None:
        return f"an integer >= {minimum}"
    if maximum is not None:
        return f"an integer <= {maximum}"
    return "an integer"


def parse_float(text: str, *, minimum: float | None = None, maximum: float | None = None) -> float:
    """A finite decimal number string within optional bounds (bounds included)."""
    if minimum is not None and maximum is not None:
        what = f"a number in [{minimum:g}, {maximum:g}]"
    elif minimum is not None:
        what = f"a number >= {minimum:g}"
    elif maximum is not None:
        what = f"a number <= {maximum:g}"
    else:
        what = "a number"
    try:
        x = float(text) if isinstance(text, str) else math.nan
    except ValueError:
        x = math.nan
    if not math.isfinite(x) or (minimum is not None and x < minimum) or (maximum is not None and x > maximum):
        raise ValueError(f"must be {what}, got {show(text)}")
    return x


def parse_bool(text: str) -> bool:
    """`"true"` / `"false"` (any case), as Go's strconv.ParseBool accepts them in ConfigMaps."""
    if isinstance(text, str):
        t = text.strip().lower()
        if t in ("true", "1", "t"):
            return True
        if t in ("false", "0", "f"):
            return False
    raise ValueError(f"must be \"true\" or \"false\", got {show(text)}")
