"""Local mode (the embedded default): the same components as local processes on one machine.

    procs.py    starting children that die with their parent, stopping process groups
    zygote.py   the wire protocol of a node's zygote (`python -m functions.zygote`, a pre-imported
                instance runtime that forks function instances in milliseconds): spawn_via
    cluster.py  `up`/`down`: starts each component by its entry point; cluster.json, pids, logs

Like the rest of the library, nothing here imports a process package (activator, autoscaler,
loader_sidecar, functions): processes are started as `python -m ...` and spoken to through the
library's API types.
"""
