"""The autoscaler: desired scale per service (KPA-compatible decider + ServerlessLLM keep-alive).

Pure decisions live in `autoscaler.decider` (`spec_for`, `decide`) and `autoscaler.window`
(`MetricWindow`); the process that ticks them, talks to the activator and the backends comes
with the local cluster.
"""
