"""The committed gRPC stubs are what grpcio-tools generates from loader.proto (sllm_knative/loader/)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = Path("sllm_knative") / "loader"


def test_generated_stubs_match_the_proto(tmp_path):
    protoc = pytest.importorskip("grpc_tools.protoc")
    (tmp_path / PACKAGE).mkdir(parents=True)
    shutil.copy(REPO / PACKAGE / "loader.proto", tmp_path / PACKAGE / "loader.proto")
    rc = protoc.main(["protoc", f"-I{tmp_path}", f"--python_out={tmp_path}", f"--grpc_python_out={tmp_path}",
                      f"--pyi_out={tmp_path}", str(tmp_path / PACKAGE / "loader.proto")])
    assert rc == 0
    for name in ("loader_pb2.py", "loader_pb2_grpc.py", "loader_pb2.pyi"):
        assert (tmp_path / PACKAGE / name).read_text() == (REPO / PACKAGE / name).read_text(), (
            f"{PACKAGE / name} is stale: regenerate with `make proto` (python -m grpc_tools.protoc -I. "
            f"--python_out=. --grpc_python_out=. --pyi_out=. {PACKAGE / 'loader.proto'})")


def test_the_stubs_import_from_the_library():
    """The generated service module finds its messages where the library keeps them."""
    from sllm_knative.loader import loader_pb2, loader_pb2_grpc

    assert loader_pb2.DESCRIPTOR.package == "sllm_knative.loader.v1"
    assert loader_pb2_grpc.LoaderStub.__module__ == "sllm_knative.loader.loader_pb2_grpc"
