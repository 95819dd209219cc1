"""The host-to-device probe, run by the sidecar in a short-lived subprocess (profile.measure_host_to_device).

    python -m loader_sidecar.h2d_probe --file F --bytes N --device cuda:0

Times what a GPU instance's load does with a DRAM-tier partition: the extension's
`read_to_device` of a tmpfs file (buffered reads into its pinned ring, then host-to-device
copies on its own streams) into a buffer from torch's caching allocator, with the loader's default
options. A first, untimed read of the whole file creates the CUDA context and pins the ring the
timed read then reuses (an instance pays both once per process, not per byte), so the number is a
rate for the load-time model. Prints one JSON line `{"bytes": N, "seconds": S, "device_name": ...}`
and exits 0; on any failure it prints the reason on stderr and exits 1. Run in its own process so
the sidecar never holds a CUDA context.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any


def probe(path: str, nbytes: int, device: str) -> dict[str, Any]:
    import torch

    from cuda_ext import _C
    from sllm_knative.loading import LoadOptions, resolve_device

    dev = resolve_device(device)
    if dev.type != "cuda":
        raise ValueError(f"--device {device!r}: expected cuda or cuda:N")
    opts = LoadOptions()
    buf = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    torch.cuda.synchronize(dev)

    def read() -> float:
        t0 = time.perf_counter()
        _C.read_to_device(path, 0, dev.index, buf.data_ptr(), nbytes, opts.chunk_bytes, opts.threads, False,
                          opts.pinned_bytes, opts.streams)
        return time.perf_counter() - t0  # read_to_device returns after its streams are synchronised

    first = read()
    seconds = read()
    return {"bytes": nbytes, "seconds": seconds, "device_name": torch.cuda.get_device_name(dev),
            "first_seconds": first}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loader_sidecar.h2d_probe", description=__doc__.split("\n\n")[0])
    ap.add_argument("--file", required=True, help="a scratch file in the DRAM tier")
    ap.add_argument("--bytes", type=int, required=True, help="bytes to read from its start")
    ap.add_argument("--device", default="cuda:0")
    args = ap.parse_args(argv)
    try:
        if args.bytes <= 0:
            raise ValueError(f"--bytes {args.bytes}: must be positive")
        result = probe(args.file, args.bytes, args.device)
    except Exception as exc:
        print(f"h2d_probe: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
