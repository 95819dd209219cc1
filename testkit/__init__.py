"""Support code for tests and benchmarks (never imported by the library or the processes):

    proc     Proc: start a child with a log file, wait for an HTTP readiness path, stop it.
    servers  nginx (a file store), a fault-injecting TCP proxy, nginx_conf, wait_port.
    sidecar  a loader sidecar (the real gRPC server) on an event loop thread.

Tests and benchmarks run from the repository root, which is how this package is found; it is
not installed with the project.
"""
