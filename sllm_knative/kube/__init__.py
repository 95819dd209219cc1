"""The Kubernetes side of sllm-knative: one client, watches with a cache, leader election, Events.

Every component that talks to a cluster goes through this package and the official `kubernetes`
Python client (synchronous; controllers run its calls in threads):

    client.py       the one client (kubeconfig, or in-cluster) and the resources we use
    informer.py     list + watch with resync into a cache, feeding a work queue
    workqueue.py    a de-duplicating queue with per-key backoff (client-go's workqueue, small)
    leader.py       active/passive replicas through a coordination.k8s.io Lease
    events.py       decisions recorded as Events on the object they concern
    nodecache.py    a node's NodeCache kept equal to its loader's state (the loader is its one writer)
"""
