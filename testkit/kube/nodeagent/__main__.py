"""Run test nodes (pods as local processes) against a cluster started by hand.

    python -m testkit.kube.cluster up     # prints the kubeconfig path; writes network.json next to it
    python -m testkit.kube.nodeagent --kubeconfig K --root R --node n1:cpu=4,memory=16Gi,gpu=1,label=k=v

The nodes join the cluster's pod network: a namespace each on the cluster's bridge, attached
through `network.json` (`--network-file`, default: next to the kubeconfig). Runs until SIGTERM
or SIGINT, then stops every container and removes the nodes' namespaces.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from sllm_knative.log import setup
from testkit.kube.network import NETWORK_FILE, ClusterNetwork
from testkit.kube.nodeagent.agent import NodeAgent
from testkit.kube.nodeagent.spec import parse_node_arg


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m testkit.kube.nodeagent", description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--kubeconfig", type=Path, required=True)
    ap.add_argument("--root", type=Path, required=True, help="logs, volumes and hostPath folders go here")
    ap.add_argument("--node", action="append", required=True, type=parse_node_arg,
                    help="name[:cpu=4,memory=16Gi,gpu=1,pods=110,label=k=v,...] (repeat for more nodes)")
    ap.add_argument("--network-file", type=Path, default=None,
                    help=f"the cluster's pod network (default: {NETWORK_FILE} next to the kubeconfig)")
    ap.add_argument("--delete-nodes", action="store_true", help="delete the Node objects on exit")
    args = ap.parse_args(argv)
    setup()
    network = ClusterNetwork.load(args.network_file or args.kubeconfig.parent / NETWORK_FILE)
    agent = NodeAgent(args.kubeconfig, args.root, args.node, network=network)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    agent.start()
    try:
        done.wait()
    finally:
        agent.stop(delete_nodes=args.delete_nodes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
