"""Imports point one way (docs/architecture.md, "Imports point one way").

The library (`sllm_knative/`) never imports a process package (activator, autoscaler,
loader_sidecar, functions) nor bench/, tests/ or testkit/; the processes import the library and never one
another. Every module is parsed (nothing is imported): `import x`, `from x import y` (relative ones
resolved), imports inside functions and `if TYPE_CHECKING:` blocks, and `importlib.import_module(...)`
/ `__import__(...)` with a string literal. A violation is reported as file:line.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LIBRARY = "sllm_knative"
PROCESSES = ("activator", "autoscaler", "loader_sidecar", "functions")
NOT_IMPORTABLE = (*PROCESSES, "bench", "tests", "testkit", "sim")  # folders no library or process module may import
_DYNAMIC = {"import_module", "__import__"}  # importlib.import_module("x"), __import__("x")


def _package(path: Path, root: Path) -> list[str]:
    """The package a module lives in, as name parts (a package's __init__ is its own package)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    return parts[:-1]


def imports(path: Path, root: Path = REPO) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) of every import in a file, static or with a literal name."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = _package(path, root)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: level 1 is this package, each further dot one up
                up = node.level - 1
                prefix = ".".join(package[: len(package) - up]) if up < len(package) else ""
                if node.module:
                    yield node.lineno, f"{prefix}.{node.module}" if prefix else node.module
                else:  # from . import a, b: each is a module (or a name) of that package
                    for alias in node.names:
                        yield node.lineno, f"{prefix}.{alias.name}" if prefix else alias.name
            elif node.module:
                yield node.lineno, node.module
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
            if name in _DYNAMIC and node.args and isinstance(node.args[0], ast.Constant) \
                    and isinstance(node.args[0].value, str):
                yield node.lineno, node.args[0].value


def violations(package: str, forbidden: tuple[str, ...], root: Path = REPO) -> list[str]:
    """file:line: module, for each import in `package` whose top-level name is in `forbidden`."""
    out = []
    for path in sorted((root / package).rglob("*.py*")):
        if path.suffix not in (".py", ".pyi"):
            continue
        for line, module in sorted(imports(path, root)):
            top = module.split(".")[0]
            if top in forbidden and top != package:
                out.append(f"{path.relative_to(root)}:{line}: imports {module}")
    return out


def test_the_library_imports_no_process_package() -> None:
    found = violations(LIBRARY, NOT_IMPORTABLE)
    assert not found, ("the library must not import a process package (docs/architecture.md, "
                       "'Imports point one way'); start processes by their entry points and talk to them "
                       "through sllm_knative's API types instead:\n  " + "\n  ".join(found))


@pytest.mark.parametrize("process", PROCESSES)
def test_a_process_imports_no_other_process(process: str) -> None:
    found = violations(process, NOT_IMPORTABLE)
    assert not found, (f"{process} must not import another process package (only through sllm_knative):\n  "
                       + "\n  ".join(found))


def test_every_package_is_scanned() -> None:
    """A module the scanner cannot see (a syntax error, a moved folder) must not pass silently."""
    for package in (LIBRARY, *PROCESSES):
        files = list((REPO / package).rglob("*.py"))
        assert len(files) > 3, package
        for path in files:
            list(imports(path))  # parses


# -- the scanner itself, on a made-up tree ---------------------------------------------------


def test_the_scanner_finds_every_kind_of_import(tmp_path: Path) -> None:
    lib = tmp_path / LIBRARY / "sub"
    lib.mkdir(parents=True)
    (tmp_path / LIBRARY / "__init__.py").write_text("")
    (lib / "__init__.py").write_text("")
    (lib / "mod.py").write_text(
        "import os\n"                                        # 1: fine
        "import functions.llm.config as cfg\n"               # 2
        "from loader_sidecar.server import status_for\n"     # 3
        "from sllm_knative.loader import client\n"           # 4: fine
        "from . import sibling\n"                            # 5: fine (sllm_knative.sub.sibling)
        "from ..local import procs\n"                        # 6: fine (sllm_knative.local)
        "from ... import activator\n"                        # 7: beyond the library: activator
        "def later():\n"
        "    from autoscaler.backends import local\n"        # 9: inside a function
        "    import importlib\n"
        "    importlib.import_module('bench.coldstart')\n"   # 11: dynamic, literal
        "    __import__('tests.local')\n"                    # 12
        "    importlib.import_module(name_from_somewhere)\n"  # 13: not a literal: not seen
        "ARGV = ['python', '-m', 'functions.zygote']\n"      # 14: an entry point, not an import
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    import functions.zygote\n"                      # 17: type-only imports count too
    )
    found = violations(LIBRARY, NOT_IMPORTABLE, root=tmp_path)
    assert [f.split(": ", 1)[0].rsplit(":", 1)[1] for f in found] == ["2", "3", "7", "9", "11", "12", "17"], found
    assert found[0] == f"{Path(LIBRARY) / 'sub' / 'mod.py'}:2: imports functions.llm.config"
    assert found[2].endswith(":7: imports activator")


def test_the_scanner_lets_a_process_import_itself_and_the_library(tmp_path: Path) -> None:
    pkg = tmp_path / "functions"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "zygote.py").write_text("from functions.llm import config\nfrom sllm_knative.local import zygote\n"
                                   "from .llm import weights\nimport loader_sidecar.server\n")
    assert violations("functions", NOT_IMPORTABLE, root=tmp_path) == [
        f"{Path('functions') / 'zygote.py'}:4: imports loader_sidecar.server"]
