"""The committed gRPC stubs are what grpcio-tools generates from loader.proto."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_generated_stubs_match_the_proto(tmp_path):
    protoc = pytest.importorskip("grpc_tools.protoc")
    (tmp_path / "loader_sidecar").mkdir()
    shutil.copy(REPO / "loader_sidecar" / "loader.proto", tmp_path / "loader_sidecar" / "loader.proto")
    rc = protoc.main(["protoc", f"-I{tmp_path}", f"--python_out={tmp_path}", f"--grpc_python_out={tmp_path}",
                      f"--pyi_out={tmp_path}", str(tmp_path / "loader_sidecar" / "loader.proto")])
    assert rc == 0
    for name in ("loader_pb2.py", "loader_pb2_grpc.py", "loader_pb2.pyi"):
        assert (tmp_path / "loader_sidecar" / name).read_text() == (REPO / "loader_sidecar" / name).read_text(), (
            f"loader_sidecar/{name} is stale: regenerate with `python -m grpc_tools.protoc -I. --python_out=. "
            "--grpc_python_out=. --pyi_out=. loader_sidecar/loader.proto`")
