"""A discrete-event cluster simulator on the real policy code (issue 16, section 2).

The simulator runs the autoscaler's decider (`autoscaler.decider`), placement and its load-time
model with calibration (`sllm_knative.placement`), and the preemption and drain plans
(`autoscaler.preemption`) against simulated nodes, tiers, loads and generations in virtual
time, so that an hour of a thousand-node fleet runs in minutes on two cores. Nothing of the
policy code is copied: a change there changes the simulation.

    hardware.py   hardware profiles as data (this machine, 8 x H100, 8 x H200), with sources
    workload.py   model catalog and the Azure trace scaled to many models (a stated, seeded rule)
    policies.py   the policies compared, as data
    engine.py     the event loop, requests and the instance lifecycle (the model, stated)
    cluster.py    the cluster's state: nodes, GPUs, DRAM/SSD tiers, loaders, instances, services
    adapters.py   the calls into the real policy code: scaler, placement, preemption and drain
    runner.py     one run, a sweep over load, summaries and plots
    __main__.py   `python -m sim run|sweep|study`
"""
