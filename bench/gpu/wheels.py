"""The wheels the GPU check carries to a lent machine that cannot reach PyPI (issue 18).

    python -m bench.gpu.wheels fetch [--dest .gpu-wheels]   # make gpu-wheels
    python -m bench.gpu.wheels check [--dest .gpu-wheels]   # the bundle is complete (dry run)

The lent machine runs its own Python 3.12 with CUDA torch and about 200 packages
(bench/gpu/image-packages.txt). `fetch` resolves the project's runtime dependencies for that
interpreter (CPython 3.12, manylinux x86_64) with pip's own resolver, and downloads the wheels of
every package the image lacks, plus CARRY_ANYWAY. `check` reads the bundle's wheels: each must be
installable there (its tags), and every requirement of the project and of each carried wheel must
be met by the bundle (at a version its specifier allows) or by the image (its version checked where
it is known). run.sh installs the bundle with `pip install --no-index --no-deps --target`.
"""

from __future__ import annotations

import argparse
import dataclasses
import email.parser
import hashlib
import json
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import tomllib
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.tags import Tag, compatible_tags, cpython_tags
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
IMAGE_FILE = Path(__file__).with_name("image-packages.txt")
DEST = REPO / ".gpu-wheels"
STAMP = ".complete.json"
PYTHON = (3, 12)
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
             "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64", "linux_x86_64"]
# The image has these, but the project needs newer than it may hold: the committed gRPC stubs check
# grpcio >= the generator's 1.85.1 and protobuf >= 7.35.1 at import.
CARRY_ANYWAY = {"grpcio", "protobuf"}
# The torch of the image is the one to use (its CUDA build): never carried.
NEVER = {"torch", "triton"}
# Peers of bench/loading.py that run where their wheels can travel (pyproject's `bench` extra,
# less tensorizer, whose boto3 tree is larger than the rest of the bundle; plus InstantTensor,
# GPU only, so not in that extra).
PEERS = ["fastsafetensors", "runai-model-streamer", "instanttensor"]


def target_environment() -> dict[str, str]:
    """The marker environment of the lent machine's interpreter."""
    env: dict[str, str] = {k: str(v) for k, v in default_environment().items()}
    env.update({"python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
                "platform_python_implementation": "CPython", "sys_platform": "linux", "os_name": "posix",
                "platform_system": "Linux", "platform_machine": "x86_64"})
    return env


def target_tags() -> set[Tag]:
    return set(cpython_tags(PYTHON, abis=["cp312", "abi3", "none"], platforms=PLATFORMS)) | set(
        compatible_tags(PYTHON, "cp312", platforms=PLATFORMS))


def read_image(path: Path = IMAGE_FILE) -> dict[str, Version | None]:
    """name -> version (None where unknown) of the image's packages."""
    out: dict[str, Version | None] = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, _, version = line.partition("==")
        out[canonicalize_name(name)] = Version(version) if version else None
    return out


def project_requirements(pyproject: Path = REPO / "pyproject.toml") -> list[Requirement]:
    """The project's runtime dependencies, less the image's torch, plus the loading peers."""
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    reqs = [Requirement(d) for d in deps] + [Requirement(p) for p in PEERS]
    return [r for r in reqs if canonicalize_name(r.name) not in NEVER]


@dataclasses.dataclass(frozen=True)
class Wheel:
    name: str  # canonical
    version: Version
    requires: tuple[Requirement, ...]
    tags: frozenset[Tag]
    file: str


def read_wheel(path: Path) -> Wheel:
    name, version, _build, tags = parse_wheel_filename(path.name)
    with zipfile.ZipFile(path) as z:
        meta = next((n for n in z.namelist() if n.endswith(".dist-info/METADATA")), None)
        if meta is None:
            raise ValueError(f"{path}: no .dist-info/METADATA in the wheel")
        msg = email.parser.Parser().parsestr(z.read(meta).decode())
    requires = tuple(Requirement(r) for r in msg.get_all("Requires-Dist") or [])
    return Wheel(canonicalize_name(name), version, requires, frozenset(tags), path.name)


def _applies(req: Requirement, env: Mapping[str, str], extras: Iterable[str]) -> bool:
    if req.marker is None:
        return True
    return any(req.marker.evaluate({**env, "extra": e}) for e in ("", *extras))


