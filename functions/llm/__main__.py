"""`python -m functions.llm`: start loading the model at once, serve meanwhile.

Imports before the load starts are the standard library, the configuration and logging;
torch and transformers are imported by the loading thread while the HTTP servers come up.
`main(argv)` also serves a pre-imported runtime (the local cluster's zygote,
functions/zygote.py, imports torch and transformers ahead of time and calls it in a fork).

With `--checkpoint URI --loader ADDRESS` the instance takes its own lease on the checkpoint from
the node's loader sidecar and loads the leased copy (functions/llm/weights.py); with `--model DIR`
it loads a directory.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time


def _process_start() -> float:
    """Wall-clock time at which this process started (10 ms resolution; now if unknown).

    /proc/self/stat gives the start in clock ticks since boot; CLOCK_BOOTTIME gives the time
    since boot precisely (the boot time in /proc/stat is rounded to whole seconds).
    """
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
        return time.time() - age
    except (OSError, ValueError, IndexError, AttributeError):
        return time.time()


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGTERM; 2 for bad flags or a port in use, 3 when the model could not be loaded."""
    started = _process_start()
    from functions.llm import config
    from sllm_knative import log

    try:
        cfg, level = config.parse(argv)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    log.setup(level)
    logger = log.get_logger("functions.llm", service=cfg.service, instance=cfg.instance, node=cfg.node,
                            checkpoint=cfg.checkpoint)
    from functions.llm.service import ModelHost

    service = ModelHost(cfg, started, logger)
    service.start_loading()
    from functions.llm import server

    try:
        asyncio.run(server.serve(service))
    except OSError as exc:  # e.g. the port is taken
        logger.error("cannot serve", error=str(exc))
        return 2
    return 3 if service.status == "failed" else 0


if __name__ == "__main__":
    sys.exit(main())
