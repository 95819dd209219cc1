"""No secret reaches a log: a local cluster run with every credential set (the internal token,
S3 keys, a Hugging Face token) cold-starts a checkpoint from an S3 store (moto) and one from a
Hub-layout store that wants the token (nginx), fails to start one whose S3 key does not exist,
and then every file the cluster wrote (component and instance logs, the cluster file, the
journal) and every line the CLI printed is searched for each secret. Real processes, real
stores, the credentials as a user sets them (the environment of `sllm-knative up`)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from sllm_knative.commands.resources import invoke
from sllm_knative.local.manifests import service_manifest
from sllm_knative.ports import free_port
from testkit.servers import Nginx, nginx_path, wait_port
from tests.local.test_cluster import services
from tests.local.util import wait_for

CLI = [sys.executable, "-m", "sllm_knative.cli"]
BUCKET = "models-bucket"


@pytest.fixture(scope="module")
def creds() -> dict[str, str]:
    """Distinct, recognisable values: any of them in a file or an output line is a leak."""
    return {"SLLM_INTERNAL_TOKEN": "itok-" + secrets.token_hex(12),
            "AWS_ACCESS_KEY_ID": "AKIA" + secrets.token_hex(8).upper(),
            "AWS_SECRET_ACCESS_KEY": "awssecret-" + secrets.token_hex(16),
            "HF_TOKEN": "hf_" + secrets.token_hex(16)}


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory, creds: dict[str, str]) -> Iterator[dict[str, str]]:
    """The tiny checkpoint in S3 (moto) under s3://models-bucket/ckpt/tiny, and in the Hub's
    layout behind nginx (which wants `Bearer $HF_TOKEN`) as hf://org/tiny."""
    if nginx_path() is None:
        pytest.skip("nginx is not installed (apt-get install nginx-light; .ci/run installs it)")
    boto3 = pytest.importorskip("boto3")
    moto_server = pytest.importorskip("moto.server")
    from sllm_knative.convert import convert
    from sllm_knative.models import build_model

    root = tmp_path_factory.mktemp("secret-store")
    convert(build_model(root / "src"), root / "models" / "tiny")
    shutil.copytree(root / "models" / "tiny", root / "hf" / "org" / "tiny" / "main")
    port = free_port()
    s3 = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    s3.start()
    try:
        wait_port(port)
        endpoint = f"http://127.0.0.1:{port}"
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                              aws_access_key_id=creds["AWS_ACCESS_KEY_ID"],
                              aws_secret_access_key=creds["AWS_SECRET_ACCESS_KEY"])
        client.create_bucket(Bucket=BUCKET)
        for f in (root / "models" / "tiny").iterdir():
            client.upload_file(str(f), BUCKET, f"ckpt/tiny/{f.name}")
        with Nginx(root, hf_token=creds["HF_TOKEN"]) as web:
            yield {"AWS_ENDPOINT_URL": endpoint, "HF_ENDPOINT": f"{web.url}/hf"}
    finally:
        s3.stop()


def test_no_credential_appears_in_any_log_or_output(tmp_path: Path, creds: dict[str, str],
                                                    stores: dict[str, str]) -> None:
    state = tmp_path / "state"
    env = {**os.environ, **creds, **stores, "AWS_DEFAULT_REGION": "us-east-1"}
    printed: list[str] = []

    def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([*CLI, *args, "--state-dir", str(state)], capture_output=True, text=True, timeout=120,
                           env=env)
        printed.extend((r.stdout, r.stderr))
        if check and r.returncode != 0:
            raise AssertionError(f"{args}: {r.returncode}\n{r.stdout}\n{r.stderr}")
        return r

    # Three slots: `missing` starts beside the other two (a start for initialScale alone, with no
    # request, takes a free slot and displaces no idle instance).
    cli("up", "--detach", "--nodes", "1", "--slots", "3", "--store", f"s3://{BUCKET}/ckpt", "--store", "hf://",
        "--port", str(free_port()), "--dram-gb", "1", "--ssd-gb", "1")
    try:
        doc = json.loads((state / "cluster.json").read_text())
        manifests = [service_manifest("from-s3", f"s3://{BUCKET}/ckpt/tiny", keep_alive="600s"),
                     service_manifest("from-hf", "hf://org/tiny", keep_alive="600s"),
                     service_manifest("missing", f"s3://{BUCKET}/ckpt/nope", keep_alive="600s", initial_scale=1)]
        (state / "svc.yaml").write_text("---\n".join(manifests))
        cli("apply", "-f", str(state / "svc.yaml"))
        s3_answer = invoke(doc["activator"], "from-s3", "default", "Hello", 4, seed=1)
        hf_answer = invoke(doc["activator"], "from-hf", "default", "Hello", 4, seed=1)
        assert s3_answer["text"] and s3_answer["text"] == hf_answer["text"]  # the same weights, greedy
        # A start that fails in the store (no such key; initial scale 1 starts it at once): its
        # error goes to the service's status and the logs.
        wait_for(lambda: bool(services(doc)["default/missing"]["last_failure"]), 60, "the failed start's reason")
        printed.append(json.dumps(services(doc)))
        listed = cli("get", "services").stdout  # the CLI shows why the service has no instance
        assert "ckpt/nope" in next(line for line in listed.splitlines() if line.startswith("default/missing")), listed
        cli("get", "instances")
    finally:
        cli("down", check=False)

    written = [p for p in state.rglob("*") if p.is_file()]
    assert any(p.suffix == ".log" for p in written), written
    # What was searched holds what the credentials were used for: the failed key, named.
    assert any(b"ckpt/nope" in p.read_bytes() for p in written if p.suffix == ".log")
    leaks = []
    for name, value in creds.items():
        leaks += [f"{name} in {p.relative_to(state)}" for p in written if value.encode() in p.read_bytes()]
        leaks += [f"{name} in the CLI's output" for out in printed if value in out]
    assert not leaks, leaks
