"""A real Kubernetes control plane on this machine, for tests and benchmarks:

    cluster    KubeCluster: etcd, kube-apiserver, kube-controller-manager, kube-scheduler built
               from their Go modules (`make kube-bins`); `python -m testkit.kube.cluster up|down`.
    network    the pod network: a bridge and a network namespace per node, all on this machine.
    nodeagent  the test node agent: Nodes whose pods run as local processes (no container runtime).
    knative    stand-ins for Knative Serving's reconcilers, which cannot be built here
               (docs/kubernetes.md): the Revision's objects, SKS status, private Services.
"""