def problems(bundle: Mapping[str, Wheel], image: Mapping[str, Version | None], roots: list[Requirement],
             env: Mapping[str, str], tags: set[Tag]) -> list[str]:
    """What keeps `bundle` + `image` from meeting `roots` on the target (empty: complete).

    Walks the requirements from the roots through the carried wheels (with the extras asked for);
    a package the image provides is not walked (the image is consistent with itself)."""
    out = []
    for w in bundle.values():
        if not (w.tags & tags):
            out.append(f"{w.file}: not installable on CPython 3.12 manylinux x86_64 (tags "
                       f"{', '.join(sorted(map(str, w.tags)))})")
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [(r, "the project") for r in roots]
    while todo:
        req, by = todo.pop()
        name = canonicalize_name(req.name)
        key = (name, frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        if name in NEVER:
            continue
        wheel = bundle.get(name)
        if wheel is not None:
            if not req.specifier.contains(wheel.version, prereleases=True):
                out.append(f"{by} needs {req}, the bundle carries {wheel.file}")
            for sub in wheel.requires:
                if _applies(sub, env, req.extras):
                    todo.append((Requirement(str(sub).split(";")[0]), wheel.file))
            continue
        if name in image:
            version = image[name]
            if version is not None and not req.specifier.contains(version, prereleases=True):
                out.append(f"{by} needs {req}, the image has {name} {version}: carry it (CARRY_ANYWAY)")
            continue
        out.append(f"{by} needs {req}: neither the bundle nor the image has {name}")
    return sorted(out)


def carried(resolved: Mapping[str, tuple[Version, tuple[Requirement, ...]]], image: Mapping[str, Version | None],
            roots: list[Requirement], env: Mapping[str, str]) -> dict[str, Version]:
    """Of pip's resolution (name -> (version, its requirements)), what to carry: the packages
    reached from the roots without passing through the image's packages (whose own requirements
    the image meets), plus CARRY_ANYWAY; never NEVER."""
    out: dict[str, Version] = {}
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in seen or name in NEVER or (name in image and name not in CARRY_ANYWAY):
            continue
        seen.add(name)
        if name not in resolved:
            raise ValueError(f"pip's resolution has no {name} (needed as {req})")
        version, requires = resolved[name]
        out[name] = version
        todo += [r for r in requires if _applies(r, env, req.extras)]
    return out


def _pip_target_args() -> list[str]:
    args = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp", "--abi", "cp312"]
    for p in PLATFORMS:
        args += ["--platform", p]
    return args


def resolve(reqs: list[Requirement]) -> dict[str, tuple[Version, tuple[Requirement, ...]]]:
    """pip's resolution of reqs for the target interpreter (nothing installed, metadata only):
    name -> (version, its requirements)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed",
               "--report", str(report), "--target", str(Path(tmp) / "t"), *_pip_target_args(),
               *[str(r) for r in reqs]]
        subprocess.run(cmd, check=True)
        doc = json.loads(report.read_text())
    return {canonicalize_name(i["metadata"]["name"]): (Version(i["metadata"]["version"]),
                                                        tuple(Requirement(r) for r in i["metadata"].get("requires_dist", [])))
            for i in doc["install"]}


def inputs_digest() -> str:
    h = hashlib.sha256()
    for p in (REPO / "pyproject.toml", IMAGE_FILE, Path(__file__)):
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def load_bundle(dest: Path) -> dict[str, Wheel]:
    out: dict[str, Wheel] = {}
    for p in sorted(dest.glob("*.whl")):
        w = read_wheel(p)
        if w.name in out:
            raise ValueError(f"{dest}: two wheels of {w.name} ({out[w.name].file}, {w.file}); keep one")
        out[w.name] = w
    return out


def fetch(dest: Path) -> None:
    stamp = dest / STAMP
    digest = inputs_digest()
    if stamp.is_file() and json.loads(stamp.read_text()).get("inputs") == digest:
        print(f"{dest}: up to date", flush=True)
        return
    image, roots = read_image(), project_requirements()
    want = carried(resolve(roots), image, roots, target_environment())
    tmp = dest.with_name(dest.name + ".part")
    subprocess.run(["rm", "-rf", str(tmp)], check=True)
    tmp.mkdir(parents=True)
    print(f"downloading {len(want)} wheels for CPython 3.12 manylinux x86_64 into {dest}", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", str(tmp),
                    *_pip_target_args(), *[f"{n}=={v}" for n, v in sorted(want.items())]], check=True)
    (tmp / STAMP).write_text(json.dumps({"inputs": digest, "wheels": sorted(p.name for p in tmp.glob("*.whl"))}))
    subprocess.run(["rm", "-rf", str(dest)], check=True)
    tmp.rename(dest)


def check(dest: Path) -> list[str]:
    if not dest.is_dir():
        return [f"{dest}: no wheel bundle (make gpu-wheels)"]
    bundle = load_bundle(dest)
    found = problems(bundle, read_image(), project_requirements(), target_environment(), target_tags())
    size = sum(p.stat().st_size for p in dest.glob("*.whl"))
    print(f"{dest}: {len(bundle)} wheels, {size / 2**20:.1f} MiB", flush=True)
    return found


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu.wheels", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["fetch", "check"])
    p.add_argument("--dest", type=Path, default=DEST)
    args = p.parse_args(argv)
    if args.action == "fetch":
        fetch(args.dest)
    found = check(args.dest)
    for line in found:
        print(f"wheel bundle: {line}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
