"""One meaning per log field (sllm_knative/log.py): `service=` is a service key, `checkpoint=` a
checkpoint URI. `model=` once held a service key in the autoscaler and a checkpoint URI in the
loader; this test fails when a log call or a logger binding passes it again."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.test_lint import ROOT, _packages

LOG_CALLS = {"debug", "info", "warning", "error", "exception", "critical", "bind", "get_logger"}
RETIRED = {"model": "service= (a service key) or checkpoint= (a checkpoint URI)"}


def _log_calls(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
        if name in LOG_CALLS:
            found += [(node.lineno, k.arg) for k in node.keywords if k.arg in RETIRED]
    return found


def test_no_log_line_uses_a_retired_field() -> None:
    bad = [f"{path.relative_to(ROOT)}:{line}: {field}= (use {RETIRED[field]})"
           for package in _packages()
           for path in sorted((ROOT / package).rglob("*.py"))
           for line, field in _log_calls(path)]
    assert bad == [], "\n".join(bad)
