"""What the agent is given: node specs (`--node` on the command line) and the image table."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

Json = dict[str, Any]


@dataclass(frozen=True)
class NodeSpec:
    """One node the agent registers and runs pods for."""

    name: str
    cpu: str = "4"
    memory: str = "16Gi"
    gpus: int = 0
    pods: int = 110
    labels: Mapping[str, str] = field(default_factory=dict)


_NODE_KEYS = ("cpu", "memory", "gpu", "pods", "label")


def parse_node_arg(text: str) -> NodeSpec:
    """`name[:cpu=4,memory=16Gi,gpu=1,pods=110,label=k=v,...]` -> NodeSpec."""
    name, _, rest = text.partition(":")
    if not name:
        raise ValueError(f"node {text!r}: no name")
    kw: dict[str, Any] = {}
    labels: dict[str, str] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or key not in _NODE_KEYS:
            raise ValueError(f"node {text!r}: {item!r} is not one of {', '.join(k + '=' for k in _NODE_KEYS)}")
        if key == "label":
            lk, leq, lv = value.partition("=")
            if not leq or not lk:
                raise ValueError(f"node {text!r}: label {value!r} is not k=v")
            labels[lk] = lv
        elif key in ("gpu", "pods"):
            kw["gpus" if key == "gpu" else "pods"] = int(value)
        else:
            kw[key] = value
    return NodeSpec(name=name, labels=labels, **kw)


class ImageError(Exception):
    """The image is not one this agent can run (kubelet's ErrImagePull)."""


@dataclass(frozen=True)
class ImageConfig:
    """What an image runs: Docker's ENTRYPOINT and CMD."""

    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()


IMAGES: dict[str, ImageConfig] = {
    "sllm-knative/activator": ImageConfig(("python", "-m", "activator")),
    "sllm-knative/autoscaler": ImageConfig(("python", "-m", "autoscaler")),
    "sllm-knative/loader": ImageConfig(("python", "-m", "loader_sidecar")),
    "sllm-knative/function": ImageConfig(("python", "-m", "functions.llm")),
    "python": ImageConfig((), ("python3",)),
}

_PYTHON_NAME = re.compile(r"^python(3(\.\d+)?)?$")


def image_repository(image: str) -> str:
    """`ghcr.io/x/sllm-knative/activator:v1@sha256:..` -> `x/sllm-knative/activator`; `python:3.11` -> `python`."""
    ref = image.split("@", 1)[0]
    slash = ref.rfind("/")
    colon = ref.rfind(":")
    if colon > slash:
        ref = ref[:colon]
    parts = ref.split("/")
    if len(parts) > 1 and ("." in parts[0] or ":" in parts[0] or parts[0] == "localhost"):
        parts = parts[1:]
    if len(parts) > 1 and parts[0] == "library":
        parts = parts[1:]
    return "/".join(parts)


def lookup_image(image: str, table: Mapping[str, ImageConfig] = IMAGES) -> ImageConfig:
    repo = image_repository(image)
    for key, cfg in table.items():
        if repo == key or repo.endswith("/" + key):
            return cfg
    raise ImageError(f'image "{image}" is not in the node agent\'s image table '
                     f"({', '.join(sorted(table))}): no such image on this node")


def map_python(argv0: str, python: str = sys.executable) -> str:
    """`python`, `python3`, `python3.11` (bare or with a folder) -> this interpreter."""
    return python if _PYTHON_NAME.match(os.path.basename(argv0)) else argv0
