"""The loader sidecar: one node's checkpoint tiers (remote -> SSD -> DRAM) over gRPC.

Modules, outside in:
    __main__   `python -m loader_sidecar` (flags in config.py)
    server     gRPC adapter (grpc.aio) and the error -> status table; Sidecar = node + server
    node       the core API: acquire/release, prefetch, evict, inventory
    fetch      the fills: one flight per checkpoint and hop; remote -> SSD (+DRAM at once),
               the plain-HF import and conversion
    spans      the remote transfer's spans of whole checksum blocks and their checking writer
    ssd_copy   SSD -> DRAM: direct reads into a staging buffer, verified, written to tmpfs
    aio        threads that are stopped, not abandoned, when a fill is cancelled
    stores/    one module per store kind (file, http, hf, s3) behind stores.base.Store
    tiers      a budgeted cache directory: LRU that never evicts in-use entries, markers, recovery
    nodecache  the node's NodeCache built from its state, and the publisher (--kube-node)
    fills, watermarks, leases, profile, inventory, metrics, refs, config

The API is the library's, `sllm_knative.loader`: loader.proto and its generated stubs, the
client (for instances, the autoscaler, the CLI and tests) and the error types, which this
package raises and maps to gRPC status codes (server.status_for). See docs/sidecar.md.
"""
