"""The loader sidecar's API, as every client uses it (instances, the autoscaler, the CLI, tests).

    loader.proto      the gRPC service (package sllm_knative.loader.v1); the generated stubs
                      loader_pb2.py, loader_pb2_grpc.py and loader_pb2.pyi are committed
                      (`make proto` regenerates them; a test fails when they are stale)
    client.py         LoaderClient and LeaseHandle: a synchronous client that follows a lease's watermarks
    errors.py         the exception tree; a gRPC status maps to one class, both ways
    address.py        the default node name and socket (`$SLLM_LOADER`, else the node's socket)

The server side (tiers, fetches, leases) is the `loader_sidecar` process, `python -m loader_sidecar`;
it imports this package, never the other way round. See docs/sidecar.md.
"""
