"""The real model on the local cluster: a greedy chat answer is the same whichever tier its cold
start loaded the checkpoint from (the remote store, the node's SSD tier, its DRAM tier), across
scale-to-zero, and the same as the warm instance's."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from sllm_knative.commands.resources import invoke
from sllm_knative.local.manifests import ALLOW_ZERO_INITIAL_SCALE, service_manifest
from sllm_knative.ports import free_port
from tests.local.test_cluster import cli
from tests.local.util import wait_for
from tests.realmodel.conftest import ANSWER, NAME, QUESTION


@pytest.fixture(scope="module")
def cluster(smollm2: Path, tmp_path_factory) -> Iterator[tuple[dict, str]]:
    """One node, one slot: every cold start of the service lands on the same node's tiers."""
    store = tmp_path_factory.mktemp("realmodel-store")
    shutil.copytree(smollm2, store / NAME)
    state = tmp_path_factory.mktemp("realmodel-state")
    cli(state, "up", "--detach", "--nodes", "1", "--slots", "1", "--store", f"file://{store}",
        "--port", str(free_port()), "--dram-gb", "1", "--ssd-gb", "1")
    doc = json.loads((state / "cluster.json").read_text())
    uri = f"file://{store}/{NAME}"
    (state / "svc.yaml").write_text("---\n".join([ALLOW_ZERO_INITIAL_SCALE,
                                                  service_manifest(NAME, uri, keep_alive="2s", initial_scale=0)]))
    cli(state, "apply", "-f", str(state / "svc.yaml"))
    try:
        yield doc, uri
    finally:
        cli(state, "down", check=False)


def service(doc: dict) -> dict:
    return next(s for s in httpx.get(f"{doc['autoscaler']}/v1/services", timeout=10).json()["services"]
                if s["key"] == f"default/{NAME}")


def ask(doc: dict) -> tuple[str, str | None]:
    """The greedy answer, and the tier the instance that gave it was placed for."""
    res = invoke(doc["activator"], NAME, "default", "", 40, messages=QUESTION)
    placed = [p for p in service(doc)["placements"] if p["instance"] == res["instance"]]
    return res["text"], placed[-1]["tier"] if placed else None


def to_zero(doc: dict) -> None:
    wait_for(lambda: not service(doc)["instances"], 60, "scale to zero after the keep-alive")


def test_the_greedy_answer_is_the_same_from_every_tier(cluster) -> None:
    doc, uri = cluster
    answers = {}
    text, tier = ask(doc)
    answers[f"cold from {tier}"] = text
    assert tier == "remote"  # first ever: from the store
    answers["warm"] = ask(doc)[0]
    to_zero(doc)
    text, tier = ask(doc)
    answers[f"cold from {tier}"] = text
    assert tier == "dram"  # kept in the node's DRAM tier after scale-to-zero
    to_zero(doc)
    evict = subprocess.run([sys.executable, "-m", "sllm_knative.cli", "cache", "--loader", doc["nodes"][0]["loader"],
                            "evict", uri, "--tier", "dram"], capture_output=True, text=True, timeout=60)
    assert evict.returncode == 0 and "evicted from dram" in evict.stdout, evict
    text, tier = ask(doc)
    answers[f"cold from {tier}"] = text
    assert tier == "ssd"
    assert set(answers) == {"cold from remote", "warm", "cold from dram", "cold from ssd"}
    assert set(answers.values()) == {ANSWER}, answers
