"""`make lock`: the pinned, hashed requirements the images install (images/requirements/*.txt).

Four locks, each resolved by uv for the images' interpreter (CPython 3.11 on x86_64,
manylinux_2_28 or newer: Debian bookworm and Ubuntu 24.04 both qualify), with every file's
sha256, so a builder installs them with `pip install --require-hashes --no-deps`:

    control.txt     the activator and the autoscaler: the project's dependencies without the
                    model stack (MODEL_STACK), which neither imports (tests/core/test_images.py
                    starts both with it blocked)
    gpu.txt         the loader and the function: the dependencies with the s3 and gpu extras
    build.txt       what the builders build the project's wheel with: pyproject's build-system
                    requires (setuptools, wheel, pybind11)
    build-cuda.txt  build.txt plus the nvcc wheels the Makefile pins (NVCC; the loader's CUDA
                    path is compiled with them, as `make install` does) and uv (UV), which the
                    CUDA images' builders use to fetch their Python

The versions installed in the interpreter running this script (the development venv) are given
to the resolver as constraints where they apply, so the images install what the tests ran with.
tests/core/test_images.py fails when a lock no longer satisfies pyproject.toml or the Makefile.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "images" / "requirements"
PYTHON = "3.11"
PLATFORM = "x86_64-manylinux_2_28"
UV = "uv==0.13.9"
# What only the loader and the function load models with; the control plane's images leave it out.
MODEL_STACK = frozenset({"torch", "transformers", "safetensors", "tokenizers", "gguf"})
LOCKS = ("control", "gpu", "build", "build-cuda")
HEADER_COMMAND = "make lock"


def canonical(name: str) -> str:
    """PEP 503 normalised name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(req: str) -> str:
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req)
    if not m:
        raise ValueError(f"not a requirement: {req!r}")
    return canonical(m.group(1))


def makefile_nvcc(makefile: Path = ROOT / "Makefile") -> list[str]:
    """The quoted requirements of the Makefile's `NVCC :=` line."""
    for line in makefile.read_text().splitlines():
        if line.startswith("NVCC :="):
            return re.findall(r"'([^']+)'", line)
    raise ValueError(f"{makefile}: no `NVCC :=` line")


def inputs(root: Path = ROOT) -> dict[str, list[str]]:
    """What each lock is resolved from (requirement strings)."""
    project = tomllib.loads((root / "pyproject.toml").read_text())
    deps = list(project["project"]["dependencies"])
    extras = project["project"]["optional-dependencies"]
    build = list(project["build-system"]["requires"])
    return {
        "control": [d for d in deps if requirement_name(d) not in MODEL_STACK],
        "gpu": [*deps, *extras["s3"], *extras["gpu"]],
        "build": build,
        "build-cuda": [*build, *makefile_nvcc(root / "Makefile"), UV],
    }


def installed_constraints() -> str:
    """`name==version` for every distribution of this interpreter except the project itself."""
    pins = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name and canonical(name) != "sllm-knative":
            pins[canonical(name)] = dist.version
    return "".join(f"{n}=={v}\n" for n, v in sorted(pins.items()))


def uv() -> list[str]:
    """The pinned uv, installed into this interpreter when it is missing or another version."""
    want = UV.split("==")[1]
    try:
        have = importlib.metadata.version("uv")
    except importlib.metadata.PackageNotFoundError:
        have = ""
    if have != want:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", UV], check=True)
    return [sys.executable, "-m", "uv"]


def compile_lock(name: str, requirements: list[str], workdir: Path, out: Path) -> None:
    """Resolve `requirements` into `out`; the annotations name `NAME.in` and `dev-venv.txt` (in `workdir`)."""
    (workdir / f"{name}.in").write_text("".join(r + "\n" for r in requirements))
    subprocess.run([*uv(), "pip", "compile", "--quiet", "--generate-hashes", "--python-version", PYTHON,
                    "--python-platform", PLATFORM, "--constraint", "dev-venv.txt",
                    "--custom-compile-command", HEADER_COMMAND, "--output-file", str(out), f"{name}.in"],
                   check=True, cwd=workdir)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python images/lock.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("locks", nargs="*", metavar="LOCK", help=f"which to write: {', '.join(LOCKS)} (default: all)")
    args = ap.parse_args(argv)
    unknown = sorted(set(args.locks) - set(LOCKS))
    if unknown:
        ap.error(f"no such lock: {', '.join(unknown)} (one of {', '.join(LOCKS)})")
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "dev-venv.txt").write_text(installed_constraints())
        for name, reqs in inputs().items():
            if not args.locks or name in args.locks:
                compile_lock(name, reqs, Path(tmp), OUT / f"{name}.txt")
                print(f"wrote {(OUT / f'{name}.txt').relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
