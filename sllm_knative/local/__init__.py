"""Local mode (the embedded default): the same components as local processes on one machine.

    procs.py    starting children that die with their parent, stopping process groups
    zygote.py   a pre-imported instance runtime that forks function instances in milliseconds
    cluster.py  the state directory: cluster.json (ports, nodes), pids, logs
"""
